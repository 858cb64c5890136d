"""Hydra (zoo/hydra.py; specs/hydra.md §7; the layers have their own files: test_hydra_ssm,
test_sga, test_moe, test_pkm): the conformance runs clear of every discrete decision, block
reductions, the prototype's non-causal chunk-mean router caught by the causality check the
model passes, and §3.2's parameter accounting on the 1.6B layout built abstractly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conformance_inputs import conformance_rows
from flax import nnx

import layers.moe as LMoE
import zoo
from zoo.hydra import MARGIN, decision_margins, hydra_1p6b, hydra_param_count

SPEC = zoo.get("hydra").conformance


def test_conformance_runs_are_clear_of_every_decision():
    """The conformance suite's token sets (its seeds and batch sizes, the causality
    perturbations, the shifted document-reset rows) have every MoE top-k gap, SGA |r_j| and PKM
    top-k gap above MARGIN (the contract notes' discrete decisions)."""
    cfg = SPEC.config
    x, mask, _ = conformance_rows(SPEC)
    model = zoo.build("hydra", cfg, rngs=0)
    gd, st = nnx.split(model)
    low = jax.jit(lambda st, x, m: jnp.min(jnp.stack([
        jnp.min(jnp.where(m, g, jnp.inf)) for g in decision_margins(nnx.merge(gd, st), x, m)])))
    assert float(low(st, x, mask)) > MARGIN
    assert SPEC.check_margins is zoo.hydra.check_margins


def test_block_reductions():
    """§7.3: g2 = g3 = 0 gives the SSM-only residual block; a block without SGA / MoE equals
    the same block with those paths present and g = 0."""
    cfg = dataclasses.replace(SPEC.config, pkm_layer=0)
    model = zoo.build("hydra", cfg, rngs=0)
    blk = model.blocks[1]
    assert blk.sga is not None and blk.moe is not None
    blk.g[...] = jnp.asarray([0.8, 0.0, 0.0])
    x = jax.random.normal(jax.random.key(2), (2, 9, cfg.dim))
    run = nnx.jit(lambda b, x: b(x)[0])     # compiled per block structure
    want = x + 0.8 * nnx.jit(lambda b, x: b.ssm(b.norm_ssm(x))[0])(blk, x)
    np.testing.assert_allclose(run(blk, x), want, rtol=1e-6, atol=1e-6)
    blk.sga = blk.moe = None
    blk.norm_sga = blk.norm_moe = None
    np.testing.assert_allclose(run(blk, x), want, rtol=1e-6, atol=1e-6)


def _causal_gap(model, x, cut):
    """max |logits[:, :cut]| change when the tokens from `cut` on change (one fresh compile:
    a patched routing function is traced anew)."""
    f = nnx.jit(lambda m, x: m(x)[0])
    y = f(model, x)
    x2 = x.at[:, cut:].set((x[:, cut:] + 11) % model.vocab_size)
    return float(jnp.max(jnp.abs(f(model, x2)[:, :cut] - y[:, :cut])))


def test_the_prototype_chunk_mean_router_leaks_and_the_causal_one_does_not(monkeypatch):
    """§2.4 and §7.8: routing chunk c by its own mean (the prototype's ChunkTop2MoE) lets a
    token's output depend on later tokens of its chunk; the previous-chunk mean does not."""
    model = zoo.build("hydra", SPEC.config, rngs=0)
    x = jax.random.randint(jax.random.key(4), (2, 16), 0, SPEC.config.vocab_size)
    assert _causal_gap(model, x, 5) == 0.0

    def own_chunk_mean(x_, real, pos, next_pos, state, m_init, chunk):
        B, T, D = x_.shape
        means = jnp.repeat(x_.reshape(B, T // chunk, chunk, D).mean(2), chunk, axis=1)
        return means, state

    monkeypatch.setattr(LMoE, "chunk_route_features", own_chunk_mean)
    assert _causal_gap(model, x, 5) > 1e-4


def test_1p6b_accounting_matches_the_built_layout():
    """§3.2: the formula gives ≈ 1.610 B (within 1 %) and equals the parameter count of the
    1.6B layout built with jax.eval_shape (nothing allocated); 8 SGA, 12 MoE blocks, one PKM."""
    cfg = hydra_1p6b()
    n = hydra_param_count(cfg)
    assert abs(n / 1.610e9 - 1) < 0.01, n
    assert sum(cfg.has_sga(i) for i in range(24)) == 8
    assert sum(cfg.has_moe(i) for i in range(24)) == 12
    abstract = nnx.eval_shape(lambda: zoo.build("hydra", cfg, nnx.Rngs(0)))
    built = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert built == n


def test_staged_curriculum_restores_what_exists_and_initialises_what_is_new(tmp_path):
    """§2.7 with `checkpoint.init_from`: stage 1 trains the SSM-only Hydra (no SGA, MoE, PKM);
    stage 2 adds SGA from stage 1's checkpoint: every parameter stage 1 had is its trained
    value, the SGA's (and its norm's) are a fresh initialisation's, the step restarts at 0;
    an init_from without a checkpoint is one line before anything compiles."""
    import pytest
    from train_helpers import tiny_cfg

    from train import config as C
    from train import trainer as T
    from train.rundir import RunDir

    def cfg_for(run, **model):
        cfg = tiny_cfg(run, **{"train.steps": 3, "checkpoint.every": 3})
        base = dict(vocab_size=cfg.model.vocab_size, dim=16, n_layers=2, sga_every=99,
                    moe_every=99, pkm_layer=0, impl="auto")
        cfg.model = C.model_section("hydra", dataclasses.replace(SPEC.config, **{**base, **model}),
                                    vocab_size=None)
        return cfg

    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    T.train(cfg_for(s1), verbose=False)
    c2 = cfg_for(s2, sga_every=2)
    c2.checkpoint.init_from = str(s1)
    c2.train.steps = 1
    c2.train.warmup_steps = 0
    c2.train.lr = 1e-30   # (lr must be > 0) stage 2's one step leaves float32 values unchanged
    T.train(c2, verbose=False)
    p1 = RunDir(str(s1)).restore_params()[3]
    p2 = RunDir(str(s2)).restore_params()[3]
    flat1 = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(p1)[0]}
    flat2 = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(p2)[0]}
    new = sorted(set(flat2) - set(flat1))
    assert new and all("sga" in k for k in new), new
    for k, v in flat1.items():
        np.testing.assert_array_equal(np.asarray(flat2[k]), np.asarray(v), err_msg=k)
    resolved, model_cfg = C.resolve(c2)
    fresh = nnx.to_pure_dict(nnx.split(zoo.build("hydra", model_cfg,
                                                 nnx.Rngs(params=resolved.train.seed)))[1])
    flat_f = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(fresh)[0]}
    for k in new:   # (a zero-initialised bias moved by lr 1e-30: atol 1e-25)
        np.testing.assert_allclose(np.asarray(flat2[k]), np.asarray(flat_f[k]), rtol=1e-6,
                                   atol=1e-25, err_msg=k)
    assert RunDir(str(s2)).steps() == [1]
    bad = cfg_for(tmp_path / "stage3")
    bad.checkpoint.init_from = str(tmp_path / "nowhere")
    with pytest.raises(C.ConfigError, match="checkpoint.init_from=.*has no complete checkpoint"):
        T.Trainer(*C.resolve(bad))


