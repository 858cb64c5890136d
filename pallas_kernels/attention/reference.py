"""Reference softmax attention: every score materialised, float32 softmax.

Visibility of key j to query i (all conditions and-ed):
  k_valid[j]; and either k_always[j] (permanent prefix / memory slots), or
  group[i] == group[j]  (documents, segments), and, when causal, k_pos[j] <= q_pos[i], and, with a
  sliding window W, q_pos[i] - k_pos[j] <= W  (W + 1 keys, specs/transformer.md contract notes).
A query with no visible key outputs 0. `k_bias` [B, H|1, S] is added to the scores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
NEG = -1e30


def visibility(q_pos, k_pos, q_group, k_group, k_valid, k_always, *, causal: bool,
               window: int | None) -> Array:
    """Boolean [B, T, S]."""
    vis = q_group[:, :, None] == k_group[:, None, :]
    if causal:
        vis &= k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        vis &= (q_pos[:, :, None] - k_pos[:, None, :]) <= window
    if k_always is not None:
        vis |= k_always[:, None, :]
    return vis & k_valid[:, None, :]


def attention(q: Array, k: Array, v: Array, *, q_pos: Array, k_pos: Array, q_group: Array,
              k_group: Array, k_valid: Array, k_always: Array | None = None,
              k_bias: Array | None = None, causal: bool = True, window: int | None = None,
              scale: float | None = None, dropout_rate: float = 0.0,
              dropout_key: Array | None = None) -> Array:
    """q: [B, T, H, d]; k, v: [B, S, Hkv, d] with H % Hkv == 0 (query head h uses kv head h // rep)."""
    B, T, H, d = q.shape
    Hkv = k.shape[2]
    rep = H // Hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(B, T, Hkv, rep, d).astype(jnp.float32)
    s = jnp.einsum("btgrd,bsgd->bgrts", qg, k.astype(jnp.float32)) * scale
    if k_bias is not None:
        kb = jnp.broadcast_to(k_bias.astype(jnp.float32), (B, H, k.shape[1]))
        s = s + kb.reshape(B, Hkv, rep, 1, -1)
    vis = visibility(q_pos, k_pos, q_group, k_group, k_valid, k_always, causal=causal,
                     window=window)[:, None, None]
    # jax.nn.softmax: the max it subtracts carries no gradient and its backward is the one-pass
    # p * (g - sum(g * p)) (measured: the transformer's training step at T = 256 ~x faster than
    # differentiating max, exp, sum and divide); a masked score is exactly 0 after the exp, and
    # a query with no visible key outputs 0
    p = jax.nn.softmax(jnp.where(vis, s, NEG), axis=-1)
    p = jnp.where(jnp.any(vis, axis=-1, keepdims=True), p, 0.0)
    if dropout_rate > 0.0 and dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, p.shape)
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    o = jnp.einsum("bgrts,bsgd->btgrd", p, v.astype(jnp.float32))
    return o.reshape(B, T, H, v.shape[-1]).astype(q.dtype)
