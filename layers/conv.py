"""Causal depthwise convolution with its decode state (shared convention, specs/mom.md).

Tap `w[:, K-1]` multiplies the current input; the decode state is the last `K-1` real inputs.
Document starts inside a call (see `layers.common.doc_starts`) hide everything before them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import param, uniform

Array = jax.Array


def causal_conv1d(x: Array, w: Array, b: Array | None, state: Array | None = None,
                  mask: Array | None = None, starts: Array | None = None) -> tuple[Array, Array]:
    """x: [B, T, C]; w: [C, K]; b: [C] or None; state: [B, K-1, C] (previous inputs, oldest first).

    Returns y [B, T, C] and the new state (the last K-1 real inputs of (state ‖ x), with inputs
    before the last document start zeroed).
    """
    B, T, C = x.shape
    K = w.shape[1]
    if state is None:
        state = jnp.zeros((B, K - 1, C), x.dtype)
    u = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    t = jnp.arange(T)[None, :]
    if starts is not None:
        last_start = jax.lax.cummax(jnp.where(starts, t, -(K + 1)), axis=1)  # [B, T]
    y = jnp.zeros((B, T, C), jnp.float32)
    for k in range(K):
        src = u[:, k:k + T]  # call index t - (K-1-k)
        if starts is not None:
            ok = (t - (K - 1 - k)) >= last_start
            src = jnp.where(ok[..., None], src, 0)
        y = y + src.astype(jnp.float32) * w[:, k].astype(jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    # new state: u[n_real : n_real + K-1]
    n_real = T if mask is None else mask.sum(axis=1).astype(jnp.int32)
    n_real = jnp.broadcast_to(jnp.asarray(n_real, jnp.int32), (B,))
    idx = n_real[:, None] + jnp.arange(K - 1)[None, :]  # indices into u
    new_state = jnp.take_along_axis(u, idx[..., None], axis=1)
    if starts is not None:
        # zero entries older than the last document start among real tokens
        last = jnp.maximum(n_real - 1, 0)
        ls = jnp.take_along_axis(last_start, last[:, None], axis=1)  # [B,1]
        call_idx = idx - (K - 1)
        new_state = jnp.where((call_idx >= ls)[..., None], new_state, 0)
    return y.astype(x.dtype), new_state.astype(state.dtype)


class CausalConv1d(nnx.Module):
    """Depthwise causal conv; PyTorch Conv1d default init U(+-1/sqrt(K)) for weight and bias."""

    def __init__(self, channels: int, kernel_size: int, *, rngs: nnx.Rngs, use_bias: bool = True):
        self.channels, self.kernel_size = channels, kernel_size
        bound = 1.0 / kernel_size ** 0.5
        self.weight = param(uniform(rngs.params(), (channels, kernel_size), bound), ("conv", None))
        self.bias = param(uniform(rngs.params(), (channels,), bound), ("conv",)) if use_bias else None

    def init_state(self, batch_size: int, dtype=jnp.float32) -> Array:
        return jnp.zeros((batch_size, self.kernel_size - 1, self.channels), dtype)

    def __call__(self, x, state=None, mask=None, starts=None):
        b = None if self.bias is None else self.bias[...]
        return causal_conv1d(x, self.weight[...], b, state, mask, starts)
