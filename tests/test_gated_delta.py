"""The shared gated-delta-rule op: chunked == reference (forward, final state, gradients) at
ragged lengths, with and without an initial state, for several chunk lengths (an implementation
parameter); the reference equals a literal per-token numpy loop of the mom.md contract rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta import gated_delta as _gd

gated_delta = jax.jit(_gd, static_argnames=("scale", "impl", "block"))


def _inputs(key, B, T, H, dk, dv, dtype=jnp.float32, init=True):
    ks = jax.random.split(key, 7)
    n = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
    q = n(jax.random.normal(ks[0], (B, T, H, dk), dtype))
    k = n(jax.random.normal(ks[1], (B, T, H, dk), dtype))
    v = jax.random.normal(ks[2], (B, T, H, dv), dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H), dtype) + 2.0)
    beta = 1.5 * jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), dtype))  # up to 1.5: no clamp
    S0 = jax.random.normal(ks[5], (B, H, dk, dv), dtype) if init else None
    return q, k, v, g, beta, S0


def test_reference_is_the_contract_rule():
    q, k, v, g, beta, S0 = (None if a is None else np.asarray(a, np.float64)
                            for a in _inputs(jax.random.key(0), 1, 9, 2, 4, 3))
    with jax.enable_x64():
        o, S = gated_delta(*(jnp.asarray(a) for a in (q, k, v, g, beta)), scale=0.7,
                           initial_state=jnp.asarray(S0), impl="reference")
        o, S = np.asarray(o), np.asarray(S)
    for h in range(2):
        St = S0[0, h].copy()
        for t in range(9):
            St = np.exp(g[0, t, h]) * St
            St = St + np.outer(k[0, t, h], beta[0, t, h] * (v[0, t, h] - k[0, t, h] @ St))
            np.testing.assert_allclose(o[0, t, h], 0.7 * q[0, t, h] @ St, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(S[0, h], St, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,chunk,init", [(1, 4, True), (13, 4, False), (21, 8, True)])
def test_chunked_equals_reference_float64(T, chunk, init):
    with jax.enable_x64():
        args = _inputs(jax.random.key(T), 2, T, 2, 6, 5, jnp.float64, init)
        q, k, v, g, beta, S0 = args

        def run(impl, q, k, v, g, beta, S0):
            return gated_delta(q, k, v, g, beta, scale=0.5, initial_state=S0, impl=impl,
                               block=chunk)

        o_r, S_r = jax.jit(lambda *a: run("reference", *a))(*args)
        o_c, S_c = jax.jit(lambda *a: run("chunked", *a))(*args)
        np.testing.assert_allclose(o_c, o_r, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(S_c, S_r, rtol=1e-10, atol=1e-10)
        w_o = jax.random.normal(jax.random.key(99), o_r.shape, jnp.float64)
        w_s = jax.random.normal(jax.random.key(98), S_r.shape, jnp.float64)

        def loss(impl, *a):
            o, S = run(impl, *a)
            return jnp.sum(o * w_o) + jnp.sum(S * w_s)

        argn = tuple(range(6)) if init else tuple(range(5))
        a = args if init else args[:5] + (None,)
        g_r = jax.jit(jax.grad(lambda *x: loss("reference", *x), argnums=argn))(*a)
        g_c = jax.jit(jax.grad(lambda *x: loss("chunked", *x), argnums=argn))(*a)
        for x, y in zip(g_c, g_r):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)


def test_chunked_equals_reference_float32():
    args = _inputs(jax.random.key(3), 2, 19, 2, 8, 8)
    o_r, S_r = gated_delta(*args[:5], scale=1.0, initial_state=args[5], impl="reference")
    o_c, S_c = gated_delta(*args[:5], scale=1.0, initial_state=args[5], impl="chunked", block=8)
    np.testing.assert_allclose(o_c, o_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(S_c, S_r, rtol=1e-4, atol=1e-4)


def test_split_continues_with_state():
    q, k, v, g, beta, S0 = _inputs(jax.random.key(4), 1, 15, 1, 4, 4)
    o, S = gated_delta(q, k, v, g, beta, scale=1.0, initial_state=S0, impl="chunked", block=4)
    o1, S1 = gated_delta(q[:, :6], k[:, :6], v[:, :6], g[:, :6], beta[:, :6], scale=1.0,
                         initial_state=S0, impl="chunked", block=4)
    o2, S2 = gated_delta(q[:, 6:], k[:, 6:], v[:, 6:], g[:, 6:], beta[:, 6:], scale=1.0,
                         initial_state=S1, impl="chunked", block=4)
    np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S2, S, rtol=1e-5, atol=1e-5)
