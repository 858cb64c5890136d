"""Normalisations (shared conventions of specs/transformer.md and specs/mom.md contract notes).

Every norm computes in float32 and casts back to the input dtype. No epsilon has a default: each
model passes its own (1e-5 Llama/Mamba, 1e-6 RAT/MoM/Titans/ATLAS/Miras/Hydra).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import param

Array = jax.Array


def rms_norm(x: Array, weight: Array | None, eps: float) -> Array:
    """`x * rsqrt(mean(x^2, -1) + eps) * w` in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def gated_rms_norm(x: Array, z: Array, weight: Array | None, eps: float, *,
                   norm_before_gate: bool, group_size: int | None = None) -> Array:
    """Gated RMSNorm with a SiLU gate.

    norm_before_gate=True:  RMSNorm(x) * w * silu(z)   (MoM, Titans, ATLAS, Miras)
    norm_before_gate=False: RMSNorm(x * silu(z)) * w   (Mamba-2's RMSNormGated)
    `group_size` normalises over groups of that many channels (Mamba-2 with ngroups > 1).
    """
    xf, zf = x.astype(jnp.float32), z.astype(jnp.float32)
    if not norm_before_gate:
        xf = xf * jax.nn.silu(zf)
    shape = xf.shape
    g = group_size or shape[-1]
    xg = xf.reshape(*shape[:-1], shape[-1] // g, g)
    xg = xg * jax.lax.rsqrt(jnp.mean(xg * xg, axis=-1, keepdims=True) + eps)
    y = xg.reshape(shape)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if norm_before_gate:
        y = y * jax.nn.silu(zf)
    return y.astype(x.dtype)


def l2_norm(x: Array, eps: float = 1e-6) -> Array:
    """`x * rsqrt(sum(x^2) + eps)`: eps inside the rsqrt, so the gradient is finite at 0."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def layer_norm(x: Array, weight: Array | None, bias: Array | None, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, axis_name: str = "norm"):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), jnp.float32), (axis_name,))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.weight[...], self.eps)


class GatedRMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, norm_before_gate: bool,
                 group_size: int | None = None, axis_name: str = "norm"):
        self.eps, self.norm_before_gate, self.group_size = eps, norm_before_gate, group_size
        self.weight = param(jnp.ones((dim,), jnp.float32), (axis_name,))

    def __call__(self, x: Array, z: Array) -> Array:
        return gated_rms_norm(x, z, self.weight[...], self.eps,
                              norm_before_gate=self.norm_before_gate, group_size=self.group_size)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, use_bias: bool = True, axis_name: str = "norm"):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), jnp.float32), (axis_name,))
        self.bias = param(jnp.zeros((dim,), jnp.float32), (axis_name,)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.weight[...], None if self.bias is None else self.bias[...], self.eps)


def make_norm(kind: str, dim: int, eps: float) -> nnx.Module:
    """`kind` in {"rms", "layer"}: the pre-norm used by a block."""
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    if kind == "layer":
        return LayerNorm(dim, eps=eps)
    raise ValueError(f"norm kind must be 'rms' or 'layer', got {kind!r}")
