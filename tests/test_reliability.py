"""Fault tolerance (issue 16): numerical faults (train/guard.py), corrupt checkpoints (checksums,
fallback, eval skipping), disk faults (probe write, failing saves). Kill points are in
tests/test_kill.py."""
import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import tiny_cfg

import zoo
from train import config as C
from train import guard as G
from train import optim
from train import trainer as T
from train.faults import TrainingFault
from train.metrics import read_jsonl
from train.rundir import CorruptCheckpoint, RunDir


def _equal_trees(a, b):
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                                 jax.tree_util.tree_flatten_with_path(b)[0]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- the guarded step

@pytest.fixture(scope="module")
def pure():
    cfg = tiny_cfg("", **{"train.warmup_steps": 0})   # the first update has a non-zero rate
    cfg, mcfg = C.resolve(cfg)
    model = zoo.build(cfg.model.name, mcfg, nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    opt = optim.make_optimizer(cfg.train)
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, 64, (4, 32)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, 64, (4, 32)), jnp.int32),
             "loss_mask": jnp.ones((4, 32), jnp.float32)}
    poisoned = dict(batch, loss_mask=batch["loss_mask"].at[0, 0].set(jnp.nan))
    return T.make_train_step(graphdef, opt), params, opt.init(params), batch, poisoned


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_update_is_not_applied(pure, policy):
    step_fn, params, opt_state, batch, poisoned = pure
    fn = jax.jit(G.guarded(step_fn, nonfinite=policy))
    g0 = G.init_guard(1)
    p1, o1, s1, g1, m1 = fn(params, opt_state, jnp.int32(4), g0, poisoned)
    assert not np.isfinite(float(m1["loss"]))
    _equal_trees(p1, params)                 # bit-identical: nothing moved
    _equal_trees(o1, opt_state)
    assert int(s1) == 5 and int(g1["skipped"]) == 1
    assert int(g1["first_bad"]) == (5 if policy == "stop" else -1)
    p2, _, _, g2, m2 = fn(p1, o1, s1, g1, batch)          # a good batch after it
    assert np.isfinite(float(m2["loss"]))
    moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)))
    assert moved == (policy == "skip")       # "stop" applies nothing after the bad step
    assert int(g2["skipped"]) == (2 if policy == "stop" else 1)
    # "off": the non-finite update is applied (the parameters become NaN)
    p3 = jax.jit(G.guarded(step_fn, nonfinite="off"))(params, opt_state, jnp.int32(0), g0,
                                                      poisoned)[0]
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p3))


def test_spike_policy_skips_above_k_times_the_median(pure):
    step_fn, params, opt_state, batch, _ = pure
    fn = jax.jit(G.guarded(step_fn, nonfinite="skip", spike_factor=2.0))
    W = 4
    loss = float(fn(params, opt_state, jnp.int32(0), G.init_guard(W), batch)[4]["loss"])
    for median, applied in ((loss / 2.5, False), (loss / 1.5, True)):
        g = dict(G.init_guard(W), recent=jnp.full((W,), median, jnp.float32), n_recent=jnp.int32(W))
        p, _, _, g2, _ = fn(params, opt_state, jnp.int32(0), g, batch)
        moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
        assert moved == applied and int(g2["skipped"]) == (0 if applied else 1)
        assert int(g2["n_recent"]) == W + int(applied)
    # the window not yet full: no spike decision
    g = dict(G.init_guard(W), recent=jnp.full((W,), loss / 10, jnp.float32), n_recent=jnp.int32(W - 1))
    assert int(fn(params, opt_state, jnp.int32(0), g, batch)[3]["skipped"]) == 0


def _poison_at(monkeypatch, k):
    """The trainer's k-th batch (1-based) gets a NaN in its loss mask."""
    calls = {"n": 0}
    real = T.to_global

    def fake(batch, mesh, spec):
        calls["n"] += 1
        if calls["n"] == k:
            batch = dict(batch, loss_mask=np.asarray(batch["loss_mask"], np.float32).copy())
            batch["loss_mask"][0, 0] = np.nan
        return real(batch, mesh, spec)
    monkeypatch.setattr(T, "to_global", fake)


