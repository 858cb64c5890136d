"""The gated-linear-attention op (pallas_kernels/gla): the reference is the literal per-token rule
(a numpy loop, float64); chunked == reference (outputs, final state, gradients) at lengths that
are not multiples of the block, with and without an initial state and a decay, for several
block sizes (an implementation parameter); a split call continues from the carried state.
fla's own naive recurrences are compared in tests/test_linear_memory.py (fixtures)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_close

from pallas_kernels.gla import gla as _gla

gla = jax.jit(_gla, static_argnames=("scale", "impl", "block"))


def _inputs(key, B, T, H, dk, dv, dtype=jnp.float32, init=True, decay=True):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (B, T, H, dk), dtype)
    k = jax.random.normal(ks[1], (B, T, H, dk), dtype) / dk ** 0.5
    v = jax.random.normal(ks[2], (B, T, H, dv), dtype)
    # strong and weak per-key decays (log_sigmoid down to ~ -6 per step)
    g = jax.nn.log_sigmoid(3.0 * jax.random.normal(ks[3], (B, T, H, dk), dtype)) if decay else None
    S0 = jax.random.normal(ks[4], (B, H, dk, dv), dtype) if init else None
    return q, k, v, g, S0


@pytest.mark.parametrize("decay", [True, False])
def test_reference_is_the_rule(decay):
    q, k, v, g, S0 = (None if a is None else np.asarray(a, np.float64)
                      for a in _inputs(jax.random.key(0), 1, 7, 2, 3, 4, decay=decay))
    with jax.enable_x64():
        o, S = gla(*(None if a is None else jnp.asarray(a) for a in (q, k, v, g)), scale=0.7,
                   initial_state=jnp.asarray(S0), impl="reference")
        o, S = np.asarray(o), np.asarray(S)
    for h in range(2):
        St = S0[0, h].copy()
        for t in range(7):
            if decay:
                St = np.exp(g[0, t, h])[:, None] * St
            St = St + np.outer(k[0, t, h], v[0, t, h])
            np.testing.assert_allclose(o[0, t, h], 0.7 * q[0, t, h] @ St, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(S[0, h], St, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,block,init,decay", [(1, 4, True, True), (21, 8, False, True),
                                                (11, 4, True, False)])
def test_chunked_equals_reference_float64(T, block, init, decay):
    with jax.enable_x64():
        q, k, v, g, S0 = _inputs(jax.random.key(T), 2, T, 2, 5, 3, jnp.float64, init, decay)

        def run(impl, q, k, v, g, S0):
            return _gla(q, k, v, g, scale=0.5, initial_state=S0, impl=impl, block=block)

        w_o = jax.random.normal(jax.random.key(99), v.shape, jnp.float64)
        w_s = jax.random.normal(jax.random.key(98), (2, 2, 5, 3), jnp.float64)

        def loss(impl, *a):
            o, S = run(impl, *a)
            return jnp.sum(o * w_o) + jnp.sum(S * w_s), (o, S)

        args = (q, k, v, g, S0)
        argn = tuple(i for i, a in enumerate(args) if a is not None)
        grad = {impl: jax.jit(jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=argn,
                                       has_aux=True))(*args) for impl in ("reference", "chunked")}
        (g_c, out_c), (g_r, out_r) = grad["chunked"], grad["reference"]
        assert_close(out_c, out_r, rtol=1e-10, atol=1e-10, what="forward")
        assert_close(g_c, g_r, rtol=1e-9, atol=1e-9, what="gradients")


def test_chunked_float32_and_split_continues():
    q, k, v, g, S0 = _inputs(jax.random.key(3), 2, 19, 2, 8, 8)
    o_r, S_r = gla(q, k, v, g, scale=1.0, initial_state=S0, impl="reference")
    o_c, S_c = gla(q, k, v, g, scale=1.0, initial_state=S0, impl="chunked", block=8)
    assert_close((o_c, S_c), (o_r, S_r), rtol=1e-4, atol=1e-4)
    o1, S1 = gla(q[:, :6], k[:, :6], v[:, :6], g[:, :6], scale=1.0, initial_state=S0,
                 impl="chunked", block=8)
    o2, S2 = gla(q[:, 6:], k[:, 6:], v[:, 6:], g[:, 6:], scale=1.0, initial_state=S1,
                 impl="chunked", block=8)
    assert_close((jnp.concatenate([o1, o2], 1), S2), (o_c, S_c), rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_rejected():
    """An unknown impl is one line; the kernel on a CPU is one line naming the interpret form
    (the kernels themselves: tests/test_gla_kernel.py)."""
    q, k, v, g, _ = _inputs(jax.random.key(1), 1, 3, 1, 2, 2)
    with pytest.raises(ValueError, match="is not one of"):
        _gla(q, k, v, g, scale=1.0, impl="cuda")
    with pytest.raises(ValueError, match="gla: impl='pallas' needs a TPU or a GPU"):
        _gla(q, k, v, g, scale=1.0, impl="pallas")
