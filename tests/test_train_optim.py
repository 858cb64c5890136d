"""Optimization: gradient accumulation equals the big batch, aux terms weighted by name,
warmup + cosine schedule, clipping, weight-decay mask, mixed precision / remat by name, MFU
FLOP count against XLA on unscanned code, and a short training run that learns."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from asserts import assert_close
from flax import nnx
from train_helpers import tiny_cfg

import zoo
from train import config as C
from train import mfu, optim
from train import trainer as T
from zoo import lm


def _cfg(**kw):
    return zoo.make_config("transformer", dict(dict(vocab_size=64, dim=32, n_layers=1, n_heads=2,
                                                    ffn="swiglu", ffn_dim=64, max_len=16), **kw))


def _model(**kw):
    return zoo.build("transformer", _cfg(**kw), nnx.Rngs(params=0))


def _batch(B=8, T_=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": jnp.asarray(rng.integers(0, 64, (B, T_)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, 64, (B, T_)), jnp.int32),
            # rows with very different numbers of scored tokens: a per-row mean would differ
            "loss_mask": jnp.asarray(rng.random((B, T_)) < np.linspace(0.1, 0.9, B)[:, None],
                                     jnp.float32)}


def _train_cfg(**kw):
    t = C.train_defaults()
    t.warmup_steps = 0
    t.steps = 10
    for k, v in kw.items():
        t[k] = v
    return t


@functools.lru_cache(maxsize=None)
def _big_batch_step():
    """The big-batch step and gradient that every accumulation case compares against (computed
    once for all of them)."""
    model = _model()
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    opt = optim.make_optimizer(_train_cfg())
    batch = _batch()
    big = jax.jit(T.make_train_step(graphdef, opt, grad_accum=1))
    # the big-batch gradient itself, for a direct comparison
    g_ref = jax.jit(jax.grad(lambda p: lm.loss(graphdef, p, batch)[0]))(params)
    p1, _, _, m1 = big(params, opt.init(params), jnp.int32(0), batch)
    return graphdef, params, opt, batch, g_ref, p1, m1


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_big_batch(accum):
    graphdef, params, opt, batch, g_ref, p1, m1 = _big_batch_step()
    acc = jax.jit(T.make_train_step(graphdef, opt, grad_accum=accum))
    p2, _, _, m2 = acc(params, opt.init(params), jnp.int32(0), batch)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["ce_sum"], m1["ce_sum"], rtol=1e-6)
    assert float(m2["n_tokens"]) == float(m1["n_tokens"]) == float(batch["loss_mask"].sum())
    np.testing.assert_allclose(m2["grad_norm"], optax.tree.norm(g_ref), rtol=1e-5)
    # Adam's per-element normalisation turns summation-order differences of near-zero gradient
    # elements into ~1e-3 of one step (lr 3e-3 here)
    assert_close(p2, p1, rtol=1e-5, atol=1e-6, what="accumulated step")


def test_aux_terms_weighted_by_name():
    model = _model()
    graphdef, state = nnx.split(model)
    # a model whose aux statistics yield a named term that depends on the parameters
    model._aux_terms = lambda aux: {"scale": 0.0 * aux.get("x", 0.0) + 2.0}
    graphdef2, _ = nnx.split(model)
    params = nnx.to_pure_dict(state)
    opt = optim.make_optimizer(_train_cfg())
    batch = _batch()
    base = T.make_train_step(graphdef2, opt)(params, opt.init(params), jnp.int32(0), batch)[3]
    w = T.make_train_step(graphdef2, opt, aux_weights={"scale": 0.25})(
        params, opt.init(params), jnp.int32(0), batch)[3]
    assert float(base["aux/scale"]) == 2.0
    np.testing.assert_allclose(float(w["loss"]), float(base["loss"]) + 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(w["ce"]), float(base["ce"]), rtol=1e-6)
    with pytest.raises(C.ConfigError, match=r"train\.aux_weights\.nope.*has: scale"):
        T.make_train_step(graphdef2, opt, aux_weights={"nope": 1.0})(
            params, opt.init(params), jnp.int32(0), batch)


def test_schedule_warmup_cosine():
    t = _train_cfg(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    s = optim.schedule(t)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 50 / 100))
    np.testing.assert_allclose(float(s(60)), mid, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-6)


def test_clipping_and_weight_decay_mask():
    t = _train_cfg(lr=1.0, clip_norm=1.0, weight_decay=0.5, b1=0.0, b2=0.0, eps=0.0)
    opt = optim.make_optimizer(t)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    g = {"w": jnp.full((2, 2), 30.0), "b": jnp.full((2,), 40.0)}
    upd, _ = opt.update(g, opt.init(params), params)
    # lr(step 0) with warmup 0 is the peak; Adam with b1=b2=0 gives sign(g); decay only on w
    np.testing.assert_allclose(upd["b"], -1.0, rtol=1e-6)
    np.testing.assert_allclose(upd["w"], -1.0 - 0.5, rtol=1e-6)
    clipped, _ = optax.clip_by_global_norm(1.0).update(g, None)
    assert abs(float(optax.tree.norm(clipped)) - 1.0) < 1e-6


def test_bf16_compute_and_remat_match_float32():
    graphdef, state = nnx.split(_model())
    params = nnx.to_pure_dict(state)
    batch = _batch()
    ref = jax.jit(lambda p: lm.loss(graphdef, p, batch)[0])(params)
    gd_remat, _ = nnx.split(_model(remat="full"))
    gd_bf16, _ = nnx.split(_model(compute_dtype="bfloat16"))
    g_ref = jax.grad(lambda p: lm.loss(graphdef, p, batch)[0])(params)
    g_remat = jax.grad(lambda p: lm.loss(gd_remat, p, batch)[0])(params)
    assert_close(g_remat, g_ref, rtol=1e-5, atol=1e-7, what="remat gradient")
    bf = jax.jit(lambda p: lm.loss(gd_bf16, p, batch)[0])(params)
    assert abs(float(bf) - float(ref)) < 0.02 * float(ref)     # bf16 rounding, same function
    assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_config_rejects_unknown_remat_policy():
    cfg = tiny_cfg("/tmp/unused", **{"model.remat": "everything"})
    with pytest.raises(C.ConfigError, match="model.remat"):
        C.resolve(cfg)


def test_flops_per_token_is_the_registry_declaration_and_matches_xla():
    """The trainer's count is the model's registry declaration; at dim 64 it agrees with XLA's
    cost analysis of the compiled train gradient (the Transformer's blocks are a Python loop and
    the reference attention has no scan, so XLA sees every FLOP)."""
    T_ = 64
    cfg = _cfg(dim=64, n_heads=4, ffn_dim=128, max_len=T_, impl="reference")
    model = zoo.build("transformer", cfg, nnx.Rngs(params=0))
    assert mfu.flops_per_token("transformer", cfg, T_) == zoo.get("transformer").flops(cfg, T_)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    B = 4
    batch = _batch(B, T_)
    f = jax.jit(jax.grad(lambda p: lm.loss(graphdef, p, batch)[0]))
    xla = f.lower(params).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    analytic = mfu.flops_per_token("transformer", cfg, T_) * B * T_
    # XLA also counts softmax, norms and elementwise work, which the analytic count leaves out
    assert 0.9 * analytic < xla["flops"] < 1.35 * analytic, (xla["flops"], analytic)


def test_short_training_run_learns(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", **{"train.steps": 60, "train.lr": 1e-2,
                                        "train.warmup_steps": 5, "train.log_every": 10,
                                        "checkpoint.every": 1000})
    out = T.train(cfg, verbose=False)
    first, last = out["losses"][10], out["losses"][60]
    assert last < first - 0.5, out["losses"]


# the groups each family's reference code has (specs: mamba.md §init, lssl.md's lssl.yaml,
# gam.md's recipe; the Llama recipe: no decay on norms and biases)
GROUPS_EXPECTED = {
    "mamba": {"mixer.A_log": (False, 2e-3), "mixer.D": (False, 2e-3),
              "mixer.in_proj.weight": (True, 2e-3), "mixer.dt_b": (False, 2e-3),
              "norm1.weight": (False, 2e-3)},
    "mamba2": {"mixer.A_log": (False, 2e-3), "mixer.D": (False, 2e-3),
               "mixer.dt_bias": (False, 2e-3), "mixer.in_proj.weight": (True, 2e-3)},
    "lssl": {**{f"mixer.{k}": (False, 1e-4) for k in ("p", "q", "dg", "t_diag", "t_sub",
                                                      "t_sup", "b")},
             "mixer.log_dt": (False, 1e-3), "mixer.C": (True, 2e-3),
             "mixer.out.weight": (True, 2e-3), "mixer.out.bias": (False, 2e-3)},
    "gam": {"norm1.weight": (True, 2e-3)},
    "transformer": {"mixer.wq.weight": (True, 2e-3), "norm1.weight": (False, 2e-3),
                    "ffn.w2.weight": (True, 2e-3)},
}


@pytest.mark.parametrize("name", sorted(GROUPS_EXPECTED))
def test_parameter_groups_are_the_reference_codes(name):
    cfg = zoo.get(name).conformance.config
    params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: zoo.build(name, cfg)))[1])
    table = optim.param_groups(params, zoo.get(name).groups, lr=2e-3)
    for suffix, want in GROUPS_EXPECTED[name].items():
        hits = {k: v[:2] for k, v in table.items() if k.startswith("blocks.0.") and k.endswith(suffix)}
        assert hits and all(v == want for v in hits.values()), (name, suffix, hits)
    if name == "gam":                # every parameter decays, 1-D ones included
        assert all(v[0] for v in table.values())


def test_groups_change_the_update_as_declared():
    """One AdamW step with zero gradients moves a parameter by exactly -lr_group * wd * p when it
    decays and not at all otherwise: LSSL's transition at its own 1e-4, the base rate elsewhere."""
    t = C.train_defaults()
    t.lr, t.warmup_steps, t.weight_decay, t.clip_norm = 2e-3, 0, 0.5, 0.0
    cfg = zoo.get("lssl").conformance.config
    params = nnx.to_pure_dict(nnx.split(zoo.build("lssl", cfg, nnx.Rngs(params=0)))[1])
    groups = zoo.get("lssl").groups
    opt = optim.make_optimizer(t, groups, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    table = optim.param_groups(params, groups, t.lr)
    flat = {optim._path(p): (u, x) for (p, u), (_, x) in
            zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                jax.tree_util.tree_flatten_with_path(params)[0])}
    seen = set()
    for name, (u, x) in flat.items():
        decay, rate, group = table[name]
        want = -rate * t.weight_decay * np.asarray(x) if decay else np.zeros_like(x)
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, atol=1e-12, err_msg=name)
        seen.add((decay, rate))
    assert {(True, 2e-3), (False, 2e-3), (False, 1e-4)} <= seen
    # without groups the chain keeps the layout older checkpoints have
    plain = optim.make_optimizer(t)
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(
        optim.make_optimizer(t, zoo.get("mamba").groups, params).init(params))


