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


def _deep_phi_loop(q, k, v, eta, w1_0, *, window, scale, doc):
    """The two-layer φ* memory of layers/deep_phi.py written as the spec states it, one token at
    a time for one row and head: the pairs (k_i, c_i) in a list, c_t = −η_t ∂ℓ/∂z and the W_1
    step from jax.grad of ℓ(z, W_1) = −⟨GELU(z) W_1, v_t⟩ at the state before t, the window
    keeping the last c pairs, a new document restarting W_1 and the pairs."""
    gelu = lambda z: jax.nn.gelu(z, approximate=False)  # noqa: E731
    loss = lambda z, w1, vt: -jnp.dot(gelu(z) @ w1, vt)  # noqa: E731

    def read(x, pairs):
        if not pairs:
            return jnp.zeros(w1_0.shape[0])
        ks = jnp.stack([p[0] for p in pairs])
        cs = jnp.stack([p[1] for p in pairs])
        w = jnp.exp(scale * ks @ x)
        return (w @ cs) / jnp.sum(w)

    pairs, w1, out = [], w1_0, []
    for t in range(q.shape[0]):
        if t > 0 and doc[t] != doc[t - 1]:
            pairs, w1 = [], w1_0
        za = read(k[t], pairs)
        gz, gw = jax.grad(loss, argnums=(0, 1))(za, w1, v[t])
        pairs.append((k[t], -eta[t] * gz))
        if window is not None:
            pairs = pairs[-window:]
        w1 = w1 - eta[t] * gw
        out.append(gelu(read(q[t], pairs)) @ w1)
    return jnp.stack(out)


@pytest.mark.parametrize("window", [None, 4])
def test_two_layer_phi_star_memory_is_the_flagged_construction(window):
    """memory_depth=2 (atlas.md §2.7 "Deep versions", flagged as a choice): the mixer's scan ==
    the construction written out token by token (`_deep_phi_loop`, its gradients by autodiff),
    with a document start at t = 6; and it is not the linear memory."""
    from layers.deep_phi import DeepPhiMixer
    mix = DeepPhiMixer(D, H, window=window, init_std=0.3, rate_bias=0.0, hidden=3,
                       rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(10), (B, T, D))
    seg = jnp.asarray(np.where(np.arange(T) < 6, 0, 1)[None].repeat(B, 0), jnp.int32)
    pos = jnp.asarray(np.where(np.arange(T) < 6, np.arange(T), np.arange(T) - 6)[None].repeat(B, 0))
    q, k, v, log_eta = mix.qkv(x, pos)
    got = nnx.jit(lambda m, x, s: m(x, segment_ids=s)[0])(mix, x, seg)
    ref = np.zeros((B, T, H, D // H))
    for b in range(B):
        for h in range(H):
            ref[b, :, h] = _deep_phi_loop(q[b, :, h], k[b, :, h], v[b, :, h],
                                          jnp.exp(log_eta[b, :, h]), mix.w1_init[...][h],
                                          window=window, scale=(D // H) ** -0.5, doc=seg[b])
    want = mix.wo(jnp.asarray(ref, jnp.float32).reshape(B, T, D))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    lin = DeepTransformerMixer(D, H, window=window, init_std=0.3, rate_bias=0.0,
                               rngs=nnx.Rngs(params=0))
    assert float(jnp.max(jnp.abs(fwd(lin, x) - got))) > 1e-2


def test_two_layer_phi_star_model_prefill_continue_decode_and_causal():
    """The memory_depth=2 model: a prefill cut mid-sequence then its continuation, and
    token-by-token decode, equal the full forward; later tokens do not change earlier logits;
    its parameter count is the formula's."""
    import zoo
    from zoo.deep_transformer import _TINY_DT, DeepTransformerConfig
    cfg = DeepTransformerConfig(**{**_TINY_DT, "window": 5}, memory_depth=2, memory_hidden=4)
    model = zoo.build("deep_transformer", cfg, rngs=0)
    gd, st = nnx.split(model)
    assert zoo.lm.count_params(model) == zoo.get("deep_transformer").param_count(cfg)
    x = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)

    @jax.jit
    def run(st, x):
        m = nnx.merge(gd, st)
        full = m(x)[0]
        pre, s, _ = m(x[:, :7], m.init_state(2, 64))
        cont = m(x[:, 7:], s)[0]

        def step(s, tok):
            lg, s, _ = nnx.merge(gd, st)(tok[:, None], s)
            return s, lg[:, 0]
        dec = jnp.moveaxis(jax.lax.scan(step, m.init_state(2, 64), x.T)[1], 0, 1)
        x2 = x.at[:, 9:].set((x[:, 9:] + 5) % cfg.vocab_size)
        return full, jnp.concatenate([pre, cont], 1), dec, m(x2)[0]

    full, split, dec, pert = run(st, x)
    np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dec, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pert[:, :9]), np.asarray(full[:, :9]))
