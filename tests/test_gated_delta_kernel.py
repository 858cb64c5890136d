"""The gated-delta-rule Pallas kernels (pallas_kernels/gated_delta/pallas.py) in interpret mode
against the reference scan: the output, the final state and every gradient (q, k, v, g, beta,
the initial state) at lengths that are no multiple of the chunk (1, 63, 75, 200), with and
without an initial state, with document resets (through the gate, as the models make them); bfloat16 inputs against the float32 reference; the jaxpr, TPU export
and CUDA lowering hold the kernels (forward and backward); the dispatcher runs them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta import gated_delta, pallas, reference

B, H, DK, DV = 2, 2, 8, 16


def inputs(T, *, init=True, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (B, T, H, DK))).astype(dtype)
    k = unit(jax.random.normal(ks[1], (B, T, H, DK))).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, DV)).astype(dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    b = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    s0 = jax.random.normal(ks[5], (B, H, DK, DV)) if init else None
    cot = (jax.random.normal(ks[6], (B, T, H, DV)), jax.random.normal(ks[7], (B, H, DK, DV)))
    return (q, k, v, g, b, s0), cot


def value_and_grads(fn, args, cot):
    def loss(*a):
        o, S = fn(*a[:5], scale=0.5, initial_state=a[5])
        return jnp.sum(o.astype(jnp.float32) * cot[0]) + jnp.sum(S.astype(jnp.float32) * cot[1])
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    return fn(*args[:5], scale=0.5, initial_state=args[5]), jax.grad(loss, argnums)(*args)


def kernel(*a, **kw):
    return pallas.gated_delta(*a, block=16, backend="interpret", **kw)


@pytest.mark.parametrize("T, init", [(1, True), (63, True), (75, False), (200, True)])
def test_kernels_equal_the_reference_outputs_state_and_gradients(T, init):
    args, cot = inputs(T, init=init, seed=T)
    (o1, s1), g1 = jax.jit(lambda a: value_and_grads(reference.gated_delta, a, cot))(args)
    (o2, s2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, cot))(args)
    np.testing.assert_allclose(o2, o1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-6)
    for name, a, b in zip("q k v g beta s0".split(), g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_resets_through_the_gate():
    """Document resets as the models make them (layers.linear_memory: the log-decay of a
    document's first token is RESET_LOG_DECAY, exp == 0): the kernel equals the reference
    (outputs, state, every gradient, all finite) and each document equals the kernel run on that
    document alone from a zero state; resets mid-chunk and on a chunk boundary (block 16)."""
    from layers.linear_memory import RESET_LOG_DECAY
    T, starts = 75, (16, 21, 50)
    args, cot = inputs(T, init=True, seed=11)
    g = args[3].at[:, list(starts)].set(RESET_LOG_DECAY)
    args = (*args[:3], g, *args[4:])
    (o1, s1), g1 = jax.jit(lambda a: value_and_grads(reference.gated_delta, a, cot))(args)
    (o2, s2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, cot))(args)
    np.testing.assert_allclose(o2, o1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-6)
    for name, a, b in zip("q k v g beta s0".split(), g2, g1):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
    # nothing of the initial state or an earlier document reaches a later one
    assert float(jnp.abs(g2[5]).max()) > 0          # it reaches the first document
    bounds = (0, *starts, T)
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        piece = tuple(a[:, lo:hi] for a in args[:5])
        o_alone, s_alone = kernel(*piece, scale=0.5, initial_state=None)
        np.testing.assert_allclose(o2[:, lo:hi], o_alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s2, s_alone, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_against_the_float32_reference():
    """bfloat16 q, k, v (float32 state inside): within 1 % relative error (RMS of the difference
    over RMS of the truth, flash-linear-attention's metric) of the float32 reference on the same
    rounded inputs."""
    args, cot = inputs(75, seed=4, dtype=jnp.bfloat16)
    f32 = tuple(None if a is None else a.astype(jnp.float32) for a in args)
    (o1, s1), g1 = jax.jit(lambda a: value_and_grads(reference.gated_delta, a, cot))(f32)
    (o2, s2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, cot))(args)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert o2.dtype == jnp.bfloat16 and rel(o2, o1) < 0.01 and rel(s2, s1) < 0.01
    for name, a, b in zip("q k v g beta s0".split(), g2, g1):
        assert rel(a, b) < 0.01, name


def test_the_dispatcher_runs_the_kernel():
    args, _ = inputs(13, seed=2)
    want = reference.gated_delta(*args[:5], scale=0.5, initial_state=args[5])
    got = gated_delta(*args[:5], scale=0.5, initial_state=args[5], impl="pallas_interpret",
                      block=4)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gated_delta: impl='pallas' needs a TPU or a GPU"):
        gated_delta(*args[:5], scale=0.5, impl="pallas")


def _fns(backend, block):
    def f(q, k, v, g, b, s0):
        return pallas.gated_delta(q, k, v, g, b, scale=0.1, initial_state=s0, block=block,
                                  backend=backend)

    def loss(*a):
        o, S = f(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)
    return f, jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def _abstract(T=256, dk=64, dv=64):
    S = jax.ShapeDtypeStruct
    return (S((1, T, 2, dk), jnp.bfloat16), S((1, T, 2, dk), jnp.bfloat16),
            S((1, T, 2, dv), jnp.bfloat16), S((1, T, 2), jnp.float32), S((1, T, 2), jnp.float32),
            S((1, 2, dk, dv), jnp.float32))


def test_forward_and_backward_are_pallas_calls():
    f, g = _fns("interpret", 8)
    a = _abstract(T=20, dk=8, dv=8)
    assert str(jax.make_jaxpr(f)(*a)).count("pallas_call") == 1
    assert str(jax.make_jaxpr(g)(*a)).count("pallas_call") == 2      # forward (residuals), backward


def test_tpu_export_and_cuda_lowering_hold_the_kernels():
    f, g = _fns("tpu", 64)
    for fn, n in ((f, 1), (g, 2)):
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*_abstract(dk=128, dv=128))
        assert text.mlir_module().count("stablehlo.custom_call @tpu_custom_call") == n
    f, g = _fns("gpu", 16)
    for fn, n in ((f, 1), (g, 2)):
        text = jax.jit(fn).trace(*_abstract()).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == n
