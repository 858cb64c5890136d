"""The neural-memory Pallas kernels (pallas_kernels/neural_memory/pallas.py) in interpret mode
against the reference token loop: the read, the final (W, S, anchor) and every gradient (q, k, v,
the gates, the learning rate, the initial memory W0, the carried state) at lengths that are no
multiple of the kernel block or of the anchor chunk (1, 63, 75), with a carried initial state,
document resets (mid-block), right padding, a call starting mid-chunk, Titans' and ATLAS' update
forms and no momentum; bfloat16 inputs against the float32 reference; the jaxpr, TPU export and
CUDA lowering hold the kernels (forward and backward); rules the kernels do not cover are one
line, at validate() for the models."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asserts import assert_kernel_calls

import zoo
from layers.memory_nets import linear_memory, mlp_memory
from pallas_kernels.neural_memory import (
    MemoryRule,
    init_state,
    kernel_error,
    l2_signal,
    neural_memory,
    pallas,
    reference,
)

B, H, DK, DV = 2, 2, 8, 16
NAMES = ("q", "k", "v", "log_ret", "lr", "log_mom", "W0", "W", "S")


def inputs(T, *, seed=0, momentum=True, start=0, resets=(), pad=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 10)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (B, T, H, DK))).astype(dtype)
    k = unit(jax.random.normal(ks[1], (B, T, H, DK))).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, DV)).astype(dtype)
    log_ret = -0.3 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    lr = 0.5 * jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    log_mom = -jax.nn.softplus(jax.random.normal(ks[5], (B, T, H))) if momentum else None
    W0 = {"w": 0.3 * jax.random.normal(ks[6], (H, DK, DV))}
    W = 0.3 * jax.random.normal(ks[7], (B, H, DK, DV))
    S = 0.1 * jax.random.normal(ks[8], (B, H, DK, DV))
    pos = jnp.broadcast_to(start + jnp.arange(T), (B, T))
    reset = jnp.zeros((B, T), bool)
    for t in resets:               # row 1 starts a new document at t
        reset = reset.at[1, t].set(True)
        pos = pos.at[1, t:].set(jnp.arange(T - t))
    real = jnp.ones((B, T), bool)
    if pad:
        real = real.at[0, T - pad:].set(False)
    cot = jax.random.normal(ks[9], (B, T, H, DV))
    return dict(q=q, k=k, v=v, log_ret=log_ret, lr=lr, log_mom=log_mom, W0=W0, W=W, S=S), \
        dict(pos=pos, reset=reset, real=real), cot


def value_and_grads(fn, rule, diff, fixed, cot):
    def run(d):
        st = init_state(d["W0"], B, DK, DV)
        st = st.replace(W={"w": d["W"]}, S={"w": d["S"]}, anchor={"w": 0.5 * d["W"]})
        return fn(rule, None, d["W0"], st, d["q"], d["k"], d["v"], log_ret=d["log_ret"],
                  lr=d["lr"], log_mom=d["log_mom"], **fixed)

    def loss(d):
        y, st = run(d)
        return (jnp.sum(y.astype(jnp.float32) * cot) + jnp.sum(jnp.sin(st.W["w"]))
                + jnp.sum(st.S["w"] ** 2) + jnp.sum(st.anchor["w"] * 0.7))
    y, st = run(diff)
    return (y, st.W["w"], st.S["w"], st.anchor["w"]), jax.grad(loss)(diff)


def kernel(*a, **kw):
    return pallas.neural_memory(*a, block=16, backend="interpret", **kw)


def _close(got, want, rtol, atol, what):
    for name in want:
        if want[name] is None:
            continue
        np.testing.assert_allclose(jax.tree.leaves(got[name])[0], jax.tree.leaves(want[name])[0],
                                   rtol=rtol, atol=atol, err_msg=f"{what} d{name}")


@pytest.mark.parametrize("T, chunk, inside, kw", [
    (1, 4, True, dict()),
    (63, 4, True, dict(resets=(9, 40), pad=5)),
    (75, 8, False, dict(start=3, resets=(20,))),          # ATLAS' form, a call from mid-chunk
    (63, 1, True, dict(momentum=False, pad=3)),             # the online rule without momentum
])
def test_kernels_equal_the_reference_outputs_state_and_gradients(T, chunk, inside, kw):
    rule = MemoryRule(linear_memory, l2_signal, chunk=chunk, lr_inside=inside)
    diff, fixed, cot = inputs(T, seed=T + chunk, **kw)
    want, g1 = jax.jit(lambda d: value_and_grads(reference.neural_memory, rule, d, fixed, cot))(diff)
    got, g2 = jax.jit(lambda d: value_and_grads(kernel, rule, d, fixed, cot))(diff)
    for name, a, b in zip(("y", "W", "S", "anchor"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    if kw.get("pad"):
        assert float(jnp.abs(got[0][0, T - kw["pad"]:]).max()) == 0.0     # pads read nothing
    _close(g2, g1, 1e-4, 1e-5, f"T={T}")
    for name in NAMES:
        if diff[name] is not None:
            assert np.isfinite(np.asarray(jax.tree.leaves(g2[name])[0])).all(), name


def test_bfloat16_inputs_against_the_float32_reference():
    """bfloat16 q, k, v (float32 state inside): within 1 % relative error (RMS of the difference
    over RMS of the truth, flash-linear-attention's metric) of the float32 reference on the same
    rounded inputs."""
    rule = MemoryRule(linear_memory, l2_signal, chunk=4)
    diff, fixed, cot = inputs(75, seed=4, resets=(30,), dtype=jnp.bfloat16)
    f32 = {n: (None if a is None else jax.tree.map(lambda x: x.astype(jnp.float32), a))
           for n, a in diff.items()}
    want, g1 = jax.jit(lambda d: value_and_grads(reference.neural_memory, rule, d, fixed, cot))(f32)
    got, g2 = jax.jit(lambda d: value_and_grads(kernel, rule, d, fixed, cot))(diff)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert got[0].dtype == jnp.float32
    for name, a, b in zip(("y", "W", "S", "anchor"), got, want):
        assert rel(a, b) < 0.01, name
    for name in NAMES:
        if diff[name] is not None:
            assert rel(jax.tree.leaves(g2[name])[0], jax.tree.leaves(g1[name])[0]) < 0.01, name


def test_the_dispatcher_runs_the_kernel_and_rejects_other_rules():
    rule = MemoryRule(linear_memory, l2_signal, chunk=4)
    diff, fixed, _ = inputs(13, seed=2)
    st = init_state(diff["W0"], B, DK, DV)
    args = (None, diff["W0"], st, diff["q"], diff["k"], diff["v"])
    kw = dict(log_ret=diff["log_ret"], lr=diff["lr"], log_mom=diff["log_mom"], **fixed)
    want = reference.neural_memory(rule, *args, **kw)
    got = neural_memory(rule, *args, impl="pallas_interpret", block=4, **kw)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1].W["w"], want[1].W["w"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="neural_memory: impl='pallas' needs a TPU or a GPU"):
        neural_memory(rule, *args, impl="pallas", **kw)
    for other, why in ((MemoryRule(mlp_memory, l2_signal), "not the matrix memory"),
                       (MemoryRule(linear_memory, lambda p, v, e=None: -v), "objective is not l2"),
                       (MemoryRule(linear_memory, l2_signal, window=2), "window is 2"),
                       (MemoryRule(linear_memory, l2_signal, transform_fn=lambda s: s),
                        "update transform")):
        assert why in kernel_error(other)
        with pytest.raises(ValueError, match=f"cannot run this memory: .*{why}"):
            neural_memory(other, *args, impl="pallas_interpret", **kw)
    assert kernel_error(rule) is None


def test_models_reject_a_kernel_their_memory_lacks_at_validate():
    cfg = zoo.make_config("titans_lmm", {})
    with pytest.raises(ValueError, match=r"^model\.impl='pallas_interpret': the neural_memory "
                                         r"kernel cannot run this memory: its memory is not"):
        dataclasses.replace(cfg, memory="mlp", impl="pallas_interpret").validate()
    dataclasses.replace(cfg, memory="linear", impl="pallas_interpret").validate()
    with pytest.raises(ValueError, match=r"^model\.impl='pallas_interpret': the neural_memory "
                                         r"kernel cannot run this memory: the kernels cover"):
        dataclasses.replace(zoo.make_config("omeganet", {}), impl="pallas_interpret").validate()


def _fns(backend, block, chunk=4):
    rule = MemoryRule(linear_memory, l2_signal, chunk=chunk)

    def f(q, k, v, log_ret, lr, log_mom, w0):
        B_, T = q.shape[:2]
        st = init_state({"w": w0}, B_, q.shape[-1], v.shape[-1])
        pos = jnp.broadcast_to(jnp.arange(T), (B_, T))
        y, st = pallas.neural_memory(rule, None, {"w": w0}, st, q, k, v, log_ret=log_ret, lr=lr,
                                     log_mom=log_mom, pos=pos, reset=pos < 0, real=pos >= 0,
                                     block=block, backend=backend)
        return y, st.W["w"]

    def loss(*a):
        y, W = f(*a)
        return jnp.sum(y) + jnp.sum(W)
    return f, jax.grad(loss, argnums=tuple(range(7)))


def _abstract(T=256, dk=64, dv=64):
    S = jax.ShapeDtypeStruct
    return (S((1, T, 2, dk), jnp.bfloat16), S((1, T, 2, dk), jnp.bfloat16),
            S((1, T, 2, dv), jnp.bfloat16), S((1, T, 2), jnp.float32), S((1, T, 2), jnp.float32),
            S((1, T, 2), jnp.float32), S((2, dk, dv), jnp.float32))




def test_the_kernel_runs_sharded_over_the_mesh():
    """Under a mesh (the trainer's jax.set_mesh), the kernel runs inside `jax.shard_map`: batch
    over data (4), heads over tensor (2) on the 8 virtual devices; outputs and gradients equal
    the unsharded call."""
    from jax.sharding import AxisType
    f, g = _fns("interpret", 8)
    ks = jax.random.split(jax.random.key(3), 7)
    Bm, T, Hm, d = 4, 12, 2, 8
    args = (jax.random.normal(ks[0], (Bm, T, Hm, d)), 0.3 * jax.random.normal(ks[1], (Bm, T, Hm, d)),
            jax.random.normal(ks[2], (Bm, T, Hm, d)),
            -jax.nn.softplus(jax.random.normal(ks[3], (Bm, T, Hm))),
            0.3 * jax.nn.sigmoid(jax.random.normal(ks[4], (Bm, T, Hm))),
            -jax.nn.softplus(jax.random.normal(ks[5], (Bm, T, Hm))),
            0.1 * jax.random.normal(ks[6], (Hm, d, d)))
    want = jax.jit(f)(*args), jax.jit(g)(*args)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(g)(*args))
        got = jax.jit(f)(*args), jax.jit(g)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_kernels_are_pallas_calls_for_interpret_tpu_and_cuda():
    assert_kernel_calls(*_fns("interpret", 8), *_fns("tpu", 64), _abstract(dk=128, dv=128), *_fns("gpu", 16), _abstract(), _abstract(T=20, dk=8, dv=8))
