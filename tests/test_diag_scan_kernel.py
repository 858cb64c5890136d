"""Hydra's diagonal-scan Pallas kernels (pallas_kernels/diag_scan/pallas.py) in interpret mode
against the reference loop: the reads, the final state and every gradient (alpha, inp, s0) at
lengths 1, 63 and 75 with resets and several channel blocks; bfloat16 inputs against the
float32 reference; the jaxpr, TPU export and CUDA lowering hold the kernels; the dispatcher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_kernel_calls

from pallas_kernels.diag_scan import diag_scan, pallas, reference

B, D = 2, 16


def inputs(T, *, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    a = jax.nn.sigmoid(jax.random.normal(ks[0], (B, T, D))).astype(dtype)
    b = jax.random.normal(ks[1], (B, T, D)).astype(dtype)
    s0 = jax.random.normal(ks[2], (B, D))
    reset = jax.random.uniform(ks[3], (B, T)) < 0.1
    return (a, b, s0), reset, (jax.random.normal(ks[4], (B, T, D)), jnp.ones((B, D)))


def value_and_grads(fn, args, reset, cot):
    def loss(*x):
        r, s = fn(*x, reset)
        return jnp.sum(r * cot[0]) + jnp.sum(jnp.sin(s) * cot[1])
    return fn(*args, reset), jax.grad(loss, argnums=(0, 1, 2))(*args)


def kernel(*a, **kw):
    return pallas.diag_scan(*a, channels=8, backend="interpret", **kw)


@pytest.mark.parametrize("T", [1, 63, 75])
def test_kernels_equal_the_reference_reads_state_and_gradients(T):
    args, reset, cot = inputs(T, seed=T)
    want, g1 = jax.jit(lambda a: value_and_grads(reference.diag_scan, a, reset, cot))(args)
    got, g2 = jax.jit(lambda a: value_and_grads(kernel, a, reset, cot))(args)
    for x, y in zip(got + g2, want + g1):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_and_the_dispatcher():
    args, reset, cot = inputs(75, seed=4, dtype=jnp.bfloat16)
    f32 = tuple(x.astype(jnp.float32) for x in args)
    want, g1 = jax.jit(lambda a: value_and_grads(reference.diag_scan, a, reset, cot))(f32)
    got, g2 = jax.jit(lambda a: value_and_grads(kernel, a, reset, cot))(args)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    for x, y in zip(got + g2, want + g1):
        assert rel(x, y) < 0.01
    args, reset, _ = inputs(13, seed=2)
    for x, y in zip(diag_scan(*args, reset, impl="pallas_interpret"),
                    reference.diag_scan(*args, reset)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="diag_scan: impl='pallas' needs a TPU or a GPU"):
        diag_scan(*args, reset, impl="pallas")


def _fns(backend):
    def f(a, b, s0, reset):
        return pallas.diag_scan(a, b, s0, reset, backend=backend)

    def loss(a, b, s0, reset):
        r, s = f(a, b, s0, reset)
        return jnp.sum(r) + jnp.sum(s)
    return f, jax.grad(loss, argnums=(0, 1, 2))


def _abstract(T=256, d=256):
    S = jax.ShapeDtypeStruct
    return (S((1, T, d), jnp.float32), S((1, T, d), jnp.float32), S((1, d), jnp.float32),
            S((1, T), jnp.bool_))


def test_the_kernels_are_pallas_calls_for_interpret_tpu_and_cuda():
    assert_kernel_calls(*_fns("interpret"), *_fns("tpu"), _abstract(), *_fns("gpu"), _abstract(), _abstract(T=20, d=16))
