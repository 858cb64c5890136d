"""Chunk helpers shared by the ops of `pallas_kernels/` (never import them from a sibling op).

* `upcast`: the inner-loop float type (float32, or float64 for float64 inputs in x64 tests).
* `segsum`: stable segment sums of per-step (log) decays, from masked increments, never as a
  difference of a global cumulative sum.
* `pad_chunks`: pad the time axis to a multiple of the chunk and put the chunk axis first
  (the layout a `lax.scan` over chunks consumes).
* `reset_masks`: which (t, s) pairs of a chunk lie in one document, and which steps the incoming
  chunk state reaches.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def float_type(dtype) -> jnp.dtype:
    """float32, or the wider float type of `dtype` (float64 in x64 tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def upcast(*arrs: Array):
    """Cast each array to `float_type` of its dtype; one array in, one out."""
    out = tuple(None if a is None else a.astype(float_type(a.dtype)) for a in arrs)
    return out[0] if len(out) == 1 else out


def segsum(v: Array, axis: int = -1, *, fill: float = 0.0) -> Array:
    """seg[..., t, s, ...] = sum_{s < r <= t} v[r] for t >= s, `fill` where t < s.

    The time axis of `v` is `axis`; the new s axis is inserted right after it. `fill=-inf` gives
    log-decay matrices whose `exp` is zero above the diagonal."""
    axis = axis % v.ndim
    v = jnp.moveaxis(v, axis, -1)                                   # [..., Q]
    Q = v.shape[-1]
    r = jnp.arange(Q)
    inc = jnp.where(r[:, None] > r[None, :], v[..., :, None], 0.0)  # [..., Q(r), Q(s)]
    seg = jnp.cumsum(inc, axis=-2)                                  # [..., Q(t), Q(s)]
    if fill != 0.0:
        seg = jnp.where(r[:, None] >= r[None, :], seg, fill)
    return jnp.moveaxis(seg, (-2, -1), (axis, axis + 1))


def n_chunks(T: int, Q: int) -> int:
    return -(-T // Q)


def pad_chunks(arrs: Sequence[Array], T: int, Q: int, *, time_axis: int = 1) -> list[Array]:
    """Each [B, T, ...] array (time at `time_axis`) padded with zeros to n*Q steps and reshaped
    to [n, B, Q, ...] (chunk axis first, time axis kept in place within a chunk)."""
    n = n_chunks(T, Q)
    pad = n * Q - T
    out = []
    for a in arrs:
        if pad:
            widths = [(0, 0)] * a.ndim
            widths[time_axis] = (0, pad)
            a = jnp.pad(a, widths)
        a = a.reshape(a.shape[:time_axis] + (n, Q) + a.shape[time_axis + 1:])
        out.append(jnp.moveaxis(a, time_axis, 0))
    return out


def unpad_chunks(y: Array, T: int, *, time_axis: int = 1) -> Array:
    """Inverse of `pad_chunks` for a scan output [n, B, Q, ...]: [B, T, ...]."""
    y = jnp.moveaxis(y, 0, time_axis)                 # [B, n, Q, ...]
    shape = y.shape[:time_axis] + (-1,) + y.shape[time_axis + 2:]
    y = y.reshape(shape)
    return jax.lax.slice_in_dim(y, 0, T, axis=time_axis)


def reset_masks(reset: Array) -> tuple[Array, Array]:
    """For document starts `reset` [B, Q]: (same [B, Q(t), Q(s)]: t >= s and no start in (s, t];
    clean [B, Q]: no start in [0, t], i.e. the chunk's incoming state reaches t)."""
    Q = reset.shape[1]
    rc = jnp.cumsum(reset.astype(jnp.int32), axis=1)
    t = jnp.arange(Q)
    same = (rc[:, :, None] == rc[:, None, :]) & (t[:, None] >= t[None, :])[None]
    return same, rc == 0
