"""Checkpoints: stopping at step k and resuming is bit-identical to an uninterrupted run; the
run-directory contract (train.rundir.RunDir: config.json, checkpoints with state/config/data
items, metrics.jsonl, tb/) and what eval reads through it (steps, read_config, restore_params and
their errors); SIGTERM saves and exits cleanly."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import REPO, TINY_FLAGS, tiny_cfg

from train import trainer as T
from train.metrics import read_jsonl
from train.rundir import RunDir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    # the uninterrupted run saves every step and keeps the last 2
    full = T.train(tiny_cfg(base / "full", **{"checkpoint.every": 1, "checkpoint.keep": 2}),
                   verbose=False)
    first = T.train(tiny_cfg(base / "split", **{"train.stop_at_step": 3}), verbose=False)
    second = T.train(tiny_cfg(base / "split"), verbose=False)
    return base, full, first, second


def test_resume_is_bit_identical(runs):
    _, full, first, second = runs
    assert first["step"] == 3 and second["step"] == 6
    assert sorted(first["losses"]) == [1, 2, 3] and sorted(second["losses"]) == [4, 5, 6]
    joined = {**first["losses"], **second["losses"]}
    assert joined == full["losses"]            # exact float equality, every step
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(full["params"])[0],
                                 jax.tree_util.tree_flatten_with_path(second["params"])[0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    # the loss moved: the run really trained
    assert full["losses"][6] != full["losses"][1]


def test_run_dir_contract(runs):
    base, full, _, _ = runs
    run = base / "full"
    cfg = json.loads((run / "config.json").read_text())
    assert set(cfg) == {"model", "data", "train", "mesh", "checkpoint", "eval"}
    assert cfg["model"]["vocab_size"] == 64 and cfg["mesh"]["shape"] == [8, 1, 1]
    assert RunDir(run).steps() == [5, 6]                # keep the last 2
    step_dir = run / "checkpoints" / "6"
    assert {"state", "config", "data"} <= set(os.listdir(step_dir))
    assert json.loads((step_dir / "data" / "process_0-of-1.json").read_text()) == {"next_index": 6} \
        or "next_index" in (step_dir / "data" / "process_0-of-1.json").read_text()
    recs = read_jsonl(str(run / "metrics.jsonl"))
    train_recs = [r for r in recs if "split" not in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "tokens_per_s", "mfu"} <= set(train_recs[0])
    val = [r for r in recs if r.get("split") == "val"]
    assert val[-1]["step"] == 6 and 0.0 <= val[-1]["val_accuracy"] <= 1.0
    assert val[-1]["val_loss"] == pytest.approx(full["eval"]["val_loss"])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tb"))
    loaded = RunDir(run).read_config()
    assert loaded.model.name == "transformer" and loaded.data.num_kv_pairs == 4


def test_restore_params_equals_trained(runs, caplog):
    base, full, _, _ = runs
    with caplog.at_level(logging.WARNING):
        name, mcfg, graphdef, params = RunDir(base / "full").restore_params()
    # what eval does for every checkpoint it reads: no absl warning (a Checkpointer's metadata
    # call warned "Metadata file does not exist: .../state/_CHECKPOINT_METADATA" on each load)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert name == "transformer" and mcfg.dim == 32
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # earlier step, and sharded onto a mesh by the rules
    from train.sharding import make_mesh
    _, _, _, p3 = RunDir(base / "full").restore_params(step=5, mesh=make_mesh((1, 1, 8)))
    emb = p3["embed"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (8, 32)    # vocab 64 over tensor=8
    model = nnx.merge(graphdef, params)
    logits, _, _ = model(np.zeros((1, 5), np.int32))
    assert logits.shape == (1, 5, 64)


def test_restore_params_errors(runs, tmp_path):
    base, *_ = runs
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunDir(tmp_path / "nope").restore_params()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(base / "full" / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        RunDir(empty).restore_params()
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 4"):
        RunDir(base / "full").restore_params(step=4)
    bad = tmp_path / "bad"
    shutil.copytree(base / "full", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["dim"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"blocks\.0\.mixer\.wk\.weight has shape \(32, 32\)"):
        RunDir(bad).restore_params()
    cfg["model"]["dim"] = 32
    cfg["model"]["n_layers"] = 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no parameter blocks\.1\."):
        RunDir(bad).restore_params()


def test_sigterm_saves_and_exits(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "train", *TINY_FLAGS, "--config.train.steps=100000",
         "--config.train.log_every=1", "--config.checkpoint.every=100000",
         "--config.train.compilation_cache_dir=", "--config.checkpoint.preempt_deadline_s=20",
         f"--config.checkpoint.dir={run}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        t0 = time.time()
        while time.time() - t0 < 180:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("step") and "/100000" in line:
                proc.send_signal(signal.SIGTERM)
                t_sent = time.time()
                break
        out, _ = proc.communicate(timeout=120)
        waited = time.time() - t_sent
        text = "".join(lines) + out
        assert proc.returncode == 0, text[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = [ln for ln in text.splitlines() if ln.startswith("SIGTERM: saved step")]
    assert saved, text[-2000:]
    # within the configured deadline (the process' exit, as the test saw it, included)
    assert "checkpoint.preempt_deadline_s 20" in saved[0] and waited < 20, (waited, saved)
    assert "warning" not in text
    k = int(saved[0].split()[3])
    assert 1 <= k < 100000
    assert RunDir(run).steps() == [k]
    assert "checkpoints:" in text
