"""Mamba-2's SSD Pallas kernels (pallas_kernels/ssd/pallas.py) in interpret mode against the
reference scan: y, the final state and every gradient (x, dt, A, B, C, h0) at lengths that are no
multiple of the token block (1, 63, 75), grouped B/C (2 groups over 4 heads), an initial state
and document resets; bfloat16 inputs against the float32 reference; the jaxpr, TPU export and
CUDA lowering hold the kernels; the dispatcher runs them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_kernel_calls

from pallas_kernels.ssd import pallas, reference, ssd

B, H, P, G, N = 2, 4, 8, 2, 4
NAMES = ("x", "dt", "A", "B", "C", "h0")


def inputs(T, *, seed=0, resets=(), dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (B, T, H, P)).astype(dtype)
    dt = (0.5 * jax.nn.softplus(jax.random.normal(ks[1], (B, T, H)))).astype(dtype)
    A = -jnp.exp(0.5 * jax.random.normal(ks[2], (H,)))
    Bm = jax.random.normal(ks[3], (B, T, G, N)).astype(dtype)
    C = jax.random.normal(ks[4], (B, T, G, N)).astype(dtype)
    h0 = jax.random.normal(ks[5], (B, H, P, N))
    reset = jnp.zeros((B, T), bool)
    for r, t in resets:
        reset = reset.at[r, t].set(True)
    return (x, dt, A, Bm, C, h0), reset, jax.random.normal(ks[6], (B, T, H, P))


def value_and_grads(fn, args, reset, cot):
    def loss(*a):
        y, h = fn(*a[:5], h0=a[5], reset=reset)
        return jnp.sum(y * cot) + jnp.sum(jnp.sin(h))
    return fn(*args[:5], h0=args[5], reset=reset), jax.grad(loss, argnums=tuple(range(6)))(*args)


def kernel(*a, **kw):
    return pallas.ssd(*a, block=16, backend="interpret", **kw)


@pytest.mark.parametrize("T, resets", [(1, ()), (63, ((1, 20), (0, 48))), (75, ((1, 5),))])
def test_kernels_equal_the_reference_outputs_state_and_gradients(T, resets):
    args, reset, cot = inputs(T, seed=T, resets=resets)
    (y1, h1), g1 = jax.jit(lambda a: value_and_grads(reference.ssd, a, reset, cot))(args)
    (y2, h2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, reset, cot))(args)
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(NAMES, g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_bfloat16_inputs_against_the_float32_reference():
    args, reset, cot = inputs(75, seed=4, resets=((0, 30),), dtype=jnp.bfloat16)
    f32 = tuple(a.astype(jnp.float32) for a in args)
    (y1, h1), g1 = jax.jit(lambda a: value_and_grads(reference.ssd, a, reset, cot))(f32)
    (y2, h2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, reset, cot))(args)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert y2.dtype == jnp.float32 and rel(y2, y1) < 0.01 and rel(h2, h1) < 0.01
    for name, a, b in zip(NAMES, g2, g1):
        assert rel(a, b) < 0.01, name


def test_the_dispatcher_runs_the_kernel():
    args, reset, _ = inputs(13, seed=2, resets=((1, 4),))
    want = reference.ssd(*args[:5], h0=args[5], reset=reset)
    got = ssd(*args[:5], h0=args[5], reset=reset, impl="pallas_interpret", block=4)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ssd: impl='pallas' needs a TPU or a GPU"):
        ssd(*args[:5], impl="pallas")


def _fns(backend, block):
    def f(x, dt, A, Bm, C):
        return pallas.ssd(x, dt, A, Bm, C, block=block, backend=backend)

    def loss(*a):
        y, h = f(*a)
        return jnp.sum(y) + jnp.sum(h)
    return f, jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def _abstract(T=256, h=8, p=64, g=1, n=128):
    S = jax.ShapeDtypeStruct
    return (S((1, T, h, p), jnp.bfloat16), S((1, T, h), jnp.float32), S((h,), jnp.float32),
            S((1, T, g, n), jnp.bfloat16), S((1, T, g, n), jnp.bfloat16))


def test_the_kernels_are_pallas_calls_for_interpret_tpu_and_cuda():
    assert_kernel_calls(*_fns("interpret", 8), *_fns("tpu", 64), _abstract(), *_fns("gpu", 16), _abstract(), _abstract(T=20, h=2, p=8, n=8))
