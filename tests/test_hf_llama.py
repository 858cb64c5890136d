"""Llama checkpoints from the real `transformers` library reproduce its logits (fixtures made by
tests/fixtures/make_hf_fixtures.py; nothing in them is computed by seqzoo)."""
import json
import pathlib
import shutil

import numpy as np
import pytest

import zoo
import zoo.hf

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("name", ["llama_mha_tied", "llama_gqa_untied", "llama_gqa_tied",
                                  "llama_sharded", "llama_bf16"])
def test_llama_logits_match_transformers(name):
    """Including a checkpoint transformers saved in 8 shards with its index, and one it saved in
    bfloat16 (the reference: transformers reading it back in float32)."""
    model = zoo.hf.load(str(FIX / name))
    exp = np.load(FIX / name / "expected.npz")
    logits, _, _ = model(exp["tokens"])
    # float32 both sides; transformers sums in a different order (observed max |diff| ~1e-6)
    np.testing.assert_allclose(np.asarray(logits), exp["logits"], atol=2e-5, rtol=1e-5)


def test_llama_decode_matches_transformers_logits():
    """The imported model decoded token by token through its KV cache gives transformers' logits."""
    model = zoo.hf.load(str(FIX / "llama_gqa_untied"))
    exp = np.load(FIX / "llama_gqa_untied" / "expected.npz")
    toks = exp["tokens"]
    state = model.init_state(toks.shape[0], toks.shape[1])
    outs = []
    for t in range(toks.shape[1]):
        lo, state, _ = model(toks[:, t:t + 1], state)
        outs.append(np.asarray(lo[:, 0]))
    np.testing.assert_allclose(np.stack(outs, 1), exp["logits"], atol=2e-5, rtol=1e-5)


def test_safetensors_roundtrip(tmp_path):
    arrs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64)}
    zoo.hf.write_safetensors(str(tmp_path / "m.safetensors"), arrs)
    back = zoo.hf.read_safetensors(str(tmp_path / "m.safetensors"))
    assert set(back) == {"a", "b"}
    np.testing.assert_array_equal(back["a"], arrs["a"])
    np.testing.assert_array_equal(back["b"], arrs["b"])


def test_bad_checkpoints_fail_with_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        zoo.hf.load(str(tmp_path))
    d = tmp_path / "ck"
    shutil.copytree(FIX / "llama_mha_tied", d)
    t = zoo.hf.read_safetensors(str(d / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:-1]
    zoo.hf.write_safetensors(str(d / "model.safetensors"), t)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight has shape"):
        zoo.hf.load(str(d))
    del t["model.layers.1.mlp.up_proj.weight"]
    zoo.hf.write_safetensors(str(d / "model.safetensors"), t)
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        zoo.hf.load(str(d))
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["NopeForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no converter for architecture 'NopeForCausalLM'"):
        zoo.hf.load(str(d))


def _reshard(src, dst, n_shards, dtype=None):
    """The transformers-made checkpoint `src` rewritten as `n_shards` safetensors files with the
    index transformers writes (model.safetensors.index.json), optionally cast to `dtype`."""
    from safetensors.numpy import save_file
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = zoo.hf.read_safetensors(str(src / "model.safetensors"))
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    names = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(n_shards):
        part = names[i::n_shards]
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(dst / fname))
        weight_map.update({k: fname for k in part})
        total += sum(tensors[k].nbytes for k in part)
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return tensors


def test_sharded_and_bfloat16_checkpoints_load(tmp_path):
    """A checkpoint in 3 shards with its index loads to transformers' logits; the same in
    bfloat16 loads to exactly the logits of its float32-cast tensors (one file or sharded), and
    a shard the index names but the directory lacks is one error naming it."""
    import ml_dtypes
    name = "llama_gqa_untied"
    exp = np.load(FIX / name / "expected.npz")
    _reshard(FIX / name, tmp_path / "sharded", 3)
    logits = np.asarray(zoo.hf.load(str(tmp_path / "sharded"))(exp["tokens"])[0])
    np.testing.assert_allclose(logits, exp["logits"], atol=2e-5, rtol=1e-5)
    bf = _reshard(FIX / name, tmp_path / "bf16", 2, ml_dtypes.bfloat16)
    src = zoo.hf.CheckpointTensors.from_dir(str(tmp_path / "bf16"))
    assert {src[k].dtype for k in src} == {np.dtype(ml_dtypes.bfloat16)}
    (tmp_path / "f32").mkdir()
    shutil.copy(FIX / name / "config.json", tmp_path / "f32" / "config.json")
    zoo.hf.write_safetensors(str(tmp_path / "f32" / "model.safetensors"),
                             {k: v.astype(np.float32) for k, v in bf.items()})
    got = np.asarray(zoo.hf.load(str(tmp_path / "bf16"))(exp["tokens"])[0])
    want = np.asarray(zoo.hf.load(str(tmp_path / "f32"))(exp["tokens"])[0])
    np.testing.assert_array_equal(got, want)
    # bfloat16 weights (8 mantissa bits) move logits of size ~5 by up to ~0.1 here: a sanity bound
    np.testing.assert_allclose(got, exp["logits"], atol=0.25)
    (tmp_path / "sharded" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard model-00002-of-00003\.safetensors named by"):
        zoo.hf.load(str(tmp_path / "sharded"))


def test_load_by_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    """`zoo.hf.load("org/model")` finds a checkpoint in the local Hugging Face cache (laid out
    here by hand as the hub client lays it out: refs/main -> snapshots/<commit>/); an id that is
    not cached is one line naming it and the cache; nothing is downloaded (offline)."""
    import huggingface_hub.constants as hc
    cache = tmp_path / "hub"
    repo = cache / "models--seqzoo-test--tiny-llama"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIX / "llama_gqa_untied" / f, snap / f)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exp = np.load(FIX / "llama_gqa_untied" / "expected.npz")
    logits = np.asarray(zoo.hf.load("seqzoo-test/tiny-llama")(exp["tokens"])[0])
    np.testing.assert_allclose(logits, exp["logits"], atol=2e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"seqzoo-test/absent: not in the local Hugging Face cache"):
        zoo.hf.load("seqzoo-test/absent")
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint directory"):
        zoo.hf.load("./not/here")


