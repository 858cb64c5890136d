"""Dense layers with logical axis names and explicit initialisation."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import normal, param, uniform

Array = jax.Array


class Dense(nnx.Module):
    """y = x W (+ b), W of shape [in, out].

    init: "normal" with `std` (default 0.02), "zeros", or "torch" (PyTorch's Linear default,
    U(+-1/sqrt(in)) for weight and bias).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 use_bias: bool = False, axes: Sequence[str | None] = ("embed", "mlp"),
                 init: str = "normal", std: float = 0.02, dtype=jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        shape = (in_features, out_features)
        if init == "normal":
            w = normal(rngs.params(), shape, std)
            b = jnp.zeros((out_features,))
        elif init == "zeros":
            w, b = jnp.zeros(shape), jnp.zeros((out_features,))
        elif init == "torch":
            bound = 1.0 / in_features ** 0.5
            w = uniform(rngs.params(), shape, bound)
            b = uniform(rngs.params(), (out_features,), bound)
        else:
            raise ValueError(f"unknown init {init!r}")
        self.weight = param(w.astype(dtype), tuple(axes))
        self.bias = param(b.astype(dtype), (axes[-1],)) if use_bias else None

    def __call__(self, x: Array, compute_dtype=None) -> Array:
        w = self.weight[...]
        if compute_dtype is not None:
            x, w = x.astype(compute_dtype), w.astype(compute_dtype)
        y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y
