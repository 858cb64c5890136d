"""The Mamba-1 selective-scan Pallas kernels (pallas_kernels/selective_scan/pallas.py) in
interpret mode against the reference scan: y, the final state and every gradient (x, dt, A, B,
C, h0) at lengths that are no multiple of the token block (1, 63, 75), with an initial state and
document resets, Euler and exact-ZOH inputs, several channel blocks; bfloat16 inputs against the
float32 reference; sharded over a mesh; the jaxpr, TPU export and CUDA lowering hold the kernels
(forward and backward); the dispatcher runs them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_kernel_calls

from pallas_kernels.selective_scan import pallas, reference, selective_scan

B, DI, N = 2, 16, 4
NAMES = ("x", "dt", "A", "B", "C", "h0")


def inputs(T, *, seed=0, resets=(), dtype=jnp.float32, b=B):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (b, T, DI)).astype(dtype)
    dt = (0.5 * jax.nn.softplus(jax.random.normal(ks[1], (b, T, DI)))).astype(dtype)
    A = -jnp.exp(0.5 * jax.random.normal(ks[2], (DI, N)))
    Bm = jax.random.normal(ks[3], (b, T, N)).astype(dtype)
    C = jax.random.normal(ks[4], (b, T, N)).astype(dtype)
    h0 = jax.random.normal(ks[5], (b, DI, N))
    reset = jnp.zeros((b, T), bool)
    for r, t in resets:
        reset = reset.at[r, t].set(True)
    return (x, dt, A, Bm, C, h0), reset, jax.random.normal(ks[6], (b, T, DI))


def value_and_grads(fn, args, reset, cot, zoh):
    def loss(*a):
        y, h = fn(*a[:5], h0=a[5], reset=reset, exact_zoh=zoh)
        return jnp.sum(y * cot) + jnp.sum(jnp.sin(h))
    return (fn(*args[:5], h0=args[5], reset=reset, exact_zoh=zoh),
            jax.grad(loss, argnums=tuple(range(6)))(*args))


def kernel(*a, **kw):
    return pallas.selective_scan(*a, block=16, channels=8, backend="interpret", **kw)


@pytest.mark.parametrize("T, zoh, resets", [(1, False, ()), (63, False, ((1, 20), (0, 32))),
                                            (75, True, ((1, 5),))])
def test_kernels_equal_the_reference_outputs_state_and_gradients(T, zoh, resets):
    args, reset, cot = inputs(T, seed=T, resets=resets)
    (y1, h1), g1 = jax.jit(lambda a: value_and_grads(reference.selective_scan, a, reset, cot, zoh))(args)
    (y2, h2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, reset, cot, zoh))(args)
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(NAMES, g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
    if resets:           # nothing of h0 crosses a reset into the rest of that row
        r, t = resets[0]
        x, dt, A, Bm, C = (a if a.ndim == 2 else a[r:r + 1, t:] for a in args[:5])
        alone = kernel(x, dt, A, Bm, C, exact_zoh=zoh)[0]
        np.testing.assert_allclose(y2[r:r + 1, t:], alone, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_against_the_float32_reference():
    """bfloat16 x, dt, B, C (float32 state inside): within 1 % relative error (RMS of the
    difference over RMS of the truth) of the float32 reference on the same rounded inputs."""
    args, reset, cot = inputs(75, seed=4, resets=((0, 30),), dtype=jnp.bfloat16)
    f32 = tuple(a.astype(jnp.float32) for a in args)
    (y1, h1), g1 = jax.jit(lambda a: value_and_grads(reference.selective_scan, a, reset, cot, False))(f32)
    (y2, h2), g2 = jax.jit(lambda a: value_and_grads(kernel, a, reset, cot, False))(args)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert y2.dtype == jnp.float32 and rel(y2, y1) < 0.01 and rel(h2, h1) < 0.01
    for name, a, b in zip(NAMES, g2, g1):
        assert a.dtype == args[NAMES.index(name)].dtype and rel(a, b) < 0.01, name


def test_the_dispatcher_and_the_mesh():
    """impl="pallas_interpret" through the op; under a 4 x 2 mesh the kernel runs in shard_map
    (batch over both axes) with the unsharded outputs and gradients."""
    from jax.sharding import AxisType
    args, reset, cot = inputs(13, seed=2, resets=((3, 4),), b=8)
    want = reference.selective_scan(*args[:5], h0=args[5], reset=reset)
    got = selective_scan(*args[:5], h0=args[5], reset=reset, impl="pallas_interpret", block=4)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="selective_scan: impl='pallas' needs a TPU or a GPU"):
        selective_scan(*args[:5], impl="pallas")
    f = jax.jit(lambda a: value_and_grads(kernel, a, reset, cot, False))
    plain = f(args)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(lambda a: value_and_grads(
            kernel, a, reset, cot, False))(args))
        sharded = f(args)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _fns(backend, block, channels):
    def f(x, dt, A, Bm, C):
        return pallas.selective_scan(x, dt, A, Bm, C, block=block, channels=channels,
                                     backend=backend)

    def loss(*a):
        y, h = f(*a)
        return jnp.sum(y) + jnp.sum(h)
    return f, jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def _abstract(T=256, di=256, n=16):
    S = jax.ShapeDtypeStruct
    return (S((1, T, di), jnp.bfloat16), S((1, T, di), jnp.bfloat16), S((di, n), jnp.float32),
            S((1, T, n), jnp.bfloat16), S((1, T, n), jnp.bfloat16))


def test_the_kernels_are_pallas_calls_for_interpret_tpu_and_cuda():
    assert_kernel_calls(*_fns("interpret", 8, 8), *_fns("tpu", 64, 128), _abstract(), *_fns("gpu", 16, 128), _abstract(), _abstract(T=20, di=16, n=4))
