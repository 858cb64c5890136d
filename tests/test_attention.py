"""The attention op (pallas_kernels/attention): the blockwise form equals the reference with
every mask feature, forward and gradients, and the weights are a distribution over the visible
keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import chunked, reference


def _mask_args(B, T, S, key):
    ks = jax.random.split(key, 4)
    q_pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    k_pos = jnp.broadcast_to(jnp.arange(S) - (S - T), (B, S))
    grp = jnp.where(jnp.arange(S) < S // 2, 0, 1)
    return dict(q_pos=q_pos, k_pos=k_pos, q_group=jnp.broadcast_to(grp[S - T:], (B, T)),
                k_group=jnp.broadcast_to(grp, (B, S)),
                k_valid=jax.random.bernoulli(ks[0], 0.9, (B, S)),
                k_always=jnp.broadcast_to(jnp.arange(S) < 2, (B, S)),
                k_bias=0.5 * jax.random.normal(ks[1], (B, 4, S)))


@pytest.mark.parametrize("window", [None, 5])
def test_blockwise_attention_equals_reference(window):
    """All mask features at once (documents, prefix keys, bias, invalid slots, window), lengths
    not multiples of the key block; forward and gradients."""
    B, T, S, H, Hkv, d = 2, 19, 23, 4, 2, 8
    ks = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(ks[0], (B, T, H, d))
    k = jax.random.normal(ks[1], (B, S, Hkv, d))
    v = jax.random.normal(ks[2], (B, S, Hkv, d))
    args = _mask_args(B, T, S, jax.random.key(6))
    f_ref = lambda q, k, v: reference.attention(q, k, v, window=window, **args)
    f_blk = lambda q, k, v: chunked.attention(q, k, v, window=window, block=4, **args)
    np.testing.assert_allclose(f_blk(q, k, v), f_ref(q, k, v), atol=1e-5, rtol=1e-5)
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))))
    g_ref = jax.grad(loss(f_ref), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.grad(loss(f_blk), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blk, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_attention_weights_are_a_distribution_over_visible_keys():
    """With v = one-hot key index, the output row is the attention distribution."""
    B, T, S, H, d = 1, 6, 9, 4, 4
    args = _mask_args(B, T, S, jax.random.key(7))
    q = jax.random.normal(jax.random.key(8), (B, T, H, d))
    k = jax.random.normal(jax.random.key(9), (B, S, H, d))
    eye = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (B, S, H, S))
    w = reference.attention(q, k, eye, window=3, **args)  # d_v = S
    vis = reference.visibility(args["q_pos"], args["k_pos"], args["q_group"], args["k_group"],
                               args["k_valid"], args["k_always"], causal=True, window=3)
    w, vis = np.asarray(w), np.asarray(vis)[:, :, None, :]
    assert np.all(w >= 0)
    np.testing.assert_array_equal(w[np.broadcast_to(~vis, w.shape)], 0.0)
    rows = vis.any(-1)
    np.testing.assert_allclose(w.sum(-1)[np.broadcast_to(rows, w.shape[:-1])], 1.0, rtol=1e-5)
