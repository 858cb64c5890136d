"""DeepTransformer / SWDT mixer (layers/deep_transformer.py, specs/atlas.md §2.7, §8.10) against
the kernel form of the linear memory on φ*; decode through the KV cache and the fast forms are
the conformance suite's checks ("deep_transformer", "swdt")."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from memory_reference import deep_transformer_read

from layers.deep_transformer import DeepTransformerMixer

B, T, D, H = 2, 11, 8, 2


@nnx.jit
def fwd(layer, x):
    return layer(x)[0]


@pytest.mark.parametrize("window", [None, 4])
def test_deep_transformer_mixer_is_the_phi_star_linear_memory_read(window):
    """DeepTransformer / SWDT mixer (shared attention op with the log-rate key channel) == the
    kernel form of the linear memory on φ*, normalised, M_t = Σ_{i≤t} η_i v_i φ*(k_i)ᵀ over the
    last c tokens (tests/memory_reference.py: deep_transformer_read, itself tested against softmax
    attention and the explicit truncated-φ* recurrence); decode through the KV cache is the
    conformance suite's check."""
    mix = DeepTransformerMixer(D, H, window=window, init_std=0.3, rate_bias=0.0,
                               rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(10), (B, T, D))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    q, k, v, log_eta = mix.qkv(x, pos)
    read = lambda q_, k_, v_, e_: deep_transformer_read(
        q_, k_, v_, scale=(D // H) ** -0.5, eta=e_, window=None if window is None else window - 1,
        normalize=True)
    ref = jax.vmap(jax.vmap(read, (1, 1, 1, 1), 1))(q, k, v, jnp.exp(log_eta))
    assert float(jnp.std(log_eta)) > 0.05           # the rates vary: the gate is exercised
    np.testing.assert_allclose(fwd(mix, x), mix.wo(ref.reshape(B, T, D)), rtol=1e-5, atol=1e-6)
