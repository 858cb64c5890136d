"""Hydra's diagonal scan as Pallas kernels: the forward and its backward in a `jax.custom_vjp`,
the same function as `reference.diag_scan` (one float32 state per channel, read before the
update):

    read_t = (1 − reset_t) s_t        s_{t+1} = α_t read_t + inp_t

Channels are columns of channel-major [B, D, T] arrays (a block of `channels` channels per
program). The forward's reads are its output and the backward's residual, so the backward is
one reverse pass without recomputation (ds the cotangent of s_{t+1}, dr of read_t):

    dα_t = ds read_t     dinp_t = ds     ds ← (1 − reset_t) (dr_t + α_t ds)

`channels` never changes the function.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.harness import call, over_mesh, token_col

Array = jax.Array


def _keep(ref, t):
    return ref[0, 0, pl.ds(t, 1)].astype(jnp.float32)[None]        # [1, 1]


def _fwd_kernel(a_ref, b_ref, k_ref, s0_ref, r_ref, sT_ref, *, T: int):
    def tok(t, s):
        read = _keep(k_ref, t) * s
        r_ref[0, :, pl.ds(t, 1)] = read
        return token_col(a_ref, t) * read + token_col(b_ref, t)
    sT_ref[0] = jax.lax.fori_loop(0, T, tok, s0_ref[0].astype(jnp.float32))


def _bwd_kernel(a_ref, k_ref, r_ref, dr_ref, dsT_ref, da_ref, db_ref, ds0_ref, *, T: int):
    def tok(i, ds):
        t = T - 1 - i
        da_ref[0, :, pl.ds(t, 1)] = (ds * token_col(r_ref, t)).astype(da_ref.dtype)
        db_ref[0, :, pl.ds(t, 1)] = ds.astype(db_ref.dtype)
        return _keep(k_ref, t) * (token_col(dr_ref, t) + token_col(a_ref, t) * ds)
    ds0_ref[0] = jax.lax.fori_loop(0, T, tok, dsT_ref[0].astype(jnp.float32))


def _specs(T, bd):
    col = pl.BlockSpec((1, bd, T), lambda b, j: (b, j, 0))
    keep = pl.BlockSpec((1, 1, T), lambda b, j: (b, 0, 0))
    state = pl.BlockSpec((1, bd, 1), lambda b, j: (b, j, 0))
    return col, keep, state


def _forward(cfg, a, b, keep, s0):
    backend, bd = cfg
    B, D, T = a.shape
    col, kp, state = _specs(T, bd)
    f32 = jnp.float32
    return call(functools.partial(_fwd_kernel, T=T), backend=backend, grid=(B, D // bd),
                name="diag_scan_fwd", in_specs=[col, col, kp, state], out_specs=[col, state],
                out_shape=[jax.ShapeDtypeStruct((B, D, T), f32),
                           jax.ShapeDtypeStruct((B, D, 1), f32)])(a, b, keep, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ds(cfg, a, b, keep, s0):
    return _forward(cfg, a, b, keep, s0)


def _ds_fwd(cfg, a, b, keep, s0):
    reads, sT = _forward(cfg, a, b, keep, s0)
    return (reads, sT), (a, keep, reads)


def _ds_bwd(cfg, res, cot):
    backend, bd = cfg
    a, keep, reads = res
    dr, dsT = cot
    B, D, T = a.shape
    col, kp, state = _specs(T, bd)
    S = jax.ShapeDtypeStruct
    f32 = jnp.float32
    da, db, ds0 = call(functools.partial(_bwd_kernel, T=T), backend=backend, grid=(B, D // bd),
                       name="diag_scan_bwd", in_specs=[col, kp, col, col, state],
                       out_specs=[col, col, state],
                       out_shape=[S(a.shape, f32), S(a.shape, f32), S((B, D, 1), f32)])(
        a, keep, reads, dr.astype(f32), dsT.astype(f32))
    return da, db, jnp.zeros_like(keep), ds0


_ds.defvjp(_ds_fwd, _ds_bwd)


def diag_scan(alpha: Array, inp: Array, s0: Array, reset: Array, *, channels: int = 128,
              backend: str = "interpret") -> tuple[Array, Array]:
    """`reference.diag_scan` (alpha, inp [B, T, D]; s0 [B, D]; reset [B, T]) by the kernels:
    (s_read [B, T, D], the final state [B, D]), float32."""
    B, T, D = alpha.shape
    bd = channels if D % channels == 0 else D
    f32 = jnp.float32
    chan = lambda x: jnp.swapaxes(x.astype(f32), 1, 2)                 # noqa: E731
    keep = (1.0 - reset.astype(f32))[:, None, :]
    args = (chan(alpha), chan(inp), keep, s0.astype(f32)[..., None])
    reads, sT = over_mesh(lambda *a: _ds((backend, bd), *a), args, ("b",) * 4, ("b", "b"),
                          batch=B, heads=())
    return jnp.swapaxes(reads, 1, 2), sT[..., 0]
