"""Neural-memory op, chunk-parallel form (pure XLA). Same function as `reference.py`.

Layout. Every real token is placed in a *slot* of a grid of `NC` chunks of `b` slots: token t goes
to chunk `cumsum(new_chunk)[t] - 1`, slot `pos[t] mod b`, where a new chunk starts at the first
token of the call, at a document start, and where `pos mod b == 0`. So every chunk of the grid is
one anchor chunk of the model (a call that starts mid-chunk fills the tail of chunk 0; a document
start opens a fresh chunk). Unused slots are inert (no write, no decay). The sequential loop is a
`lax.scan` over the NC = O(T / b) chunks, never over tokens.

Inside a chunk with carried (W0, S0) and anchor Wa (all gradients at link(Wa)):
  u_s   = grad at the anchor for the b + c - 1 window sources (vmap of a VJP: any memory network)
  U     = Gamma u                    Gamma[t, s] = gamma[t, t - s] on the band 0 <= t - s < c
  S_t   = E_t S0 + sum_i P_E[t, i] c_in_i U_i          P_E[t, i] = exp(sum_{i<j<=t} log mom_j)
  W_t   = A_t W0 + sum_m P_A[t, m] c_out_m T(S_m)      P_A[t, m] = exp(sum_{m<j<=t} log ret_j)
  y_t   = M_{link(W_t)}(q_t)         (vmap over the chunk's tokens)
The decay matrices are built from masked segment sums of the log gates (never ratios of
cumulative products), so they are exact at underflow and at log-gate -inf (no momentum). The
chunk body is rematerialised in the backward pass. Two chunk bodies, the same function:

  materialised  the per-token states of a chunk are formed (O(b |W|) per head): any transform
                (Newton-Schulz) and link.
  dual          (titans.md §2.8) for `Layered` memories (chains of linear layers: the matrix and
                MLP memories) without transform or link: per-source gradients stay outer
                products x_s^T delta_s and reads are attention-like, O(b (b + c) d) per layer.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import segsum, upcast
from pallas_kernels.neural_memory import reference as ref

Array = jax.Array


def n_chunks(T: int, b: int, max_resets: int) -> int:
    """Static chunk count that holds any call of T tokens with at most `max_resets` document
    starts (each piece of a document adds at most one partial chunk)."""
    return min(T, math.ceil((T + b - 1) / b) + max_resets) if b > 1 else T


def layout(pos, reset, real, b: int, NC: int):
    """Per row: slot [B, T] (NC*b for pads), doc [B, T], used chunk count [B]."""
    B, T = pos.shape
    t = jnp.arange(T)[None, :]
    new = real & ((t == 0) | reset | (pos % b == 0))
    cidx = jnp.cumsum(new.astype(jnp.int32), axis=1) - 1
    slot = jnp.where(real, cidx * b + pos % b, NC * b)
    doc = jnp.cumsum((reset & real).astype(jnp.int32), axis=1)
    return slot, doc, jnp.max(jnp.where(real, cidx + 1, 0), axis=1)


def _scatter(x, slot, N):
    """x [B, T, ...] -> [B, N, ...] at `slot` (out-of-range dropped), zeros elsewhere."""
    B = x.shape[0]
    out = jnp.zeros((B, N) + x.shape[2:], x.dtype)
    return out.at[jnp.arange(B)[:, None], slot].set(x, mode="drop")


def _materialised_chunk(rule, outer, Wc, Sc, ac, qc, sk, sv, sx, G, PE, E, PA, A):
    """Per-token states of the chunk materialised (any transform and link)."""
    W_eff = rule.link(outer, ac)
    u = jax.vmap(lambda kk, vv, xx: ref.source_grad(rule, outer, W_eff, kk, vv, xx))(sk, sv, sx)
    U = jax.tree.map(lambda g: jnp.tensordot(G, g, 1), u)
    bc = lambda vec, a: vec.reshape(vec.shape + (1,) * (a.ndim))
    S_all = jax.tree.map(lambda s0, uu: bc(E, s0) * s0[None] + jnp.tensordot(PE, uu, 1), Sc, U)
    TS = jax.vmap(rule.transform)(S_all)
    W_all = jax.tree.map(lambda w0, ts: bc(A, w0) * w0[None] + jnp.tensordot(PA, ts, 1), Wc, TS)
    y = jax.vmap(lambda Wt, qt: ref.read(rule, outer, Wt, qt))(W_all, qc)
    last = lambda t: jax.tree.map(lambda a: a[-1], t)
    return y, last(W_all), last(S_all)


def _dual_chunk(lay: ref.Layered, rule, outer, Wc, Sc, ac, qc, sk, sv, sx, G, PE, E, PA, A):
    """Dual form (titans.md §2.8) for a layered memory with identity transform and link: every
    source gradient of layer l is an outer product x_s^T delta_s, so with
        W_t = A_t W0 + F_t S0 + sum_s K[t, s] u_s,   F = PA E,  K = PA PE G,
    a read is  z_t = A_t x_t W0 + F_t x_t S0 + sum_s K[t, s] (x_t . x_s) delta_s  per layer:
    O(b (b + c) d + b |W|) per chunk, no per-token weights."""
    names = lay.keys(Wc)
    act = lay.act or (lambda z: z)
    head = lay.head or (lambda o, z, x: z)
    L = len(names)

    def chain(x, W, eps):  # eps: additive taps on every layer output (their VJP is delta)
        xs, h = [], x
        for i, n in enumerate(names):
            xs.append(h)
            z = h @ W[n] + eps[i]
            h = act(z) if i < L - 1 else z
        return head(outer, z, x), xs

    def source(kk, vv, xx):
        eps = [jnp.zeros((ac[n].shape[-1],), kk.dtype) for n in names]
        pred, vjp, xs = jax.vjp(lambda e: chain(kk, ac, e), eps, has_aux=True)
        return xs, vjp(rule.signal_fn(pred, vv, xx).astype(pred.dtype))[0]

    X, D = jax.vmap(source)(sk, sv, sx)  # lists over layers: [n_src, d_in], [n_src, d_out]
    KS = PE @ G                          # S_t = E_t S0 + sum_s KS[t, s] u_s
    K = PA @ KS
    F = PA @ E
    h = qc
    for i, n in enumerate(names):
        z = (A[:, None] * (h @ Wc[n]) + F[:, None] * (h @ Sc[n])
             + (K * (h @ X[i].T)) @ D[i])
        h = act(z) if i < L - 1 else z
    y = jax.vmap(lambda zt, qt: head(outer, zt, qt))(z, qc)
    W_end = {n: A[-1] * Wc[n] + F[-1] * Sc[n] + X[i].T @ (K[-1][:, None] * D[i])
             for i, n in enumerate(names)}
    S_end = {n: E[-1] * Sc[n] + X[i].T @ (KS[-1][:, None] * D[i]) for i, n in enumerate(names)}
    return y, W_end, S_end


def _head_chunks(rule: ref.MemoryRule, form: str, outer, rW, rS, rA, W, S, anc, q, lr, lret,
                 lmom, gam, live, sdoc, ek, ev, ex, eval_, edoc, rst, comp):
    """One (row, head). q [N, dk]; gates [N]; gam [N, c]; sdoc [N]; ext arrays [c-1+N, ...];
    rst, comp [NC]. Returns y [N, dv], W, S, anchor."""
    b, c = rule.chunk, rule.window
    N = q.shape[0]
    NC = N // b
    cin_all, cout_all = rule.coefficients(lr)
    cin_all, cout_all = jnp.where(live, cin_all, 0.0), jnp.where(live, cout_all, 0.0)
    chunked = lambda a: a.reshape((NC, b) + a.shape[1:])
    src_idx = jnp.arange(NC)[:, None] * b + jnp.arange(b + c - 1)[None, :]  # [NC, b+c-1]
    take_src = lambda a: a[src_idx]
    xs = (chunked(q), chunked(cin_all), chunked(cout_all), chunked(lret), chunked(lmom),
          chunked(gam), chunked(sdoc), take_src(ek), take_src(ev),
          jax.tree.map(take_src, ex), take_src(eval_), take_src(edoc), rst, comp)
    tt = jnp.arange(b)[:, None]
    ss = jnp.arange(b + c - 1)[None, :]
    off = tt + c - 1 - ss  # window offset of source s for token t

    lay = ref.layered_of(rule) if form != "materialised" else None
    if form == "dual" and lay is None:
        raise ValueError("form='dual' needs a layered memory without transform or link")
    chunk_fn = _materialised_chunk if lay is None else functools.partial(_dual_chunk, lay)

    def body(carry, inp):
        Wc, Sc, ac = carry
        qc, cin, cout, lret_c, lmom_c, gam_c, doc_c, sk, sv, sx, sval, sd, r, cp = inp
        Wc = ref._tree_where(r, rW, Wc)
        Sc = ref._tree_where(r, rS, Sc)
        ac = ref._tree_where(r, rA, ac)
        band = (off >= 0) & (off < c) & sval[None, :] & (sd[None, :] == doc_c[:, None])
        G = jnp.where(band, jnp.take_along_axis(gam_c, jnp.clip(off, 0, c - 1), axis=1), 0.0)
        PE = jnp.exp(segsum(lmom_c, fill=-jnp.inf)) * cin[None, :]
        E = jnp.exp(jnp.cumsum(lmom_c))
        PA = jnp.exp(segsum(lret_c, fill=-jnp.inf)) * cout[None, :]
        A = jnp.exp(jnp.cumsum(lret_c))
        y, W_end, S_end = chunk_fn(rule, outer, Wc, Sc, ac, qc, sk, sv, sx, G, PE, E, PA, A)
        ac = ref._tree_where(cp, W_end, ac)
        return (W_end, S_end, ac), y

    # rematerialised in the backward pass (measured faster for the dual body too on CPU)
    (W, S, anc), y = jax.lax.scan(jax.checkpoint(body), (W, S, anc), xs)
    return y.reshape((N,) + y.shape[2:]), W, S, anc


def neural_memory(rule: ref.MemoryRule, outer, W0, state: ref.MemoryState, q, k, v, *, log_ret,
                  lr, log_mom=None, gamma=None, extra=None, pos, reset, real,
                  max_resets: int | None = None, reset_to=None, form: str = "auto"):
    """Chunk-parallel form; same signature and result as `reference.neural_memory`.

    form: "auto" (the dual form when the memory is `Layered` and there is no transform or link,
    else per-token states materialised), "dual" or "materialised" (same function; for tests).

    max_resets: static bound on document starts per row inside the call (None: `reset` is all
    False). A call with more falls back to the reference loop (same function, via `lax.cond`).
    """
    B, T, H, dk = q.shape
    b = rule.chunk
    reset = reset & real
    NC = n_chunks(T, b, max_resets or 0)
    if max_resets is None:
        return _chunked(rule, form, outer, W0, state, q, k, v, log_ret, lr, log_mom, gamma,
                        extra, pos, reset, real, NC, reset_to)
    _, _, used = layout(pos, reset, real, b, NC)
    args = (outer, W0, state, q, k, v, log_ret, lr, log_mom, gamma, extra, pos, reset, real,
            reset_to)

    def fast(a):
        return _chunked(rule, form, *a[:-1], NC, a[-1])

    def slow(a):
        o, w0, st, q_, k_, v_, lrt, lr_, lm, g, e, p, r, m, rt = a
        return ref.neural_memory(rule, o, w0, st, q_, k_, v_, log_ret=lrt, lr=lr_, log_mom=lm,
                                 gamma=g, extra=e, pos=p, reset=r, real=m, reset_to=rt)

    return jax.lax.cond(jnp.all(used <= NC), fast, slow, args)


def _chunked(rule, form, outer, W0, state, q, k, v, log_ret, lr, log_mom, gamma, extra, pos, reset,
             real, NC, reset_to=None):
    B, T, H, dk = q.shape
    b, c = rule.chunk, rule.window
    N = NC * b
    log_mom, gamma = ref.fill_defaults(rule, lr, log_mom, gamma)
    slot, doc, _ = layout(pos, reset, real, b, NC)
    f32 = upcast
    sc = lambda a: _scatter(a, slot, N)
    # inert slots (`live` False): no decay (log 0), no momentum decay, no write
    real_b = real[:, :, None]
    q_s, lr_s = sc(f32(q)), sc(jnp.where(real_b, f32(lr), 0.0))
    lret_s = sc(jnp.where(real_b, f32(log_ret), 0.0))
    lmom_s = sc(jnp.where(real_b, f32(log_mom), 0.0))
    gam_s = sc(f32(gamma))
    sdoc = sc(doc)
    # chunk flags: document start at the chunk's first slot; chunk completed inside the call
    cidx = jnp.where(real, slot // b, NC)
    bidx = jnp.arange(B)[:, None]
    rst = jnp.zeros((B, NC), bool).at[bidx, cidx].max(reset, mode="drop")
    comp = jnp.zeros((B, NC), bool).at[bidx, cidx].max((pos + 1) % b == 0, mode="drop")
    # window sources: carried buffer at ext index r + m, tokens at slot + c - 1
    c1 = c - 1
    r0 = pos[:, 0] % b
    eslot = jnp.where(real, slot + c1, c1 + N)
    bslot = r0[:, None] + jnp.arange(c1)[None, :]  # [B, c-1]
    E = c1 + N

    def ext(tok, buf):  # tok [B, T, H, ...], buf [B, H, c-1, ...] -> [B, E, H, ...]
        dt = jnp.promote_types(upcast(tok).dtype, buf.dtype)
        out = jnp.zeros((B, E) + tok.shape[2:], dt)
        out = out.at[bidx, bslot].set(jnp.moveaxis(buf, 2, 1).astype(dt), mode="drop")
        return out.at[bidx, eslot].set(tok.astype(dt), mode="drop")

    ek, ev = ext(k, state.win_k), ext(v, state.win_v)
    ex = jax.tree.map(ext, extra, state.win_extra)
    evalid = jnp.zeros((B, E), bool).at[bidx, bslot].set(state.win_valid, mode="drop")
    evalid = evalid.at[bidx, eslot].set(real, mode="drop")
    edoc = jnp.zeros((B, E), jnp.int32).at[bidx, eslot].set(doc, mode="drop")

    rW, rS, rA = ref.reset_target(W0, state, reset_to)
    per_head = jax.vmap(lambda *a: _head_chunks(rule, form, *a),
                        in_axes=(0,) * 7 + (1,) * 5 + (None,) * 2 + (1,) * 3 + (None,) * 4,
                        out_axes=(1, 0, 0, 0))
    per_row = jax.vmap(per_head, in_axes=(None,) + (0,) * 20)
    y_s, W, S, anc = per_row(outer, rW, rS, rA, state.W, state.S, state.anchor, q_s, lr_s, lret_s, lmom_s,
                             gam_s, sc(real), sdoc, ek, ev, ex, evalid, edoc, rst, comp)
    y = jnp.take_along_axis(y_s, jnp.minimum(slot, N - 1)[:, :, None, None], axis=1)
    y = jnp.where(real[:, :, None, None], y, 0.0)
    # new window buffer: the c-1 ext entries ending at the last real token
    n_real = real.sum(axis=1).astype(jnp.int32)
    last_slot = jnp.take_along_axis(slot, jnp.maximum(n_real - 1, 0)[:, None], axis=1)[:, 0]
    last_ext = jnp.where(n_real > 0, last_slot + c1, r0 + c1 - 1)
    idx = last_ext[:, None] - (c1 - 1) + jnp.arange(c1)[None, :]  # [B, c-1]
    last_doc = jnp.take_along_axis(doc, jnp.maximum(n_real - 1, 0)[:, None], axis=1)[:, 0]
    take = lambda a: jnp.moveaxis(jnp.take_along_axis(
        a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1), 1, 2)
    win_valid = (jnp.take_along_axis(evalid, idx, axis=1)
                 & (jnp.take_along_axis(edoc, idx, axis=1) == last_doc[:, None]))
    new = ref.MemoryState(W=W, S=S, anchor=anc, win_k=take(ek), win_v=take(ev),
                          win_extra=jax.tree.map(take, ex), win_valid=win_valid)
    return y, new
