"""The memory networks of the neural-memory layer (layers.memory's "memory architecture"):
plain functions of ONE head and ONE token, `memory_fn(outer_h, W_h, x[dk]) -> y[dv]`, with `W_h`
the recurrent weights and `outer_h` the outer-loop parameters (the memory LayerNorm's affine).
`Layered` (pallas_kernels.neural_memory) tells the chunked form how a network chains its layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import Layered


@dataclass(frozen=True)
class LinearMemory:
    """Matrix memory `y = x W["w"]` (row convention, W [dk, dv])."""
    layered = Layered(names=("w",))

    def __call__(self, outer, W, x):
        del outer
        return x @ W["w"]


linear_memory = LinearMemory()


def mlp_memory(outer, W, x, *, act: Callable = jax.nn.gelu, residual: bool = True,
               layer_norm_eps: float | None = 1e-5):
    """Deep memory `x + LN(act(x W1) W2 ... WL)` (activation between layers only; no biases).

    W: {"w1": [dk, h], ..., "wL": [h, dv]}; outer: {"ln_w": [dv], "ln_b": [dv]} when the
    LayerNorm is on (its affine parameters are outer-loop parameters). The residual adds the
    first dv coordinates of x (dk == dv for Titans).
    """
    L = len(W)
    h = x
    for i in range(1, L + 1):
        h = h @ W[f"w{i}"]
        if i < L:
            h = act(h)
    return mlp_head(outer, h, x, residual=residual, layer_norm_eps=layer_norm_eps)


def mlp_head(outer, z, x, *, residual: bool = True, layer_norm_eps: float | None = 1e-5):
    """The part of `mlp_memory` after its last linear layer: LayerNorm (outer affine), then the
    residual of the first dv coordinates of the input x."""
    if layer_norm_eps is not None:
        z = _memory_layer_norm(z, outer["ln_w"], outer["ln_b"], layer_norm_eps)
    return z + x[..., : z.shape[-1]] if residual else z


def _memory_layer_norm(x, w, b, eps):
    """LayerNorm over the last dim in the inner-loop precision (float32, float64 for float64)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * w + b


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gated_mlp_memory(outer, W, x, *, residual: bool = True,
                     layer_norm_eps: float | None = 1e-5):
    """Atlas++'s gated MLP memory (atlas.md §2.2, Eq. 43): x_res + LN((GELU(x W2) ⊙ (x W3)) W1)
    (the LayerNorm before the residual add is the spec's [choice], for parity with
    `mlp_memory`). W: {"w2": [dk, h], "w3": [dk, h], "w1": [h, dv]}; no biases."""
    z = (gelu_exact(x @ W["w2"]) * (x @ W["w3"])) @ W["w1"]
    return mlp_head(outer, z, x, residual=residual, layer_norm_eps=layer_norm_eps)


@dataclass(frozen=True)
class _GatedMLPMemory:
    """`gated_mlp_memory` (not a chain of layers: the chunked form materialises its weights)."""
    residual: bool
    ln_eps: float | None

    def __call__(self, outer, W, x):
        return gated_mlp_memory(outer, W, x, residual=self.residual, layer_norm_eps=self.ln_eps)


@dataclass(frozen=True)
class _MLPMemory:
    residual: bool
    ln_eps: float | None

    def __call__(self, outer, W, x):
        return mlp_memory(outer, W, x, act=gelu_exact, residual=self.residual,
                          layer_norm_eps=self.ln_eps)

    def head(self, outer, z, x):
        return mlp_head(outer, z, x, residual=self.residual, layer_norm_eps=self.ln_eps)

    @property
    def layered(self) -> Layered:
        return Layered(act=gelu_exact, head=self.head)
