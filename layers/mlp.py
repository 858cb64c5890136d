"""Feed-forward blocks: SwiGLU (Llama) and GELU (GPT-2/RAT)."""
from __future__ import annotations

import math

import jax
from flax import nnx

from layers.common import dropout
from layers.linear import Dense

Array = jax.Array


def llama_ffn_dim(dim: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
    """d_ff = m * ceil(int(2*4D/3) [* multiplier] / m) (specs/transformer.md §2.3)."""
    h = int(2 * 4 * dim / 3)
    if multiplier is not None:
        h = int(multiplier * h)
    return multiple_of * math.ceil(h / multiple_of)


def swiglu_flops(dim: int, hidden: int) -> float:
    """Forward FLOPs per token of `SwiGLU` (specs/transformer.md §2.3): the three [dim, hidden]
    products W1, W3, W2 (2 per multiply-add); the SiLU and the gating product are elementwise:
    not counted."""
    return 3 * 2.0 * dim * hidden


def gelu_mlp_flops(dim: int, hidden: int) -> float:
    """Forward FLOPs per token of `GeluMLP`: the two [dim, hidden] products fc1, fc2 (2 per
    multiply-add); GELU, biases and dropout are elementwise: not counted."""
    return 2 * 2.0 * dim * hidden


class SwiGLU(nnx.Module):
    """W2(silu(W1 x) * W3 x), no biases."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float = 0.02,
                 out_std: float | None = None):
        self.w1 = Dense(dim, hidden, rngs=rngs, axes=("embed", "mlp"), std=std)
        self.w3 = Dense(dim, hidden, rngs=rngs, axes=("embed", "mlp"), std=std)
        self.w2 = Dense(hidden, dim, rngs=rngs, axes=("mlp", "embed"), std=out_std or std)

    def __call__(self, x: Array, *, key=None, compute_dtype=None) -> Array:
        h = jax.nn.silu(self.w1(x, compute_dtype)) * self.w3(x, compute_dtype)
        return self.w2(h, compute_dtype)


class GeluMLP(nnx.Module):
    """W2(gelu(W1 x + b1)) + b2 with exact GELU; optional biases and output dropout."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, use_bias: bool = False,
                 init: str = "normal", std: float = 0.02, out_std: float | None = None,
                 dropout_rate: float = 0.0):
        self.fc1 = Dense(dim, hidden, rngs=rngs, use_bias=use_bias, axes=("embed", "mlp"),
                         init=init, std=std)
        self.fc2 = Dense(hidden, dim, rngs=rngs, use_bias=use_bias, axes=("mlp", "embed"),
                         init=init, std=out_std or std)
        self.dropout_rate = dropout_rate

    def __call__(self, x: Array, *, key=None, compute_dtype=None) -> Array:
        h = jax.nn.gelu(self.fc1(x, compute_dtype), approximate=False)
        return dropout(self.fc2(h, compute_dtype), self.dropout_rate, key)