def test_stage3_anneals_the_router_temperature(tmp_path):
    """configs/hydra.py:stage3's schedule on a 3-step run: the MoE's scheduled temperature is
    2.0 at step 0 and 1.0 at the last step (train.anneal), never moved by the optimiser; the
    checkpoint after steps 0 and 1 holds step 1's value 1.5."""
    import importlib.util

    from train_helpers import tiny_cfg

    from train import config as C
    from train import trainer as T
    from train.rundir import RunDir
    spec = importlib.util.spec_from_file_location("hydra_cfg", "configs/hydra.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.get_config("stage3").train.anneal == mod.ANNEAL == "*.moe.temperature=2.0:1.0"
    cfg = tiny_cfg(tmp_path / "run", **{"train.steps": 3, "checkpoint.every": 1,
                                        "train.anneal": mod.ANNEAL})
    cfg.model = C.model_section("hydra", dataclasses.replace(
        SPEC.config, vocab_size=cfg.model.vocab_size, dim=16, n_layers=2, sga_every=99,
        moe_every=2, pkm_layer=0, moe_scheduled_temperature=True, moe_temperature=2.0),
        vocab_size=None)
    T.train(cfg, verbose=False)
    rd = RunDir(str(tmp_path / "run"))
    temps = [float(rd.restore_params(s)[3]["blocks"][1]["moe"]["temperature"]) for s in (1, 2, 3)]
    assert temps == [2.0, 1.5, 1.0]
