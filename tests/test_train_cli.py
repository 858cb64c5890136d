"""`python -m train`: a bad config prints one line naming the key and exits non-zero before
anything compiles; the config module's resolution rejects impossible values in-process."""
import pytest
from train_helpers import run_cli, tiny_cfg

from train import config as C


@pytest.mark.parametrize("args, expect", [
    (["--config.train.nope=1"], "train.nope"),
    (["--config.model.nope=1"], "model.nope"),
    (["--config.train.batch_size=0"], "train.batch_size"),
    (["--config=configs/does_not_exist.py"], "does_not_exist.py"),
    (["--config=configs/mqar.py:nonsense"], "nonsense"),
    (["--config.data.source=text", "--config.data.path=/nonexistent/file.txt"], "/nonexistent/file.txt"),
    # an odd head dim under RoPE (130 / 2 heads): was a JAX traceback at trace time
    (["--config.model.dim=130"], "RoPE needs an even head dim"),
])
def test_bad_config_one_line_and_nonzero_exit(args, expect):
    r = run_cli(args, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("config error:") and expect in lines[0], lines[0]
    assert "compiled" not in r.stdout


@pytest.mark.parametrize("key, value, expect", [
    ("train.grad_accum", 3, "train.batch_size=16 is not divisible by train.grad_accum=3"),
    ("train.warmup_steps", 100, "train.warmup_steps"),
    ("model.n_heads", 3, "model.dim=32 is not divisible by model.n_heads=3"),
    ("model.vocab_size", 10, "model.vocab_size=10 is smaller than the data's vocabulary (64)"),
    ("mesh.shape", (3, 1, 1), "mesh.shape=(3, 1, 1) does not fit the 8 available devices"),
    ("mesh.distributed", "maybe", "mesh.distributed"),
    ("data.num_kv_pairs", 100, "data.num_kv_pairs"),
    ("model.name", "nonexistent_model", "model.name='nonexistent_model'"),
    ("model.n_heads", 0, "model.n_heads=0 must be a positive integer"),
])
def test_resolve_rejects_impossible_values(key, value, expect):
    cfg = tiny_cfg("/tmp/unused")
    sec, k = key.split(".")
    cfg[sec][k] = value
    with pytest.raises(C.ConfigError) as e:
        C.resolve(cfg, device_count=8)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_resolve_fills_vocab_and_mesh():
    cfg, mcfg = C.resolve(tiny_cfg("/tmp/unused"), device_count=8)
    assert mcfg.vocab_size == 64 and cfg.model.vocab_size == 64
    assert tuple(cfg.mesh.shape) == (8, 1, 1)
    cfg2, _ = C.resolve(tiny_cfg("/tmp/unused", **{"mesh.shape": (2, -1, 2)}), device_count=8)
    assert tuple(cfg2.mesh.shape) == (2, 2, 2)


def test_early_stop_on_accuracy(tmp_path):
    from train import trainer as T
    from train.metrics import read_jsonl
    cfg = tiny_cfg(tmp_path / "run", **{"train.steps": 50, "eval.every": 2,
                                       "eval.early_stop_accuracy": 1e-6})
    out = T.train(cfg, verbose=False)
    val = [r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if r.get("split") == "val"]
    # evaluations every 2 steps until the first one that reaches the target, then stop there
    assert out["status"] == "early_stop" and out["step"] < 50
    assert [r["step"] for r in val] == list(range(2, out["step"] + 1, 2))
    assert all(r["val_accuracy"] < 1e-6 for r in val[:-1]) and val[-1]["val_accuracy"] >= 1e-6
    assert out["eval"]["val_accuracy"] == val[-1]["val_accuracy"]
