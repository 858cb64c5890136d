"""Small shared helpers: parameters with logical axis names, initializers, token positions, dropout.

Logical axis names used on parameters (mapped to mesh axes by the trainer's rules table):
  "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "conv", "state", "norm", "layers".
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.impl import check as check_impl  # noqa: F401  (re-exported: zoo configs validate their impl through layers)
from pallas_kernels.impl import check_block  # noqa: F401  (re-exported likewise)

Array = jax.Array


def param(value: Array, axes: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` carrying logical axis names (one per dimension)."""
    if len(axes) != value.ndim:
        raise ValueError(f"axes {tuple(axes)} do not match parameter shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def normal(key: Array, shape: Sequence[int], std: float, dtype=jnp.float32) -> Array:
    return std * jax.random.normal(key, tuple(shape), dtype)


def uniform(key: Array, shape: Sequence[int], bound: float, dtype=jnp.float32) -> Array:
    return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout with an explicit key; identity when `key is None` or `rate == 0`."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def fold(key: Array | None, i: int) -> Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def real_mask(mask: Array | None, batch: int, length: int) -> Array:
    """`mask` as a boolean [B, T] array (all real when None)."""
    if mask is None:
        return jnp.ones((batch, length), bool)
    return mask.astype(bool)


def doc_starts(segment_ids: Array | None, batch: int, length: int) -> Array:
    """Boolean [B, T]: True where a new document starts *inside* the call.

    The first token of a call continues the carried state; a token starts a new document when its
    segment id differs from the previous token's.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


def token_positions(start_pos: Array, starts: Array, mask: Array):
    """Positions of the tokens of a call (restarting at 0 at document starts).

    start_pos: [B] int, position of the next token in the carried state.
    starts:    [B, T] bool, document starts inside the call.
    mask:      [B, T] bool, real tokens (right padded).
    Returns (pos [B, T] int32, doc [B, T] int32 = number of document starts up to t,
             next_pos [B] int32 = position after the last real token).
    """
    B, T = mask.shape
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    # index of the most recent document start at or before t (-1: none inside the call)
    last_start = jax.lax.cummax(jnp.where(starts, t, -1), axis=1)
    pos = jnp.where(last_start >= 0, t - last_start, start_pos[:, None] + t).astype(jnp.int32)
    n_real = mask.sum(axis=1).astype(jnp.int32)
    last = jnp.maximum(n_real - 1, 0)
    last_pos = jnp.take_along_axis(pos, last[:, None], axis=1)[:, 0]
    next_pos = jnp.where(n_real > 0, last_pos + 1, start_pos).astype(jnp.int32)
    return pos, doc, next_pos


def last_real_index(mask: Array) -> Array:
    """[B] index of the last real token (-1 when a row has none)."""
    return mask.sum(axis=1).astype(jnp.int32) - 1


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def call_flags(pos, mask, segment_ids, B: int, T: int):
    """(real mask [B, T], document starts [B, T], next position [B]) of a mixer call that
    continues at positions `pos` [B] (the prologue of every recurrent mixer)."""
    real = real_mask(mask, B, T)
    starts = doc_starts(segment_ids, B, T)
    _, _, next_pos = token_positions(pos, starts, real)
    return real, starts, next_pos


def check_heads(dim: int, n_heads: int, *, rope: bool = False) -> None:
    """Config validation of `model.dim` split over `model.n_heads` heads (and, with `rope`, an even
    head dim for RoPE): one ValueError line naming the keys."""
    if dim % n_heads:
        raise ValueError(f"model.dim={dim} is not divisible by model.n_heads={n_heads}")
    if rope:
        check_rope_head_dim(dim // n_heads, f"model.dim={dim} / model.n_heads={n_heads}")


def check_rope_head_dim(head_dim: int, source: str, hint: str = "") -> None:
    """Config validation: one ValueError line when RoPE would get an odd head dim; `source` says
    where the head dim comes from (e.g. "model.dim=130 / model.n_heads=2")."""
    if head_dim % 2:
        raise ValueError(f"{source} gives head dim {head_dim}: RoPE needs an even head dim{hint}")
