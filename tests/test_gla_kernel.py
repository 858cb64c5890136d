"""The gated-linear-attention Pallas kernels (pallas_kernels/gla/pallas.py) in interpret mode
against the reference scan: the output, the final state and every gradient (q, k, v, the
per-key log-decay, the initial state) at lengths that are no multiple of the block (1, 63, 75),
with and without a decay (plain linear attention) and an initial state, with document resets
through the decay (as layers.linear_memory makes them); bfloat16 inputs against the float32
reference; the jaxpr, TPU export and CUDA lowering hold the kernels; the dispatcher runs them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_kernel_calls

from pallas_kernels.gla import gla, pallas, reference

B, H, DK, DV = 2, 2, 8, 16


def inputs(T, *, decay=True, init=True, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 7)
    q = (0.5 * jax.random.normal(ks[0], (B, T, H, DK))).astype(dtype)
    k = (0.5 * jax.random.normal(ks[1], (B, T, H, DK))).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, DV)).astype(dtype)
    g = -0.5 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, DK))) if decay else None
    s0 = jax.random.normal(ks[4], (B, H, DK, DV)) if init else None
    cot = (jax.random.normal(ks[5], (B, T, H, DV)), jax.random.normal(ks[6], (B, H, DK, DV)))
    return (q, k, v, g, s0), cot


def value_and_grads(fn, args, cot):
    def loss(*a):
        o, S = fn(*a[:4], scale=0.5, initial_state=a[4])
        return jnp.sum(o.astype(jnp.float32) * cot[0]) + jnp.sum(S.astype(jnp.float32) * cot[1])
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    return fn(*args[:4], scale=0.5, initial_state=args[4]), jax.grad(loss, argnums)(*args)


def kernel(*a, **kw):
    return pallas.gla(*a, block=16, backend="interpret", **kw)


def _names(args):
    return [n for n, a in zip("q k v g s0".split(), args) if a is not None]


@pytest.mark.parametrize("T, decay, init", [(1, True, True), (63, True, False),
                                            (75, False, True)])
def test_kernels_equal_the_reference_outputs_state_and_gradients(T, decay, init):
    args, cot = inputs(T, decay=decay, init=init, seed=T)
    (o1, s1), g1 = jax.jit(lambda a: value_and_grads(reference.gla, a, cot))(args)
    (o2, s2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, cot))(args)
    np.testing.assert_allclose(o2, o1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(_names(args), g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_resets_through_the_decay():
    """A document start as the mixers make it (every key's log-decay RESET_LOG_DECAY): kernel ==
    reference (outputs, state, gradients, finite) and the later document equals the kernel run on
    it alone."""
    from layers.linear_memory import RESET_LOG_DECAY
    T, start = 40, 21
    args, cot = inputs(T, seed=9)
    g = args[3].at[:, start].set(RESET_LOG_DECAY)
    args = (*args[:3], g, args[4])
    (o1, s1), g1 = jax.jit(lambda a: value_and_grads(reference.gla, a, cot))(args)
    (o2, s2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, cot))(args)
    np.testing.assert_allclose(o2, o1, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(_names(args), g2, g1):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
    alone = kernel(*(a[:, start:] for a in args[:4]), scale=0.5)
    np.testing.assert_allclose(o2[:, start:], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s2, alone[1], rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_against_the_float32_reference():
    args, cot = inputs(75, seed=4, dtype=jnp.bfloat16)
    f32 = tuple(None if a is None else a.astype(jnp.float32) for a in args)
    (o1, s1), g1 = jax.jit(lambda a: value_and_grads(reference.gla, a, cot))(f32)
    (o2, s2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, cot))(args)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert o2.dtype == jnp.bfloat16 and rel(o2, o1) < 0.01 and rel(s2, s1) < 0.01
    for name, a, b in zip(_names(args), g2, g1):
        assert rel(a, b) < 0.01, name


def test_the_dispatcher_runs_the_kernel():
    args, _ = inputs(13, seed=2)
    for g in (args[3], None):
        want = reference.gla(*args[:3], g, scale=0.5, initial_state=args[4])
        got = gla(*args[:3], g, scale=0.5, initial_state=args[4], impl="pallas_interpret", block=4)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gla: impl='pallas' needs a TPU or a GPU"):
        gla(*args[:3], scale=0.5, impl="pallas")


def _fns(backend, block):
    def f(q, k, v, g, s0):
        return pallas.gla(q, k, v, g, scale=0.1, initial_state=s0, block=block, backend=backend)

    def loss(*a):
        o, S = f(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)
    return f, jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def _abstract(T=256, dk=64, dv=64):
    S = jax.ShapeDtypeStruct
    return (S((1, T, 2, dk), jnp.bfloat16), S((1, T, 2, dk), jnp.bfloat16),
            S((1, T, 2, dv), jnp.bfloat16), S((1, T, 2, dk), jnp.float32),
            S((1, 2, dk, dv), jnp.float32))


def test_the_kernels_are_pallas_calls_for_interpret_tpu_and_cuda():
    assert_kernel_calls(*_fns("interpret", 8), *_fns("tpu", 64), _abstract(dk=128, dv=128), *_fns("gpu", 16), _abstract(), _abstract(T=20, dk=8, dv=8))
