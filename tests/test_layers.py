"""Shared layers: the invariants of specs/transformer.md §6 and the contract notes' conventions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.common import doc_starts, token_positions
from layers.conv import causal_conv1d
from layers.norms import gated_rms_norm, l2_norm, layer_norm, rms_norm
from layers.rope import apply_rope


def test_rope_relativity_and_norm():
    k1, k2 = jax.random.split(jax.random.key(0))
    q = jax.random.normal(k1, (1, 1, 1, 16))
    k = jax.random.normal(k2, (1, 1, 1, 16))
    def dot(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([[m]])) * apply_rope(k, jnp.array([[n]]))))
    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)
    assert dot(7, 3) != pytest.approx(dot(7, 4), abs=1e-3)
    r = apply_rope(q, jnp.array([[12345]]))
    assert float(jnp.linalg.norm(r)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
    # half-split convention: first rotated pair is (x[0], x[d/2])
    x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)
    y = apply_rope(x, jnp.array([[1]]), base=10000.0)
    np.testing.assert_allclose(np.asarray(y[0, 0, 0]), [np.cos(1), 0, np.sin(1), 0], atol=1e-6)


def test_norms():
    x = jax.random.normal(jax.random.key(1), (3, 8))
    w = jnp.linspace(0.5, 2.0, 8)
    np.testing.assert_allclose(rms_norm(5.0 * x, w, 1e-12), rms_norm(x, w, 1e-12), rtol=1e-5)
    ref = x / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(rms_norm(x, w, 1e-5), ref, rtol=1e-5)
    z = jax.random.normal(jax.random.key(2), (3, 8))
    silu = np.asarray(jax.nn.silu(z))
    np.testing.assert_allclose(gated_rms_norm(x, z, w, 1e-5, norm_before_gate=True),
                               np.asarray(rms_norm(x, w, 1e-5)) * silu, rtol=1e-5)
    np.testing.assert_allclose(gated_rms_norm(x, z, w, 1e-5, norm_before_gate=False),
                               rms_norm(x * silu, w, 1e-5), rtol=1e-5)
    g = gated_rms_norm(x, z, None, 1e-5, norm_before_gate=False, group_size=4)
    np.testing.assert_allclose(g[:, :4], rms_norm(x[:, :4] * silu[:, :4], None, 1e-5), rtol=1e-5)
    n = l2_norm(x)
    np.testing.assert_allclose(jnp.sum(n * n, -1), 1.0, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda v: l2_norm(v).sum())(jnp.zeros(4)))))
    ln = layer_norm(x, w, 0.1 * w, 1e-5)
    xn = (x - x.mean(-1, keepdims=True)) / np.sqrt(np.var(np.asarray(x), -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln, xn * w + 0.1 * w, rtol=1e-4, atol=1e-6)


def test_token_positions_restart_at_documents():
    seg = jnp.array([[0, 0, 1, 1, 1, 2, 2, 2]])
    mask = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0]], bool)
    pos, doc, nxt = token_positions(jnp.array([5]), doc_starts(seg, 1, 8), mask)
    np.testing.assert_array_equal(pos[0], [5, 6, 0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(doc[0], [0, 0, 1, 1, 1, 2, 2, 2])
    assert int(nxt[0]) == 1  # after the last real token (position 0 of document 2)


def test_causal_conv_state_mask_and_resets():
    B, T, C, K = 2, 11, 3, 4
    x = jax.random.normal(jax.random.key(3), (B, T, C))
    w = jax.random.normal(jax.random.key(4), (C, K))
    b = jnp.arange(C, dtype=jnp.float32)
    y, _ = causal_conv1d(x, w, b)
    xp = np.pad(np.asarray(x), ((0, 0), (K - 1, 0), (0, 0)))
    ref = sum(xp[:, k:k + T] * np.asarray(w)[:, k] for k in range(K)) + np.asarray(b)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # split at 5 with right padding: state = last K-1 real inputs
    m = jnp.arange(T)[None] < 5
    _, st = causal_conv1d(x, w, b, mask=jnp.repeat(m, B, 0))
    y2, _ = causal_conv1d(x[:, 5:], w, b, st)
    np.testing.assert_allclose(y2, y[:, 5:], rtol=1e-5, atol=1e-5)
    # a document start at 6 hides everything before it
    seg = jnp.where(jnp.arange(T) < 6, 0, 1)[None].repeat(B, 0)
    y3, st3 = causal_conv1d(x, w, b, starts=doc_starts(seg, B, T))
    y4, _ = causal_conv1d(x[:, 6:], w, b)
    np.testing.assert_allclose(y3[:, 6:], y4, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y3[:, :6], y[:, :6], rtol=1e-5, atol=1e-5)
