"""The flash-attention Pallas kernels (pallas_kernels/attention/pallas.py, the harness
pallas_kernels/harness.py) in interpret mode against the reference op: forward and every
gradient (q, k, v, the key bias) at lengths that are no multiple of the block (1, 63, 75, 200),
with GQA, the sliding window, document groups, invalid keys, the always-visible prefix and a
bias; bfloat16 inputs against the float32 reference; and the checks a fallback cannot pass: the
jaxpr of the forward and of the backward holds the `pallas_call`s, the TPU export holds the
Mosaic custom calls and the CUDA lowering the Triton ones, and a kernel request on a CPU or on an
op without a kernel is one error line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.rat  # noqa: F401  (registers the op)
from pallas_kernels.attention import attention, pallas, reference
from pallas_kernels.impl import Impl, resolve

B, H, HKV, D = 2, 4, 2, 16
BLOCK = 32


def inputs(T, S, *, window=None, seg=False, prefix=0, bias=False, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D)).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, HKV, D)).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, HKV, D)).astype(dtype)
    kpos = jnp.broadcast_to(jnp.arange(S) - prefix, (B, S)).astype(jnp.int32)
    qpos = kpos[:, S - T:]
    kg = jnp.zeros((B, S), jnp.int32)
    if seg:                                   # a second document from the middle on
        kg = jnp.broadcast_to((jnp.arange(S) >= S // 2).astype(jnp.int32), (B, S))
    masks = dict(q_pos=qpos, k_pos=kpos, q_group=kg[:, S - T:], k_group=kg,
                 k_valid=jnp.ones((B, S), bool).at[1, S // 3].set(False), window=window,
                 k_always=jnp.broadcast_to(jnp.arange(S) < prefix, (B, S)) if prefix else None)
    kb = jax.random.normal(ks[3], (B, 1, S)) if bias else None
    return (q, k, v, kb), masks


def value_and_grads(fn, masks, args):
    q, k, v, kb = args
    do = jax.random.normal(jax.random.key(9), q.shape[:3] + (v.shape[-1],))

    def loss(q, k, v, kb):
        return jnp.sum(fn(q, k, v, k_bias=kb, **masks).astype(jnp.float32) * do)
    argnums = (0, 1, 2) if kb is None else (0, 1, 2, 3)
    out = fn(q, k, v, k_bias=kb, **masks)
    return out, jax.grad(loss, argnums=argnums)(q, k, v, kb)


def kernel(q, k, v, **kw):
    return pallas.attention(q, k, v, block=BLOCK, block_q=16, backend="interpret", **kw)


CASES = {"1": dict(T=1, S=1), "63": dict(T=63, S=63), "75-window": dict(T=75, S=75, window=10),
         "200-docs-window": dict(T=200, S=200, seg=True, window=37),
         "decode-3-of-75-prefix-bias": dict(T=3, S=75, prefix=4, bias=True),
         "75-docs-prefix-bias": dict(T=75, S=75, seg=True, prefix=5, bias=True)}


@pytest.mark.parametrize("case", CASES)
def test_kernels_equal_the_reference_forward_and_gradients(case):
    args, masks = inputs(**CASES[case], seed=len(case))
    want, want_g = jax.jit(lambda a: value_and_grads(reference.attention, masks, a))(args)
    got, got_g = jax.jit(lambda a: value_and_grads(kernel, masks, a))(args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    for name, a, b in zip("q k v bias".split(), got_g, want_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")


def rel_err(a, b):
    """flash-linear-attention's `get_err_ratio`: RMS of the difference over RMS of the truth."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def test_bfloat16_inputs_against_the_float32_reference():
    """bfloat16 q, k, v (float32 softmax state and accumulators inside): within 1 % relative
    error of the float32 reference on the same (rounded) inputs, forward and gradients. bf16's
    8-bit mantissa rounds each input by up to 0.4 %; the outputs land near 0.3 % (measured)."""
    args, masks = inputs(75, 75, window=20, seg=True, dtype=jnp.bfloat16, seed=3)
    f32 = tuple(None if a is None else a.astype(jnp.float32) for a in args)
    want, want_g = jax.jit(lambda a: value_and_grads(reference.attention, masks, a))(f32)
    got, got_g = jax.jit(lambda a: value_and_grads(kernel, masks, a))(args)
    assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_g)
    assert rel_err(got, want) < 0.01
    for name, a, b in zip("qkv", got_g, want_g):
        assert rel_err(a, b) < 0.01, name


