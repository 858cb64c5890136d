"""Mamba-2's SSD recurrence as Pallas kernels: the forward and its backward in a
`jax.custom_vjp`, the same function as `reference.ssd` (per batch row and head, S [P, N] in
float32 whatever the input dtype; B and C are expanded from their groups to the heads outside,
so their gradients sum back over a group's heads there):

    a_t = (1 − reset_t) e^{dt_t A}      S_t = a_t S_{t−1} + dt_t x_tᵀ B_t      y_t = C_t S_tᵀ

The per-token scalars (dt, the keep flag 1 − reset, and A broadcast) are rows of one
[B, H, 3, T] input, so A's gradient is its row's sum. One program per (batch, head) walks the
tokens in blocks of `block` and writes S at every block start: the residual of the backward,
which walks the blocks in reverse, recomputes each block's states and runs the exact token
adjoint (G the cotangent of S_t):

    G = dS + dy_tᵀ C_t     dx_t = dt B_t Gᵀ     dB_t = dt x_t G     dC_t = dy_t S_t
    dΣ = ⟨G, S_{t−1}⟩ a_t   ddt_t = ⟨G, x_tᵀ B_t⟩ + A dΣ   dA += dt dΣ   dS_{t−1} = a_t G

Ragged lengths are padded with dt = 0 and x = B = C = 0 (decay 1, no input). `block` never
changes the function. Token-sequential; the chunked dual form inside the kernel is the speed work
that follows.
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
from pallas_kernels.ssd.reference import heads_of_groups

Array = jax.Array
DT, KEEP, AH = range(3)


def _token(S, x, b, c_ref, t):
    dt, keep, A = token_scalar(c_ref, DT, t)[:, None], token_scalar(c_ref, KEEP, t)[:, None], token_scalar(c_ref, AH, t)[:, None]
    a = keep * jnp.exp(dt * A)
    xb = outer(x, b)
    return a * S + dt * xb, (a, dt, A, xb)


def _fwd_kernel(x_ref, b_ref, cm_ref, c_ref, s0_ref, y_ref, sT_ref, st_ref, *, C: int, n: int):
    def blk(i, S):
        st_ref[0, 0, i] = S

        def tok(j, S):
            t = i * C + j
            S, _ = _token(S, token_row(x_ref, t), token_row(b_ref, t), c_ref, t)
            y_ref[0, 0, pl.ds(t, 1), :] = mm_t(token_row(cm_ref, t), S).astype(y_ref.dtype)
            return S
        return jax.lax.fori_loop(0, C, tok, S)

    sT_ref[0, 0] = jax.lax.fori_loop(0, n, blk, s0_ref[0, 0].astype(jnp.float32))


def _bwd_kernel(x_ref, b_ref, cm_ref, c_ref, st_ref, dy_ref, dsT_ref, dx_ref, db_ref, dcm_ref,
                dc_ref, ds0_ref, *, C: int, n: int):
    P, N = st_ref.shape[-2], st_ref.shape[-1]
    idx = jax.lax.broadcasted_iota(jnp.int32, (C, P, N), 0)

    def blk(ii, dS):
        i = n - 1 - ii

        def fill(j, fc):
            S, states = fc
            t = i * C + j
            states = jnp.where(idx == j, S[None], states)
            S = _token(S, token_row(x_ref, t), token_row(b_ref, t), c_ref, t)[0]
            return S, states
        _, states = jax.lax.fori_loop(0, C, fill, (st_ref[0, 0, i],
                                                   jnp.zeros((C, P, N), jnp.float32)))

        def tok(jj, dS):
            j = C - 1 - jj
            t = i * C + j
            prev = jnp.sum(jnp.where(idx == j, states, 0.0), axis=0)
            x, b, cm = token_row(x_ref, t), token_row(b_ref, t), token_row(cm_ref, t)
            S, (a, dt, A, xb) = _token(prev, x, b, c_ref, t)
            dy = token_row(dy_ref, t)
            G = dS + outer(dy, cm)
            dx_ref[0, 0, pl.ds(t, 1), :] = (dt * mm_t(b, G)).astype(dx_ref.dtype)
            db_ref[0, 0, pl.ds(t, 1), :] = (dt * mm(x, G)).astype(db_ref.dtype)
            dcm_ref[0, 0, pl.ds(t, 1), :] = mm(dy, S).astype(dcm_ref.dtype)
            dsig = a * jnp.sum(G * prev)
            dc_ref[0, 0, DT, pl.ds(t, 1)] = (jnp.sum(G * xb) + A * dsig)[0].astype(dc_ref.dtype)
            dc_ref[0, 0, AH, pl.ds(t, 1)] = (dt * dsig)[0].astype(dc_ref.dtype)
            return a * G
        return jax.lax.fori_loop(0, C, tok, dS)

    ds0_ref[0, 0] = jax.lax.fori_loop(0, n, blk, dsT_ref[0, 0].astype(jnp.float32))


def _specs(Tp, P, N, n):
    tok = lambda d: pl.BlockSpec((1, 1, Tp, d), lambda b, h: (b, h, 0, 0))    # noqa: E731
    coef = pl.BlockSpec((1, 1, 3, Tp), lambda b, h: (b, h, 0, 0))
    state = pl.BlockSpec((1, 1, P, N), lambda b, h: (b, h, 0, 0))
    states = pl.BlockSpec((1, 1, n, P, N), lambda b, h: (b, h, 0, 0, 0))
    return tok, coef, state, states


def _forward(cfg, x, b, cm, c, s0):
    backend, C = cfg
    B, H, Tp, P = x.shape
    N, n = b.shape[-1], Tp // C
    tok, coef, state, states = _specs(Tp, P, N, n)
    f32 = jnp.float32
    return call(functools.partial(_fwd_kernel, C=C, n=n), backend=backend, grid=(B, H),
                name="ssd_fwd", in_specs=[tok(P), tok(N), tok(N), coef, state],
                out_specs=[tok(P), state, states],
                out_shape=[jax.ShapeDtypeStruct((B, H, Tp, P), f32),
                           jax.ShapeDtypeStruct((B, H, P, N), f32),
                           jax.ShapeDtypeStruct((B, H, n, P, N), f32)])(x, b, cm, c, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd(cfg, x, b, cm, c, s0):
    y, sT, _ = _forward(cfg, x, b, cm, c, s0)
    return y, sT


def _ssd_fwd(cfg, x, b, cm, c, s0):
    y, sT, st = _forward(cfg, x, b, cm, c, s0)
    return (y, sT), (x, b, cm, c, st)


def _ssd_bwd(cfg, res, cot):
    backend, C = cfg
    x, b, cm, c, st = res
    dy, dsT = cot
    B, H, Tp, P = x.shape
    N, n = b.shape[-1], Tp // C
    tok, coef, state, states = _specs(Tp, P, N, n)
    S = jax.ShapeDtypeStruct
    dx, db, dcm, dc, ds0 = call(
        functools.partial(_bwd_kernel, C=C, n=n), backend=backend, grid=(B, H), name="ssd_bwd",
        in_specs=[tok(P), tok(N), tok(N), coef, states, tok(P), state],
        out_specs=[tok(P), tok(N), tok(N), coef, state],
        out_shape=[S(x.shape, x.dtype), S(b.shape, b.dtype), S(cm.shape, cm.dtype),
                   S(c.shape, c.dtype), S((B, H, P, N), jnp.float32)])(
        x, b, cm, c, st, dy.astype(jnp.float32), dsT.astype(jnp.float32))
    dc = jnp.where((jnp.arange(3) == KEEP)[:, None], 0.0, dc)      # the keep row is a flag
    return dx, db, dcm, dc, ds0


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd(x: Array, dt: Array, A: Array, Bm: Array, C: Array, *, h0: Array | None = None,
        reset: Array | None = None, block: int = 16,
        backend: str = "interpret") -> tuple[Array, Array]:
    """`reference.ssd` (x [B, T, H, P]; dt [B, T, H]; A [H]; Bm, C [B, T, G, N]; h0
    [B, H, P, N]; reset [B, T]) by the kernels: y [B, T, H, P] and the final state, float32."""
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    blk = max(1, min(block, T))
    Tp = round_up(T, blk)
    f32 = jnp.float32

    def heads_first(a):                  # [B, T, H, ...] -> [B, H, Tp, ...] (pads inert)
        a = jnp.swapaxes(a.astype(f32), 1, 2)
        return jnp.pad(a, [(0, 0), (0, 0), (0, Tp - T)] + [(0, 0)] * (a.ndim - 3))
    keep = jnp.ones((Bsz, T), f32) if reset is None else 1.0 - reset.astype(f32)
    coefs = jnp.stack([dt.astype(f32), jnp.broadcast_to(keep[..., None], (Bsz, T, H)),
                       jnp.broadcast_to(A.astype(f32), (Bsz, T, H))], -1)        # [B, T, H, 3]
    c = jnp.swapaxes(heads_first(coefs), 2, 3)                                   # [B, H, 3, Tp]
    c = c.at[:, :, KEEP, T:].set(1.0)                     # pads keep the state (dt = 0: no input)
    h0 = jnp.zeros((Bsz, H, P, N), f32) if h0 is None else h0.astype(f32)
    args = (heads_first(x), heads_first(heads_of_groups(Bm, H)),
            heads_first(heads_of_groups(C, H)), c, h0)
    y, sT = over_mesh(lambda *a: _ssd((backend, blk), *a), args, ("bh",) * 5, ("bh", "bh"),
                      batch=Bsz, heads=(H,))
    return jnp.swapaxes(y[:, :, :T], 1, 2), sT