def test_trainer_stops_on_nonfinite_with_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poison_at(monkeypatch, 5)
    with pytest.raises(TrainingFault, match=r"non-finite loss or gradient at step 5 .*"
                                              r"last complete checkpoint is step 3"):
        T.train(tiny_cfg(run), verbose=False)
    assert RunDir(run).steps() == [3] and RunDir(run).verify(3) is None
    events = [r for r in read_jsonl(str(run / "metrics.jsonl")) if r.get("event")]
    assert events == [{"step": 5, "event": "nonfinite"}]
    # the same run under "skip" finishes, counting the skipped update
    _poison_at(monkeypatch, 5)
    out = T.train(tiny_cfg(tmp_path / "skip", **{"train.nonfinite": "skip"}), verbose=False)
    assert out["step"] == 6 and out["skipped"] == 1
    assert [r["skipped"] for r in out["history"]] == [0, 0, 0, 0, 1, 1]


def test_guard_config_errors():
    for key, value, msg in (("nonfinite", "ignore", "train.nonfinite='ignore'"),
                            ("spike_factor", 0.5, "train.spike_factor=0.5"),
                            ("spike_window", 0, "train.spike_window=0")):
        cfg = tiny_cfg("")
        cfg.train[key] = value
        with pytest.raises(C.ConfigError, match=msg):
            C.resolve(cfg)


# ----------------------------------------------------------------------------- corrupt checkpoints

@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """A 9-step run stopped at step 6 (checkpoints 3 and 6, sealed) and the uninterrupted 9-step
    run."""
    base = tmp_path_factory.mktemp("corrupt")
    six = T.train(tiny_cfg(base / "six", **{"train.steps": 9, "train.stop_at_step": 6}),
                  verbose=False)
    nine = T.train(tiny_cfg(base / "nine", **{"train.steps": 9}), verbose=False)
    return base, six, nine


def _largest_file(step_dir):
    files = [os.path.join(b, n) for b, _, fs in os.walk(step_dir) for n in fs]
    return max(files, key=os.path.getsize)


def _truncate(d):
    """Every OCDBT data file of the step cut to half its size (a crash during the writes). Not
    only the largest: how orbax spreads one save over data files depends on the async writes'
    timing, and a file the restore never reads (a superseded b-tree node) can be the largest,
    which left the checkpoint readable and correct."""
    files = [os.path.join(b, n) for b, _, fs in os.walk(d) for n in fs
             if os.path.basename(b) == "d"] or [_largest_file(d)]
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _bitflip(d):
    f = _largest_file(d)
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x10]))


def _half_delete(d):
    files = sorted(os.path.join(b, n) for b, _, fs in os.walk(os.path.join(d, "state")) for n in fs)
    for f in files[: max(1, len(files) // 2)]:
        os.remove(f)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "half_delete", "truncate_unsealed"])
def test_corrupt_latest_falls_back_to_previous(base_runs, tmp_path, capsys, damage):
    base, six, nine = base_runs
    run = tmp_path / "run"
    shutil.copytree(base / "six", run)
    rd = RunDir(run)
    assert rd.steps() == [3, 6] and rd.is_sealed(6) and rd.verify(6) is None
    {"truncate": _truncate, "truncate_unsealed": _truncate, "bitflip": _bitflip,
     "half_delete": _half_delete}[damage](rd.step_path(6))
    if damage == "truncate_unsealed":        # killed between the commit and the checksums
        os.remove(rd.checksum_path(6))
    else:
        assert rd.verify(6) is not None
    out = T.train(tiny_cfg(run, **{"train.steps": 9}), verbose=True)
    text = capsys.readouterr().out
    warns = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "checkpoint step 6" in warns[0] and "corrupt" in warns[0], text
    assert "resumed from" in text and "at step 3" in text
    assert os.path.isdir(run / "corrupt" / "6")            # moved aside, not deleted
    assert out["step"] == 9
    # resumed from step 3, the run ends bit-identical to the uninterrupted 9-step run
    assert {k: v for k, v in out["losses"].items()} == {k: v for k, v in nine["losses"].items()
                                                         if k > 3}
    _equal_trees(out["params"], nine["params"])


