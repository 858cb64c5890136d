"""The Mamba-1 selective scan as Pallas kernels: the forward and its backward in a
`jax.custom_vjp`, the same function as `reference.selective_scan` (per batch row, a block of
`channels` channels d, the state h [d, N] in float32 whatever the input dtype):

    a_t = (1 − reset_t) exp(dt_t A)     c_t = dt_t (Euler) | expm1(dt_t A) / A (exact ZOH)
    h_t = a_t h_{t−1} + c_t x_t B_t     y_t = h_t C_tᵀ

Channels are columns: x, dt, y are read and written as [channels, 1] columns of channel-major
[B, Di, T] arrays and B_t, C_t as [1, N] rows, so nothing is transposed inside a kernel. One
program per (batch row, channel block) walks the tokens in blocks of `block` and writes h at
every block start: the residual of the backward, which walks the blocks in reverse, recomputes
each block's states and runs the exact token adjoint (g = dh + dy_t C_t, the cotangent of h_t):

    dh_{t−1} = a_t g     dx_t = Σ_n g c_t B_t     dB_t = Σ_d g c_t x_t     dC_t = Σ_d dy_t h_t
    ddt_t = Σ_n (g h_{t−1} a_t A + g x_t B_t c'_t)      dA += g h_{t−1} a_t dt_t + g x_t B_t ∂c/∂A

(c' = 1 Euler, exp(dt A) ZOH); dB, dC and dA are per channel block (and dA per row) and summed
outside. Ragged lengths are padded with dt = 0 and x = B = C = 0 (decay 1, no input). `block` and
`channels` never change the function. Token-sequential (the scan's own order); a chunked body
inside the kernel is the speed work that follows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.harness import (
    call,
    over_mesh,
    round_up,
    token_col,
    token_row,
)

Array = jax.Array


def _coeff(dt, A, zoh):
    """(a without the reset, c, dc/ddt, dc/dA) for dt [bd, 1], A [bd, N]."""
    e = jnp.exp(dt * A)
    if zoh:
        c = jnp.expm1(dt * A) / A
        return e, c, e, (dt * e * A - jnp.expm1(dt * A)) / (A * A)
    return e, jnp.broadcast_to(dt, A.shape), jnp.ones_like(A), jnp.zeros_like(A)


def _token(h, A, x, dt, b, c_, keep, zoh):
    e, c, dc_dt, dc_dA = _coeff(dt, A, zoh)
    a = keep * e
    hn = a * h + c * x * b
    return hn, jnp.sum(hn * c_, axis=1, keepdims=True), (a, c, dc_dt, dc_dA)


def _fwd_kernel(x_ref, dt_ref, A_ref, b_ref, c_ref, k_ref, h0_ref, y_ref, hT_ref, st_ref, *,
                C: int, n: int, zoh: bool):
    A = A_ref[...].astype(jnp.float32)

    def blk(i, h):
        st_ref[0, i] = h

        def tok(j, h):
            t = i * C + j
            h, y, _ = _token(h, A, token_col(x_ref, t), token_col(dt_ref, t), token_row(b_ref, t),
                             token_row(c_ref, t), k_ref[0, 0, pl.ds(t, 1)].astype(jnp.float32)[None],
                             zoh)
            y_ref[0, :, pl.ds(t, 1)] = y.astype(y_ref.dtype)
            return h
        return jax.lax.fori_loop(0, C, tok, h)

    hT_ref[0] = jax.lax.fori_loop(0, n, blk, h0_ref[0].astype(jnp.float32))


def _bwd_kernel(x_ref, dt_ref, A_ref, b_ref, c_ref, k_ref, st_ref, dy_ref, dhT_ref, dx_ref,
                ddt_ref, dA_ref, db_ref, dc_ref, dh0_ref, *, C: int, n: int, zoh: bool):
    A = A_ref[...].astype(jnp.float32)
    bd, N = A.shape
    idx = jax.lax.broadcasted_iota(jnp.int32, (C, bd, N), 0)

    def blk(ii, carry):
        i = n - 1 - ii

        def fill(j, fc):
            h, hs = fc
            t = i * C + j
            hs = jnp.where(idx == j, h[None], hs)
            h = _token(h, A, token_col(x_ref, t), token_col(dt_ref, t), token_row(b_ref, t), token_row(c_ref, t),
                       k_ref[0, 0, pl.ds(t, 1)].astype(jnp.float32)[None], zoh)[0]
            return h, hs
        _, hs = jax.lax.fori_loop(0, C, fill, (st_ref[0, i], jnp.zeros((C, bd, N), jnp.float32)))

        def tok(jj, carry):
            dh, dA = carry
            j = C - 1 - jj
            t = i * C + j
            prev = jnp.sum(jnp.where(idx == j, hs, 0.0), axis=0)
            x, dt, b, c_ = token_col(x_ref, t), token_col(dt_ref, t), token_row(b_ref, t), token_row(c_ref, t)
            keep = k_ref[0, 0, pl.ds(t, 1)].astype(jnp.float32)[None]
            h, _, (a, c, dc_dt, dc_dA) = _token(prev, A, x, dt, b, c_, keep, zoh)
            dy = token_col(dy_ref, t)                                          # [bd, 1]
            g = dh + dy * c_
            gxb = g * x * b
            dx_ref[0, :, pl.ds(t, 1)] = jnp.sum(g * c * b, axis=1, keepdims=True).astype(
                dx_ref.dtype)
            ddt_ref[0, :, pl.ds(t, 1)] = jnp.sum(g * prev * a * A + gxb * dc_dt, axis=1,
                                                 keepdims=True).astype(ddt_ref.dtype)
            db_ref[0, 0, pl.ds(t, 1), :] = jnp.sum(g * c * x, axis=0, keepdims=True).astype(
                db_ref.dtype)
            dc_ref[0, 0, pl.ds(t, 1), :] = jnp.sum(dy * h, axis=0, keepdims=True).astype(
                dc_ref.dtype)
            return a * g, dA + g * prev * a * dt + gxb * dc_dA
        return jax.lax.fori_loop(0, C, tok, carry)

    dh0, dA = jax.lax.fori_loop(0, n, blk, (dhT_ref[0].astype(jnp.float32),
                                           jnp.zeros((bd, N), jnp.float32)))
    dh0_ref[0] = dh0
    dA_ref[0, 0] = dA


def _specs(Tp, bd, N, n):
    col = pl.BlockSpec((1, bd, Tp), lambda b, j: (b, j, 0))             # x, dt, y: [B, Di, T]
    row = pl.BlockSpec((1, Tp, N), lambda b, j: (b, 0, 0))              # B, C: [B, T, N]
    keep = pl.BlockSpec((1, 1, Tp), lambda b, j: (b, 0, 0))
    amat = pl.BlockSpec((bd, N), lambda b, j: (j, 0))
    state = pl.BlockSpec((1, bd, N), lambda b, j: (b, j, 0))
    states = pl.BlockSpec((1, n, bd, N), lambda b, j: (b, 0, j, 0))
    per_blk_row = pl.BlockSpec((1, 1, Tp, N), lambda b, j: (b, j, 0, 0))  # dB, dC per block
    per_blk_a = pl.BlockSpec((1, 1, bd, N), lambda b, j: (b, 0, j, 0))    # dA per row
    return col, row, keep, amat, state, states, per_blk_row, per_blk_a


def _forward(cfg, x, dt, A, b, c, keep, h0):
    backend, C, bd, zoh = cfg
    B, Di, Tp = x.shape
    N, n = A.shape[1], Tp // C
    col, row, kp, amat, state, states, _, _ = _specs(Tp, bd, N, n)
    f32 = jnp.float32
    return call(functools.partial(_fwd_kernel, C=C, n=n, zoh=zoh), backend=backend,
                grid=(B, Di // bd), name="selective_scan_fwd",
                in_specs=[col, col, amat, row, row, kp, state],
                out_specs=[col, state, states],
                out_shape=[jax.ShapeDtypeStruct((B, Di, Tp), f32),
                           jax.ShapeDtypeStruct((B, Di, N), f32),
                           jax.ShapeDtypeStruct((B, n, Di, N), f32)])(x, dt, A, b, c, keep, h0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ss(cfg, x, dt, A, b, c, keep, h0):
    y, hT, _ = _forward(cfg, x, dt, A, b, c, keep, h0)
    return y, hT


def _ss_fwd(cfg, x, dt, A, b, c, keep, h0):
    y, hT, st = _forward(cfg, x, dt, A, b, c, keep, h0)
    return (y, hT), (x, dt, A, b, c, keep, st)


def _ss_bwd(cfg, res, cot):
    backend, C, bd, zoh = cfg
    x, dt, A, b, c, keep, st = res
    dy, dhT = cot
    B, Di, Tp = x.shape
    N, n = A.shape[1], Tp // C
    nb = Di // bd
    col, row, kp, amat, state, states, pbr, pba = _specs(Tp, bd, N, n)
    S = jax.ShapeDtypeStruct
    f32 = jnp.float32
    dx, ddt, dA, db, dc, dh0 = call(
        functools.partial(_bwd_kernel, C=C, n=n, zoh=zoh), backend=backend, grid=(B, nb),
        name="selective_scan_bwd",
        in_specs=[col, col, amat, row, row, kp, states, col, state],
        out_specs=[col, col, pba, pbr, pbr, state],
        out_shape=[S(x.shape, f32), S(dt.shape, f32), S((B, 1, Di, N), f32),
                   S((B, nb, Tp, N), f32), S((B, nb, Tp, N), f32), S((B, Di, N), f32)])(
        x, dt, A, b, c, keep, st, dy.astype(f32), dhT.astype(f32))
    return (dx.astype(x.dtype), ddt.astype(dt.dtype), dA.sum((0, 1)).astype(A.dtype),
            db.sum(1).astype(b.dtype), dc.sum(1).astype(c.dtype), jnp.zeros_like(keep), dh0)


_ss.defvjp(_ss_fwd, _ss_bwd)


def selective_scan(x: Array, dt: Array, A: Array, Bm: Array, C: Array, *, h0: Array | None = None,
                   reset: Array | None = None, exact_zoh: bool = False, block: int = 16,
                   channels: int = 128, backend: str = "interpret") -> tuple[Array, Array]:
    """`reference.selective_scan` by the kernels (x, dt [B, T, Di]; A [Di, N]; Bm, C [B, T, N];
    h0 [B, Di, N]; reset [B, T]): y [B, T, Di] and h_T [B, Di, N], float32."""
    B, T, Di = x.shape
    N = A.shape[1]
    blk = max(1, min(block, T))
    Tp = round_up(T, blk)
    bd = channels if Di % channels == 0 else Di
    f32 = jnp.float32
    pad_t = lambda a: jnp.pad(a.astype(f32), [(0, 0), (0, Tp - T)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    keep = jnp.ones((B, T), f32) if reset is None else 1.0 - reset.astype(f32)
    keep = jnp.pad(keep, [(0, 0), (0, Tp - T)], constant_values=1.0)[:, None, :]
    h0 = jnp.zeros((B, Di, N), f32) if h0 is None else h0.astype(f32)
    chan = lambda a: jnp.swapaxes(pad_t(a), 1, 2)                       # noqa: E731
    args = (chan(x), chan(dt), A.astype(f32), pad_t(Bm), pad_t(C), keep, h0)
    y, hT = over_mesh(lambda *a: _ss((backend, blk, bd, bool(exact_zoh)), *a), args,
                      ("b", "b", "r", "b", "b", "b", "b"), ("b", "b"), batch=B, heads=())
    return jnp.swapaxes(y, 1, 2)[:, :T], hT