def test_the_dispatcher_runs_the_kernel_and_refuses_it_where_it_cannot():
    args, masks = inputs(13, 13, window=4, seed=5)
    q, k, v, _ = args
    ref = reference.attention(q, k, v, **masks)
    np.testing.assert_allclose(attention(q, k, v, impl="pallas_interpret", block=8, **masks), ref,
                               rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="attention: impl='pallas' needs a TPU or a GPU"):
        attention(q, k, v, impl="pallas", **masks)
    with pytest.raises(ValueError, match="rat: impl='pallas_interpret' is not available"):
        resolve("rat", "pallas_interpret", auto=Impl.REFERENCE)   # an op without a kernel


def _grad_fn(backend, block):
    def f(q, k, v, p, g, val):
        return pallas.attention(q, k, v, q_pos=p, k_pos=p, q_group=g, k_group=g, k_valid=val,
                                window=100, block=block, backend=backend)

    def loss(*a):
        return jnp.sum(f(*a).astype(jnp.float32))
    return f, jax.grad(loss, argnums=(0, 1, 2))


def _abstract(T=256, d=128):
    return (jax.ShapeDtypeStruct((1, T, 4, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, T, 2, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, T, 2, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1, T), jnp.int32),
            jax.ShapeDtypeStruct((1, T), jnp.bool_))


def test_forward_and_backward_are_pallas_calls_in_the_jaxpr():
    f, g = _grad_fn("interpret", 16)
    a = _abstract(T=40, d=16)
    assert str(jax.make_jaxpr(f)(*a)).count("pallas_call") == 1
    # the backward: the forward again (its residuals) and the dq and dk/dv kernels
    assert str(jax.make_jaxpr(g)(*a)).count("pallas_call") == 3


def test_tpu_export_holds_the_mosaic_kernels():
    f, g = _grad_fn("tpu", 128)
    for fn, n in ((f, 1), (g, 3)):
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*_abstract()).mlir_module()
        assert text.count("stablehlo.custom_call @tpu_custom_call") == n


def test_cuda_lowering_holds_the_triton_kernels():
    f, g = _grad_fn("gpu", 64)
    for fn, n in ((f, 1), (g, 3)):
        text = jax.jit(fn).trace(*_abstract()).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == n


def test_a_kernel_backed_transformer_trains_on_the_mesh(tmp_path):
    """Issue 18 item 5: the kernel runs under `jax.shard_map` inside the jitted train step on 8
    virtual devices (batch over data x fsdp = 4, heads over tensor = 2; the trainer sets the
    mesh): the step's jaxpr holds the shard_map around the pallas_calls, and three steps give the
    reference implementation's losses."""
    from train_helpers import tiny_cfg

    from train import config as C
    from train import trainer as T

    def run(impl):
        cfg = tiny_cfg(tmp_path / impl, **{"train.steps": 3, "mesh.shape": (2, 2, 2),
                                           "checkpoint.every": 3})
        cfg.model.n_heads, cfg.model.n_kv_heads = 4, 2
        cfg.model.impl, cfg.model.block = impl, 16
        return cfg

    resolved, model_cfg = C.resolve(run("pallas_interpret"))
    s = T.build_setup(resolved, model_cfg)
    with jax.set_mesh(s.mesh):
        text = str(jax.make_jaxpr(s.train_step)(s.abstract_params, s.abstract_opt_state,
                                                jnp.int32(0), T.abstract_batch(resolved)))
    assert "shard_map" in text and text.count("pallas_call") >= 3
    want = T.train(run("reference"), verbose=False)["losses"]
    got = T.train(run("pallas_interpret"), verbose=False)["losses"]
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)],
                               rtol=2e-5)
