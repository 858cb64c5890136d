"""Gated linear attention (and plain linear attention) as Pallas kernels: the forward and its
backward in a `jax.custom_vjp`, the same function as `reference.gla` (per head, row vectors,
S [dk, dv] in float32 whatever the input dtype):

    S_t = diag(e^{g_t}) S_{t−1} + k_tᵀ v_t      o_t = scale q_t S_t      (g = 0 without decay)

The log-decay is read as a [dk, 1] column of a key-major [B, H, dk, T] array (it scales the rows
of S: no transpose inside the kernel). One program per (batch, head) walks the tokens in blocks
of `block` and writes S at every block start: the residual of the backward, which walks the
blocks in reverse, recomputes each block's states and runs the exact token adjoint (D the
cotangent of S_t):

    D = dS + scale q_tᵀ do_t     dq_t = scale do_t S_tᵀ     dk_t = v_t Dᵀ     dv_t = k_t D
    dg_t = e^{g_t} ⊙ rowsum(D ⊙ S_{t−1})     dS_{t−1} = diag(e^{g_t}) D

Ragged lengths are padded with inert tokens (k = v = 0, g = 0). `block` never changes the
function. Token-sequential (the recurrence's order); the chunk-parallel body inside the kernel
is the speed work that follows.
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
)

Array = jax.Array


def _gcol(ref, t):
    return ref[0, 0, :, pl.ds(t, 1)].astype(jnp.float32)            # [dk, 1]


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, sT_ref, st_ref, *, C: int, n: int,
                scale: float):
    def blk(c, S):
        st_ref[0, 0, c] = S

        def tok(j, S):
            t = c * C + j
            S = jnp.exp(_gcol(g_ref, t)) * S + outer(token_row(k_ref, t), token_row(v_ref, t))
            o_ref[0, 0, pl.ds(t, 1), :] = (scale * mm(token_row(q_ref, t), S)).astype(o_ref.dtype)
            return S
        return jax.lax.fori_loop(0, C, tok, S)

    sT_ref[0, 0] = jax.lax.fori_loop(0, n, blk, s0_ref[0, 0].astype(jnp.float32))


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, st_ref, do_ref, dsT_ref, dq_ref, dk_ref, dv_ref,
                dg_ref, ds0_ref, *, C: int, n: int, scale: float):
    dk_, dv_ = st_ref.shape[-2], st_ref.shape[-1]
    idx = jax.lax.broadcasted_iota(jnp.int32, (C, dk_, dv_), 0)

    def blk(i, dS):
        c = n - 1 - i

        def fill(j, carry):                     # the states before each token of the block
            S, states = carry
            t = c * C + j
            states = jnp.where(idx == j, S[None], states)
            S = jnp.exp(_gcol(g_ref, t)) * S + outer(token_row(k_ref, t), token_row(v_ref, t))
            return S, states
        _, states = jax.lax.fori_loop(0, C, fill, (st_ref[0, 0, c],
                                                   jnp.zeros((C, dk_, dv_), jnp.float32)))

        def tok(jj, dS):
            j = C - 1 - jj
            t = c * C + j
            prev = jnp.sum(jnp.where(idx == j, states, 0.0), axis=0)
            q, k, v, a = token_row(q_ref, t), token_row(k_ref, t), token_row(v_ref, t), jnp.exp(_gcol(g_ref, t))
            S = a * prev + outer(k, v)
            do = token_row(do_ref, t)
            D = dS + scale * outer(q, do)
            dq_ref[0, 0, pl.ds(t, 1), :] = (scale * mm_t(do, S)).astype(dq_ref.dtype)
            dk_ref[0, 0, pl.ds(t, 1), :] = mm_t(v, D).astype(dk_ref.dtype)
            dv_ref[0, 0, pl.ds(t, 1), :] = mm(k, D).astype(dv_ref.dtype)
            dg_ref[0, 0, :, pl.ds(t, 1)] = (a * jnp.sum(D * prev, axis=1, keepdims=True)).astype(
                dg_ref.dtype)
            return a * D
        return jax.lax.fori_loop(0, C, tok, dS)

    ds0_ref[0, 0] = jax.lax.fori_loop(0, n, blk, dsT_ref[0, 0].astype(jnp.float32))


def _specs(Tp, dk, dv, n):
    tok = lambda d: pl.BlockSpec((1, 1, Tp, d), lambda b, h: (b, h, 0, 0))    # noqa: E731
    gk = pl.BlockSpec((1, 1, dk, Tp), lambda b, h: (b, h, 0, 0))
    state = pl.BlockSpec((1, 1, dk, dv), lambda b, h: (b, h, 0, 0))
    states = pl.BlockSpec((1, 1, n, dk, dv), lambda b, h: (b, h, 0, 0, 0))
    return tok, gk, state, states


def _forward(cfg, q, k, v, g, s0):
    backend, C, scale = cfg
    B, H, Tp, dk = q.shape
    dv, n = v.shape[-1], Tp // C
    tok, gk, state, states = _specs(Tp, dk, dv, n)
    return call(functools.partial(_fwd_kernel, C=C, n=n, scale=scale), backend=backend,
                grid=(B, H), name="gla_fwd", in_specs=[tok(dk), tok(dk), tok(dv), gk, state],
                out_specs=[tok(dv), state, states],
                out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dv), q.dtype),
                           jax.ShapeDtypeStruct((B, H, dk, dv), jnp.float32),
                           jax.ShapeDtypeStruct((B, H, n, dk, dv), jnp.float32)])(q, k, v, g, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gla(cfg, q, k, v, g, s0):
    o, sT, _ = _forward(cfg, q, k, v, g, s0)
    return o, sT


def _gla_fwd(cfg, q, k, v, g, s0):
    o, sT, st = _forward(cfg, q, k, v, g, s0)
    return (o, sT), (q, k, v, g, st)


def _gla_bwd(cfg, res, cot):
    backend, C, scale = cfg
    q, k, v, g, st = res
    do, dsT = cot
    B, H, Tp, dk = q.shape
    dv, n = v.shape[-1], Tp // C
    tok, gk, state, states = _specs(Tp, dk, dv, n)
    S = jax.ShapeDtypeStruct
    dq, dk_, dv_, dg, ds0 = call(
        functools.partial(_bwd_kernel, C=C, n=n, scale=scale), backend=backend, grid=(B, H),
        name="gla_bwd", in_specs=[tok(dk), tok(dk), tok(dv), gk, states, tok(dv), state],
        out_specs=[tok(dk), tok(dk), tok(dv), gk, state],
        out_shape=[S(q.shape, q.dtype), S(k.shape, k.dtype), S(v.shape, v.dtype),
                   S(g.shape, g.dtype), S((B, H, dk, dv), jnp.float32)])(
        q, k, v, g, st, do.astype(jnp.float32), dsT.astype(jnp.float32))
    return dq, dk_, dv_, dg, ds0


_gla.defvjp(_gla_fwd, _gla_bwd)


def gla(q: Array, k: Array, v: Array, g: Array | None = None, *, scale: float,
        initial_state: Array | None = None, block: int = 16,
        backend: str = "interpret") -> tuple[Array, Array]:
    """`reference.gla` (q, k [B, T, H, dk]; v [B, T, H, dv]; g [B, T, H, dk] or None;
    initial_state [B, H, dk, dv]) by the kernels; o in q's dtype, the final state in float32."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    C = max(1, min(block, T))
    Tp = round_up(T, C)

    def heads_first(x):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, [(0, 0), (0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 3))

    gf = jnp.zeros((B, T, H, dk), jnp.float32) if g is None else g.astype(jnp.float32)
    s0 = (jnp.zeros((B, H, dk, dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    args = (heads_first(q), heads_first(k), heads_first(v), jnp.swapaxes(heads_first(gf), 2, 3),
            s0)
    o, sT = over_mesh(lambda *a: _gla((backend, C, float(scale)), *a), args, ("bh",) * 5,
                      ("bh", "bh"), batch=B, heads=(H,))
    return jnp.swapaxes(o[:, :, :T], 1, 2), sT