def test_save_hf_round_trip_matches_the_transformers_files(tmp_path):
    """load -> zoo.hf.save -> load gives the same logits; the written tensor names and shapes and
    the config.json fields transformers reads equal the transformers-made fixture's; above the
    shard threshold the same model is written in shards with an index and loads the same."""
    from safetensors import safe_open
    for name in ("llama_gqa_untied", "llama_mha_tied"):
        exp = np.load(FIX / name / "expected.npz")
        model = zoo.hf.load(str(FIX / name))
        cfg = zoo.transformer.llama_config(zoo.hf.load_config(str(FIX / name)))
        out = tmp_path / name
        zoo.hf.save("transformer", model, cfg, str(out))
        with safe_open(str(FIX / name / "model.safetensors"), "np") as a, \
                safe_open(str(out / "model.safetensors"), "np") as b:
            assert set(a.keys()) - {k for k in a.keys() if "rotary" in k} == set(b.keys())
            for k in b.keys():
                assert a.get_slice(k).get_shape() == b.get_slice(k).get_shape(), k
        theirs = json.loads((FIX / name / "config.json").read_text())
        ours = json.loads((out / "config.json").read_text())
        for k in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "tie_word_embeddings", "rms_norm_eps"):
            assert ours[k] == theirs[k], k
        logits = np.asarray(zoo.hf.load(str(out))(exp["tokens"])[0])
        np.testing.assert_allclose(logits, exp["logits"], atol=2e-5, rtol=1e-5)
    files = zoo.hf.save("transformer", model, cfg, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    np.testing.assert_array_equal(np.asarray(zoo.hf.load(str(tmp_path / "sharded"))(exp["tokens"])[0]),
                                  np.asarray(zoo.hf.load(str(out))(exp["tokens"])[0]))
    with pytest.raises(ValueError, match=r"model 'gam' has no Hugging Face format"):
        zoo.hf.save("gam", model, cfg, str(tmp_path / "x"))


def test_export_a_trained_run(tmp_path, capsys):
    """python -m eval.export writes a trained run's parameters as a Hugging Face checkpoint that
    loads to the same logits; a configuration without a Llama equivalent (attention-only blocks)
    and a family without a format are one line, exit 2."""
    from train_helpers import tiny_cfg

    from eval import export
    from train import trainer as T
    from train.rundir import RunDir
    run = tmp_path / "run"
    T.train(tiny_cfg(run, **{"model.ffn": "swiglu", "train.steps": 3}), verbose=False)
    assert export.main([f"--run_dir={run}", f"--out={tmp_path / 'hf'}"]) == 0
    from flax import nnx
    _, _, graphdef, params = RunDir(run).restore_params()
    toks = np.arange(24, dtype=np.int32).reshape(2, 12) % 60
    want = np.asarray(nnx.merge(graphdef, params)(toks)[0])
    got = np.asarray(zoo.hf.load(str(tmp_path / "hf"))(toks)[0])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    T.train(tiny_cfg(tmp_path / "plain", **{"train.steps": 1}), verbose=False)
    capsys.readouterr()
    assert export.main([f"--run_dir={tmp_path / 'plain'}", f"--out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no Llama equivalent (ffn='none')" in err, err


@pytest.mark.parametrize("name", ["llama_sharded", "mamba"])
def test_load_places_every_tensor_into_its_sharding(name):
    """`zoo.hf.load(path, place=train.sharding.placer(mesh))` on the (2, 2, 2) mesh of the 8 CPU
    devices: every parameter lands in the sharding the trainer's rules give it (some of them
    split, not all replicated) and the logits equal transformers' (the fixture's), as unplaced.
    Mamba: its conv weights go through the converter's own reshape (`TensorSource.put`)."""
    import jax
    from flax import nnx

    from train.sharding import make_mesh, placer
    mesh = make_mesh((2, 2, 2))
    place = placer(mesh)
    model = zoo.hf.load(str(FIX / name), place=place)
    split = 0
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            want = place(var)
            assert var.get_value().sharding.is_equivalent_to(want, var.get_value().ndim)
            split += any(a is not None for a in want.spec)
    assert split > 0
    exp = np.load(FIX / name / "expected.npz")
    logits = jax.jit(lambda t: model(t)[0])(exp["tokens"])
    np.testing.assert_allclose(np.asarray(logits), exp["logits"], atol=1e-4, rtol=1e-5)