def test_anneal_sets_matching_parameters_from_the_step_without_gradient():
    """`train.anneal` (hydra.md §2.7 stage 3's router temperature): glob=start:end, linear over
    the steps; the loss sees the scheduled value, the gradient of that leaf is exactly 0; bad
    specs and globs that match nothing are one ConfigError line before anything compiles."""
    table = optim.parse_anneal("*.t=2.0:1.0")
    params = {"a": {"t": jnp.asarray(7.0)}, "b": {"w": jnp.ones((2,))}}
    at = [float(optim.anneal(params, table, s, 5)["a"]["t"]) for s in range(6)]
    assert at == [2.0, 1.75, 1.5, 1.25, 1.0, 1.0]
    assert optim.anneal(params, table, 3, 5)["b"]["w"] is params["b"]["w"]
    g = jax.grad(lambda p: optim.anneal(p, table, 1, 5)["a"]["t"] * jnp.sum(p["b"]["w"]))(params)
    assert float(g["a"]["t"]) == 0.0 and np.allclose(g["b"]["w"], 1.75)
    for bad in ("*.t=2.0", "*.t:2:1", "=1:2", "*.t=a:1"):
        cfg = tiny_cfg("")
        cfg.train.anneal = bad
        with pytest.raises(C.ConfigError, match="train.anneal: .* is not glob=start:end"):
            C.resolve(cfg)
    cfg = tiny_cfg("")
    cfg.train.anneal = "*.nothing=1:2"
    with pytest.raises(C.ConfigError, match="'\\*.nothing' matches no parameter"):
        T.build_setup(*C.resolve(cfg))
