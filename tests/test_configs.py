"""Every config file in configs/ and every variant it lists in its module-level `VARIANTS` tuple
(configs/README.md) resolves, and `jax.eval_shape` of one train step succeeds: the updated
parameters keep their shapes, their number is the model's documented formula, and the loss is a
float32 scalar. Configs that read files get a small generated file of the right kind. New config
files are picked up automatically.

The train step is traced at the config's widths, heads, vocabulary, sequence length and batch but
at most `STEP_LAYERS` layers: tracing is Python work linear in depth (12-24 identical blocks took
10-19 s per large variant, 200 s of the suite), and the blocks repeat (every layer pattern here has
period <= 2: RAT's odd-layer windows, the hybrids' alternation). Tracing a model's init is
quadratic in depth here besides: flax's `Variable.set_value` reads `.sharding` of each traced rng
count, and jax builds that attribute's error message (`_origin_msg`) by walking the whole trace
so far (24 Gated DeltaNet layers: 7.7 s to build abstractly, 0.3 s per layer and growing)."""
import dataclasses
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import REPO

import zoo
from train import config as C
from train import trainer as T

STEP_LAYERS = 2
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path):
    spec = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cases():
    out = []
    for path in CONFIG_FILES:
        mod = _load(path)
        variants = getattr(mod, "VARIANTS", (None,))
        for v in variants:
            out.append(pytest.param(path, v, id=f"{os.path.basename(path)}:{v}"))
    return out


def _data_file(tmp_path, data):
    """A small file that the config's data source can read."""
    T_ = int(data.seq_len)
    n = 20 * (T_ + 1)
    if data.source == "text":
        p = tmp_path / "data.txt"
        rng = np.random.default_rng(0)
        p.write_bytes(bytes(rng.integers(32, 127, n, dtype=np.uint8)))
        return str(p)
    vocab = int(data.get("vocab_size", 256))
    dtype = np.dtype(data.get("dtype", "uint16"))
    p = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, vocab, n).astype(dtype).tofile(p)
    return str(p)


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"mqar.py", "transformer.py"} <= names


@pytest.mark.parametrize("path, variant", _cases())
def test_config_builds_and_eval_shapes_one_step(path, variant, tmp_path):
    mod = _load(path)
    cfg = mod.get_config(variant) if variant is not None else mod.get_config()
    if cfg.data.source in ("text", "tokens"):
        cfg.data.path = _data_file(tmp_path, cfg.data)
    cfg.checkpoint.dir = str(tmp_path / "run")
    resolved, model_cfg = C.resolve(cfg)
    if getattr(model_cfg, "n_layers", 0) > STEP_LAYERS:
        # Hydra's workspace needs an SGA block to read it: keep one in the shortened stack
        keep = ({"sga_every": min(model_cfg.sga_every, STEP_LAYERS)}
                if getattr(model_cfg, "workspace", False) else {})
        model_cfg = dataclasses.replace(model_cfg, n_layers=STEP_LAYERS, **keep)
    params, new_params, metrics = T.eval_shape_step(resolved, model_cfg)
    entry = zoo.get(resolved.model.name)
    if entry.param_count is not None:   # the formula at the config's real widths
        assert sum(v.size for v in jax.tree.leaves(params)) == entry.param_count(model_cfg)
    want = jax.tree.map(lambda s: (s.shape, s.dtype), params)
    got = jax.tree.map(lambda s: (s.shape, s.dtype), new_params)
    assert jax.tree.leaves(params) and all(s.dtype == jnp.float32 for s in jax.tree.leaves(params))
    assert got == want
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    # the number of tokens of a step is the global batch times the sequence length at most
    assert metrics["n_tokens"].shape == ()


def test_unknown_variant_is_rejected():
    for path in CONFIG_FILES:
        mod = _load(path)
        if hasattr(mod, "VARIANTS"):
            with pytest.raises(ValueError):
                mod.get_config("no_such_variant")
