"""The neural-memory op as Pallas kernels, for the matrix memory: the forward and its backward in
a `jax.custom_vjp`, the same function as `reference.neural_memory` for the rules `kernel_error`
accepts (a `Layered` memory of one bias-free linear layer `y = x W[w]`, the l2 objective, window
1, no update transform, no link: Titans' linear LMM). Per head, row vectors, W, S, A [dk, dv]:

    document start:  (W, S, A) <- the reset target (rW, rS, rA)
    e_t  = k_t A − v_t                      (l2 signal at the anchor A, the chunk-start state)
    S_t  = e^{lm_t} S + c_in_t k_tᵀ e_t     (momentum; c_in = −θ inside, +1 outside: ATLAS)
    W_t  = e^{lr_t} W + c_out_t S_t         (forget gate; c_out = 1 or −θ)
    y_t  = q_t W_t                          (read after the write)
    A    <- W_t after the last token of an anchor chunk ((pos_t + 1) mod chunk == 0)
    pads (real = 0): the state passes unchanged, y = 0.

One program per (batch, head) walks the tokens in blocks of `block` (float32 state whatever the
input dtype) and writes (W, S, A) at every block start: the residual of the backward, which walks
the blocks in reverse, recomputes each block's per-token states and runs the exact token
adjoint (with ρ = real, a = anchor flag, r = e^{lr}, m = e^{lm}; `d·` the cotangents of the
token's output state, dy of its read):

    dW₁ = ρ (dW + q_tᵀ dy_t) + ρ a dA    dS₁ = ρ dS + c_out dW₁    du = c_in dS₁
    dWr = (1 − ρ) dW + r dW₁             dSr = (1 − ρ) dS + m dS₁
    dAr = (1 − ρ) dA + ρ (1 − a) dA + k_tᵀ de,  de = k_t du        dv_t = −de
    dk_t = e_t duᵀ + de Arᵀ   dq_t = ρ dy_t W₁ᵀ   dc_in = ⟨dS₁, u⟩   dc_out = ⟨dW₁, S₁⟩
    dlm = m ⟨dS₁, Sr⟩   dlr = r ⟨dW₁, Wr⟩;  a document start sends (dWr, dSr, dAr) to the
    reset target's cotangent instead of the previous state's.

The anchor chunk is part of the model and is read from `pos`, so `block` never changes the
function (a call may start or stop mid-chunk). Token-sequential inside the blocks (the form the
adjoint needs); a chunk-parallel (dual form) body is the speed work that follows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.harness import (
    call,
    mm,
    mm_t,
    outer,
    over_mesh,
    round_up,
    token_row,
    token_scalar,
)
from pallas_kernels.neural_memory import reference as ref

Array = jax.Array
# the per-token scalars, rows of one [B, H, N_COEF, T] input
CIN, COUT, LMOM, LRET, ANCHOR, RESET, REAL = range(7)
N_COEF, N_DIFF = 7, 4                      # the first four are differentiable


def kernel_error(rule: ref.MemoryRule) -> str | None:
    """Why the kernels cannot run `rule` (None: they can)."""
    lay = getattr(rule.memory_fn, "layered", None)
    if lay is None or len(lay.names or ()) != 1 or lay.act is not None or lay.head is not None:
        return "its memory is not the matrix memory y = x W (memory='linear')"
    if rule.signal_fn is not ref.l2_signal:
        return "its objective is not l2"
    if rule.window != 1:
        return f"its window is {rule.window} (the kernel covers window 1)"
    if rule.transform_fn is not None or rule.link_fn is not None:
        return "it has an update transform or a link"
    return None


def _coefs(c_ref, t):
    return tuple(token_scalar(c_ref, i, t)[:, None] for i in range(N_COEF))      # each [1, 1]


def _token(state, target, q, k, v, c):
    """One token: the output state and the intermediates of the adjoint."""
    W, S, A = state
    cin, cout, lm, lr, af, rt, rho = c
    Wr, Sr, Ar = (jnp.where(rt > 0, x, y) for x, y in zip(target, state))
    e = mm(k, Ar) - v
    u = outer(k, e)
    m, r = jnp.exp(lm), jnp.exp(lr)
    S1 = m * Sr + cin * u
    W1 = r * Wr + cout * S1
    y = rho * mm(q, W1)
    A1 = jnp.where(af > 0, W1, Ar)
    new = tuple(jnp.where(rho > 0, a, b) for a, b in zip((W1, S1, A1), (Wr, Sr, Ar)))
    return new, y, (Wr, Sr, Ar, e, u, S1, W1, m, r)


def _fwd_kernel(q_ref, k_ref, v_ref, c_ref, s0_ref, tg_ref, y_ref, sT_ref, st_ref, *, C: int,
                n: int):
    target = tuple(tg_ref[0, 0, i].astype(jnp.float32) for i in range(3))

    def block(c, state):
        for i in range(3):
            st_ref[0, 0, c, i] = state[i]

        def tok(j, state):
            t = c * C + j
            state, y, _ = _token(state, target, token_row(q_ref, t), token_row(k_ref, t), token_row(v_ref, t),
                                 _coefs(c_ref, t))
            y_ref[0, 0, pl.ds(t, 1), :] = y.astype(y_ref.dtype)
            return state
        return jax.lax.fori_loop(0, C, tok, state)

    state = jax.lax.fori_loop(0, n, block, tuple(s0_ref[0, 0, i].astype(jnp.float32)
                                                 for i in range(3)))
    for i in range(3):
        sT_ref[0, 0, i] = state[i]


def _bwd_kernel(q_ref, k_ref, v_ref, c_ref, tg_ref, st_ref, dy_ref, dsT_ref, dq_ref, dk_ref,
                dv_ref, dc_ref, ds0_ref, dtg_ref, *, C: int, n: int):
    dk_, dv_ = st_ref.shape[-2], st_ref.shape[-1]
    target = tuple(tg_ref[0, 0, i].astype(jnp.float32) for i in range(3))
    idx = jax.lax.broadcasted_iota(jnp.int32, (C, dk_, dv_), 0)

    def block(i, carry):
        c = n - 1 - i

        def fill(j, fc):                        # the states before each token of the block
            state, states = fc
            t = c * C + j
            states = tuple(jnp.where(idx == j, s[None], ss) for s, ss in zip(state, states))
            state = _token(state, target, token_row(q_ref, t), token_row(k_ref, t), token_row(v_ref, t),
                           _coefs(c_ref, t))[0]
            return state, states
        start = tuple(st_ref[0, 0, c, s] for s in range(3))
        zeros = jnp.zeros((C, dk_, dv_), jnp.float32)
        _, states = jax.lax.fori_loop(0, C, fill, (start, (zeros, zeros, zeros)))

        def tok(jj, carry):
            dW, dS, dA, dtW, dtS, dtA = carry
            j = C - 1 - jj
            t = c * C + j
            prev = tuple(jnp.sum(jnp.where(idx == j, ss, 0.0), axis=0) for ss in states)
            q, k = token_row(q_ref, t), token_row(k_ref, t)
            co = _coefs(c_ref, t)
            cin, cout, _, _, af, rt, rho = co
            _, _, (Wr, Sr, Ar, e, u, S1, W1, m, r) = _token(prev, target, q, k, token_row(v_ref, t),
                                                            co)
            dy = token_row(dy_ref, t)
            dA1 = rho * dA
            dW1 = rho * (dW + outer(q, dy)) + af * dA1
            dS1 = rho * dS + cout * dW1
            du = cin * dS1
            de = mm(k, du)                                               # [1, dv]
            dWr = (1 - rho) * dW + r * dW1
            dSr = (1 - rho) * dS + m * dS1
            dAr = (1 - rho) * dA + (1 - af) * dA1 + outer(k, de)
            dq_ref[0, 0, pl.ds(t, 1), :] = (rho * mm_t(dy, W1)).astype(dq_ref.dtype)
            dk_ref[0, 0, pl.ds(t, 1), :] = (mm_t(e, du) + mm_t(de, Ar)).astype(dk_ref.dtype)
            dv_ref[0, 0, pl.ds(t, 1), :] = (-de).astype(dv_ref.dtype)
            for row, val in ((CIN, jnp.sum(dS1 * u)), (COUT, jnp.sum(dW1 * S1)),
                             (LMOM, m[0, 0] * jnp.sum(dS1 * Sr)),
                             (LRET, r[0, 0] * jnp.sum(dW1 * Wr))):
                dc_ref[0, 0, row, pl.ds(t, 1)] = val[None].astype(dc_ref.dtype)
            reset = rt > 0
            dtW, dtS, dtA = (dt + jnp.where(reset, d, 0.0)
                             for dt, d in ((dtW, dWr), (dtS, dSr), (dtA, dAr)))
            dW, dS, dA = (jnp.where(reset, 0.0, d) for d in (dWr, dSr, dAr))
            return dW, dS, dA, dtW, dtS, dtA
        return jax.lax.fori_loop(0, C, tok, carry)

    zero = jnp.zeros((dk_, dv_), jnp.float32)
    out = jax.lax.fori_loop(0, n, block, tuple(dsT_ref[0, 0, i] for i in range(3))
                            + (zero, zero, zero))
    for i in range(3):
        ds0_ref[0, 0, i] = out[i]
        dtg_ref[0, 0, i] = out[3 + i]


def _specs(Tp, dk, dv, n):
    tok = lambda d: pl.BlockSpec((1, 1, Tp, d), lambda b, h: (b, h, 0, 0))    # noqa: E731
    coef = lambda r: pl.BlockSpec((1, 1, r, Tp), lambda b, h: (b, h, 0, 0))   # noqa: E731
    state = pl.BlockSpec((1, 1, 3, dk, dv), lambda b, h: (b, h, 0, 0, 0))
    states = pl.BlockSpec((1, 1, n, 3, dk, dv), lambda b, h: (b, h, 0, 0, 0, 0))
    return tok, coef, state, states


def _forward(cfg, q, k, v, c, s0, tg):
    backend, C = cfg
    B, H, Tp, dk = q.shape
    dv, n = v.shape[-1], Tp // C
    tok, coef, state, states = _specs(Tp, dk, dv, n)
    f32 = jnp.float32
    return call(functools.partial(_fwd_kernel, C=C, n=n), backend=backend, grid=(B, H),
                name="neural_memory_fwd",
                in_specs=[tok(dk), tok(dk), tok(dv), coef(N_COEF), state, state],
                out_specs=[tok(dv), state, states],
                out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dv), f32),
                           jax.ShapeDtypeStruct((B, H, 3, dk, dv), f32),
                           jax.ShapeDtypeStruct((B, H, n, 3, dk, dv), f32)])(q, k, v, c, s0, tg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nm(cfg, q, k, v, c, s0, tg):
    y, sT, _ = _forward(cfg, q, k, v, c, s0, tg)
    return y, sT


def _nm_fwd(cfg, q, k, v, c, s0, tg):
    y, sT, st = _forward(cfg, q, k, v, c, s0, tg)
    return (y, sT), (q, k, v, c, tg, st)


def _nm_bwd(cfg, res, cot):
    backend, C = cfg
    q, k, v, c, tg, st = res
    dy, dsT = cot
    B, H, Tp, dk = q.shape
    dv, n = v.shape[-1], Tp // C
    tok, coef, state, states = _specs(Tp, dk, dv, n)
    S = jax.ShapeDtypeStruct
    dq, dk_, dv_, dc, ds0, dtg = call(
        functools.partial(_bwd_kernel, C=C, n=n), backend=backend, grid=(B, H),
        name="neural_memory_bwd",
        in_specs=[tok(dk), tok(dk), tok(dv), coef(N_COEF), state, states, tok(dv), state],
        out_specs=[tok(dk), tok(dk), tok(dv), coef(N_COEF), state, state],
        out_shape=[S(q.shape, q.dtype), S(k.shape, k.dtype), S(v.shape, v.dtype),
                   S(c.shape, c.dtype), S(tg.shape, jnp.float32), S(tg.shape, jnp.float32)])(
        q, k, v, c, tg, st, dy.astype(jnp.float32), dsT.astype(jnp.float32))
    # the flags (anchor, reset, real) are not differentiable: their rows of dc stay unwritten
    dc = jnp.where(jnp.arange(N_COEF)[:, None] < N_DIFF, dc, 0.0)
    return dq, dk_, dv_, dc, ds0, dtg.astype(tg.dtype)


_nm.defvjp(_nm_fwd, _nm_bwd)


def neural_memory(rule: ref.MemoryRule, outer, W0, state: ref.MemoryState, q, k, v, *, log_ret,
                  lr, log_mom=None, gamma=None, extra=None, pos, reset, real, reset_to=None,
                  block: int = 64, backend: str = "interpret", **unused):
    """`reference.neural_memory` by the kernels, for a rule `kernel_error` accepts (else one
    ValueError line). Returns (y [B, T, H, dv] float32, the new MemoryState)."""
    del unused, outer, extra
    err = kernel_error(rule)
    if err:
        raise ValueError(f"neural_memory: the Pallas kernel cannot run this memory: {err}")
    B, T, H, dk = q.shape
    log_mom, gamma = ref.fill_defaults(rule, lr, log_mom, gamma)
    cin, cout = rule.coefficients(lr.astype(jnp.float32))
    cin = cin * gamma[..., 0]                       # window 1: U_t = gamma[t, 0] u_t
    flags = lambda x: jnp.broadcast_to(x.astype(jnp.float32)[..., None], (B, T, H))  # noqa: E731
    coefs = jnp.stack([cin, cout, log_mom.astype(jnp.float32), log_ret.astype(jnp.float32),
                       flags((pos + 1) % rule.chunk == 0), flags(reset), flags(real)], -1)
    rW, rS, rA = ref.reset_target(W0, state, reset_to)
    (key,) = rule.memory_fn.layered.names
    s0 = jnp.stack([state.W[key], state.S[key], state.anchor[key]], 2).astype(jnp.float32)
    tg = jnp.stack([rW[key], rS[key], rA[key]], 2).astype(jnp.float32)
    C = max(1, min(block, T))
    Tp = round_up(T, C)

    def heads_first(x):                  # [B, T, H, ...] -> [B, H, Tp, ...], pads inert (real 0)
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, [(0, 0), (0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 3))
    c = jnp.swapaxes(heads_first(coefs), 2, 3)                             # [B, H, 7, Tp]
    f32 = lambda x: heads_first(x.astype(jnp.float32))                    # noqa: E731
    y, sT = over_mesh(lambda *a: _nm((backend, C), *a), (f32(q), f32(k), f32(v), c, s0, tg),
                      ("bh",) * 6, ("bh", "bh"), batch=B, heads=(H,))
    W, S, A = ({key: sT[:, :, i].astype(state.W[key].dtype)} for i in range(3))
    new = ref.MemoryState(W=W, S=S, anchor=A, win_k=state.win_k, win_v=state.win_v,
                          win_extra=state.win_extra, win_valid=state.win_valid)
    return jnp.swapaxes(y[:, :, :T], 1, 2), new