def test_eval_skips_a_corrupt_checkpoint(base_runs, tmp_path, capsys):
    from eval import cli
    base, _, _ = base_runs
    bad = tmp_path / "bad"
    shutil.copytree(base / "six", bad)
    _bitflip(RunDir(bad).step_path(6))
    with pytest.raises(CorruptCheckpoint, match=r"checkpoint step 6 .* is corrupt: .* sha256"):
        RunDir(bad).restore_params()
    code = cli.main([f"--run_dir={bad},{base / 'six'}", "--steps=all", "--tasks=mqar", "--lengths=32",
                     "--mqar_kv=4", "--n_examples=8", "--no_progress", "--no_plots",
                     f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "corrupt" in ln]
    assert len(lines) == 1 and "bad@6" in lines[0], err
    assert code == 1
    rows = [json.loads(ln) for ln in open(tmp_path / "out" / "results.jsonl")]
    assert {(r["run"], r["step"]) for r in rows} == {("bad", 3), ("six", 3), ("six", 6)}


# ----------------------------------------------------------------------------- disk faults

def test_unwritable_or_full_checkpoint_dir_is_reported_before_compiling(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(C.ConfigError, match=r"checkpoint\.dir: .*not writable"):
        T.train(tiny_cfg(blocker / "run"), verbose=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(C.ConfigError, match=r"checkpoint\.dir: .*MiB free; one checkpoint needs"):
        T.train(tiny_cfg(tmp_path / "full"), verbose=False)
    assert not os.path.exists(tmp_path / "full" / "checkpoints" / "3")


def test_failing_save_warns_and_keeps_training(tmp_path, monkeypatch, capsys):
    real = RunDir.save
    failing = {3}

    def save(self, mngr, step, *a, **kw):
        if step in failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, mngr, step, *a, **kw)
    monkeypatch.setattr(RunDir, "save", save)
    run = tmp_path / "run"
    out = T.train(tiny_cfg(run, **{"checkpoint.keep": 1}), verbose=True)
    text = capsys.readouterr().out
    assert "warning: checkpoint save at step 3 failed (No space left on device)" in text
    assert out["step"] == 6 and RunDir(run).steps() == [6]
    # a final save that fails ends the run with one line naming the last complete step; keep=1
    # never deleted the only complete checkpoint
    failing.add(9)
    with pytest.raises(TrainingFault, match=r"final checkpoint \(step 9\) could not be written.*"
                                              r"last complete one is step 6"):
        T.train(tiny_cfg(run, **{"checkpoint.keep": 1, "train.steps": 9}), verbose=False)
    assert RunDir(run).steps() == [6] and RunDir(run).verify(6) is None


# ----------------------------------------------------------------------------- nothing executes

class _Payload:
    """Unpickling this creates the marker file (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_nothing_is_unpickled_across_train_resume_eval(tmp_path, monkeypatch, capsys):
    import pickle

    from eval import cli
    run, marker = tmp_path / "run", tmp_path / "unpickled"
    T.train(tiny_cfg(run, **{"train.stop_at_step": 3}), verbose=False)
    blob = pickle.dumps(_Payload(str(marker)))
    planted = [run / "config.pkl", run / "checkpoints" / "3" / "state" / "extra.pkl",
               run / "checkpoints" / "3" / "data" / "process_0-of-1.pkl", run / "metrics.pkl",
               run / "checkpoints" / "3" / "state.npy"]
    for p in planted:
        p.write_bytes(blob)
    assert pickle.loads(blob) is not None and marker.exists()     # the payload works ...
    marker.unlink()

    def refuse(*a, **k):
        raise AssertionError("pickle on the load path")
    real_np_load = np.load

    def np_load(*a, **k):
        if k.get("allow_pickle"):
            raise AssertionError("np.load(allow_pickle=True) on the load path")
        return real_np_load(*a, **k)
    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", np_load)
    out = T.train(tiny_cfg(run), verbose=False)                    # ... resume ...
    assert out["step"] == 6
    code = cli.main([f"--run_dir={run}", "--tasks=mqar,ppl", "--lengths=32", "--mqar_kv=4",
                     "--n_examples=8", "--ppl_batches=1", "--no_progress", "--no_plots"])
    assert code == 0, capsys.readouterr().err                     # ... and eval: never loaded
    assert not marker.exists()
    assert json.loads((run / "config.json").read_text())["model"]["name"] == "transformer"
