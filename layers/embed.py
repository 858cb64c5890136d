"""Token embedding (with a tied-head read-out) and learned absolute positions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import normal, param, uniform

Array = jax.Array


class Embed(nnx.Module):
    """E in R^{V x D}; `attend(h) = h E^T` is the tied LM head."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, init: str = "normal",
                 std: float = 0.02):
        self.vocab_size, self.dim = vocab_size, dim
        if init == "normal":
            e = normal(rngs.params(), (vocab_size, dim), std)
        elif init == "torch_linear":  # GAM preset: the head's U(+-1/sqrt(D)) init
            e = uniform(rngs.params(), (vocab_size, dim), 1.0 / dim ** 0.5)
        else:
            raise ValueError(f"unknown embedding init {init!r}")
        self.embedding = param(e, ("vocab", "embed"))

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, h: Array) -> Array:
        return jnp.einsum("...d,vd->...v", h, self.embedding[...].astype(h.dtype))


class LearnedPositions(nnx.Module):
    """P in R^{T_max x D}, added to the token embedding. Inputs past T_max must be rejected by the
    caller before tracing (JAX clamps out-of-range gathers silently)."""

    def __init__(self, max_len: int, dim: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.max_len = max_len
        self.table = param(normal(rngs.params(), (max_len, dim), std), (None, "embed"))

    def __call__(self, pos: Array) -> Array:
        return jnp.take(self.table[...], jnp.clip(pos, 0, self.max_len - 1), axis=0)
