"""The gated delta rule as Pallas kernels: the forward and its backward in a `jax.custom_vjp`,
the same function as `reference.gated_delta` (per head, row vectors, S [dk, dv]):

    S ← e^{g_t} S;   S ← S + β_t k_tᵀ (v_t − k_t S);   o_t = scale q_t S     (read after the update)

One program per (batch, head) walks the tokens in chunks of `block` (float32 state in registers
whatever the input dtype) and writes the state at every chunk start: the residual of the
backward, which walks the chunks in reverse, recomputes each chunk's per-token states from its
start state and runs the exact token-level adjoint (M_t = e^{g_t}(I − β_t k_tᵀk_t) is
symmetric):

    D = dS + scale q_tᵀ do_t        dq_t = scale S_t do_tᵀ        y = β_t k_t D
    dv_t = y    dβ_t = (k_t D)·e_t    dk_t = β_t D e_tᵀ − S̃ yᵀ    da = ⟨D − k_tᵀ y, S_{t−1}⟩
    dS_{t−1} = e^{g_t} (D − k_tᵀ y),  dg_t = e^{g_t} da        (S̃ = e^{g_t} S_{t−1}, e = v − k S̃)

Ragged lengths are padded with inert tokens (g = 0, β = 0: the state passes unchanged).
`block` never changes the function. This first kernel is token-sequential inside its chunks
(the form the adjoint needs); the UT-transform chunk form of `chunked.py` inside the kernel is
the speed work that follows it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.harness import (
    call,
    mm,
    outer,
    over_mesh,
    round_up,
    token_row,
    token_scalar,
)

Array = jax.Array


def _token(S, q, k, v, g, b, scale):
    """One token: (S_t, o_t, e_t, S̃) from S_{t−1}."""
    Sa = jnp.exp(g)[:, None] * S
    e = v - mm(k, Sa)
    S = Sa + b[:, None] * outer(k, e)
    return S, scale * mm(q, S), e, Sa


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s0_ref, o_ref, sT_ref, st_ref, *, C: int,
                n: int, scale: float):
    def chunk(c, S):
        st_ref[0, 0, c] = S

        def tok(j, S):
            t = c * C + j
            S, o, _, _ = _token(S, token_row(q_ref, t), token_row(k_ref, t), token_row(v_ref, t),
                                token_scalar(g_ref, 0, t), token_scalar(b_ref, 0, t), scale)
            o_ref[0, 0, pl.ds(t, 1), :] = o.astype(o_ref.dtype)
            return S
        return jax.lax.fori_loop(0, C, tok, S)

    S = jax.lax.fori_loop(0, n, chunk, s0_ref[0, 0].astype(jnp.float32))
    sT_ref[0, 0] = S


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, st_ref, do_ref, dsT_ref, dq_ref, dk_ref,
                dv_ref, dg_ref, db_ref, ds0_ref, *, C: int, n: int, scale: float):
    dk_, dv_ = st_ref.shape[-2], st_ref.shape[-1]
    idx = jax.lax.broadcasted_iota(jnp.int32, (C, dk_, dv_), 0)

    def chunk(i, dS):
        c = n - 1 - i

        def fill(j, carry):                     # the states before each token of the chunk
            S, states = carry
            t = c * C + j
            states = jnp.where(idx == j, S[None], states)
            S = _token(S, token_row(q_ref, t), token_row(k_ref, t), token_row(v_ref, t), token_scalar(g_ref, 0, t),
                       token_scalar(b_ref, 0, t), scale)[0]
            return S, states
        _, states = jax.lax.fori_loop(0, C, fill, (st_ref[0, 0, c],
                                                   jnp.zeros((C, dk_, dv_), jnp.float32)))

        def tok(jj, dS):
            j = C - 1 - jj
            t = c * C + j
            prev = jnp.sum(jnp.where(idx == j, states, 0.0), axis=0)
            q, k, v = token_row(q_ref, t), token_row(k_ref, t), token_row(v_ref, t)
            g, b = token_scalar(g_ref, 0, t), token_scalar(b_ref, 0, t)
            S, _, e, Sa = _token(prev, q, k, v, g, b, scale)
            do = token_row(do_ref, t)
            D = dS + scale * outer(q, do)
            y = b[:, None] * mm(k, D)                                   # [1, dv]
            dq_ref[0, 0, pl.ds(t, 1), :] = (scale * jax.lax.dot_general(
                do, S, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ).astype(dq_ref.dtype)
            dv_ref[0, 0, pl.ds(t, 1), :] = y.astype(dv_ref.dtype)
            db_ref[0, 0, 0, pl.ds(t, 1)] = jnp.sum(mm(k, D) * e, axis=1).astype(db_ref.dtype)
            dk = (b[:, None] * jax.lax.dot_general(e, D, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32)
                  - jax.lax.dot_general(y, Sa, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32))
            dk_ref[0, 0, pl.ds(t, 1), :] = dk.astype(dk_ref.dtype)
            dSa = D - outer(k, y)
            a = jnp.exp(g)
            dg_ref[0, 0, 0, pl.ds(t, 1)] = (a * jnp.sum(dSa * prev)[None]).astype(dg_ref.dtype)
            return a[:, None] * dSa
        return jax.lax.fori_loop(0, C, tok, dS)

    ds0_ref[0, 0] = jax.lax.fori_loop(0, n, chunk, dsT_ref[0, 0].astype(jnp.float32))


def _specs(Tp, dk, dv, n):
    tok = lambda d: pl.BlockSpec((1, 1, Tp, d), lambda b, h: (b, h, 0, 0))    # noqa: E731
    vec = pl.BlockSpec((1, 1, 1, Tp), lambda b, h: (b, h, 0, 0))
    state = pl.BlockSpec((1, 1, dk, dv), lambda b, h: (b, h, 0, 0))
    states = pl.BlockSpec((1, 1, n, dk, dv), lambda b, h: (b, h, 0, 0, 0))
    return tok, vec, state, states


def _forward(cfg, q, k, v, g, b, s0):
    backend, C, scale = cfg
    B, H, Tp, dk = q.shape
    dv, n = v.shape[-1], Tp // C
    tok, vec, state, states = _specs(Tp, dk, dv, n)
    return call(functools.partial(_fwd_kernel, C=C, n=n, scale=scale), backend=backend,
                grid=(B, H), name="gated_delta_fwd",
                in_specs=[tok(dk), tok(dk), tok(dv), vec, vec, state],
                out_specs=[tok(dv), state, states],
                out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dv), q.dtype),
                           jax.ShapeDtypeStruct((B, H, dk, dv), jnp.float32),
                           jax.ShapeDtypeStruct((B, H, n, dk, dv), jnp.float32)])(
        q, k, v, g, b, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gd(cfg, q, k, v, g, b, s0):
    o, sT, _ = _forward(cfg, q, k, v, g, b, s0)
    return o, sT


def _gd_fwd(cfg, q, k, v, g, b, s0):
    o, sT, st = _forward(cfg, q, k, v, g, b, s0)
    return (o, sT), (q, k, v, g, b, st, s0)


def _gd_bwd(cfg, res, cot):
    backend, C, scale = cfg
    q, k, v, g, b, st, s0 = res
    do, dsT = cot
    B, H, Tp, dk = q.shape
    dv, n = v.shape[-1], Tp // C
    tok, vec, state, states = _specs(Tp, dk, dv, n)
    dq, dk_, dv_, dg, db, ds0 = call(
        functools.partial(_bwd_kernel, C=C, n=n, scale=scale), backend=backend, grid=(B, H),
        name="gated_delta_bwd",
        in_specs=[tok(dk), tok(dk), tok(dv), vec, vec, states, tok(dv), state],
        out_specs=[tok(dk), tok(dk), tok(dv), vec, vec, state],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(g.shape, g.dtype),
                   jax.ShapeDtypeStruct(b.shape, b.dtype),
                   jax.ShapeDtypeStruct(s0.shape, s0.dtype)])(
        q, k, v, g, b, st, do.astype(jnp.float32), dsT.astype(jnp.float32))
    return dq, dk_, dv_, dg, db, ds0


_gd.defvjp(_gd_fwd, _gd_bwd)


def gated_delta(q: Array, k: Array, v: Array, g: Array, beta: Array, *, scale: float,
                initial_state: Array | None = None, block: int = 16,
                backend: str = "interpret") -> tuple[Array, Array]:
    """`reference.gated_delta` (q, k [B, T, H, dk]; v [B, T, H, dv]; g, beta [B, T, H];
    initial_state [B, H, dk, dv]) by the kernels; o in q's dtype, the final state in float32."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    C = max(1, min(block, T))
    Tp = round_up(T, C)

    def heads_first(x):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, [(0, 0), (0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 3))

    s0 = (jnp.zeros((B, H, dk, dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    args = (heads_first(q), heads_first(k), heads_first(v), heads_first(g)[:, :, None, :],
            heads_first(beta)[:, :, None, :], s0)
    o, sT = over_mesh(lambda *a: _gd((backend, C, float(scale)), *a), args, ("bh",) * 6,
                      ("bh", "bh"), batch=B, heads=(H,))
    return jnp.swapaxes(o[:, :, :T], 1, 2), sT
