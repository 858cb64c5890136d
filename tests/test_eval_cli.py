"""End to end: `python -m eval` on run directories written with train.rundir.RunDir.

The run holds two checkpoints of the built-in default config (MQAR, vocabulary 128) with a tiny
Transformer: step 1 with initial parameters, step 2 with every parameter zero, whose logits are
uniform, so its perplexity is exactly the vocabulary size and its MQAR accuracy is exactly 0
(argmax of uniform logits is token 0, never a value token).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from eval.cli import main
from eval.results import FIELDS, ResultsStore, markdown_table, read_rows
from train import config as config_lib
from train.rundir import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 128


def write_run(run_dir: str, **model_overrides) -> None:
    cfg = config_lib.default_config()
    cfg.model.dim = 16
    cfg.model.n_heads = 2
    for k, v in model_overrides.items():
        cfg.model[k] = v
    cfg.checkpoint.dir = run_dir
    cfg.data.val_examples = 16
    cfg, model_cfg = config_lib.resolve(cfg, device_count=jax.device_count())
    cfg_json = config_lib.to_jsonable(cfg)
    run = RunDir(run_dir)
    run.write_config(cfg_json)
    model = zoo.build(cfg.model.name, model_cfg, rngs=0)
    pure = nnx.split(model)[1].to_pure_dict()
    zeros = jax.tree.map(jnp.zeros_like, pure)
    mngr = run.manager(async_save=False)
    for step, params in ((1, pure), (2, zeros)):
        state = {"params": params, "opt_state": {"mu": params}, "step": np.int32(step)}
        run.save(mngr, step, state, cfg_json, None)
    mngr.wait_until_finished()
    mngr.close()
    with open(run.metrics_path, "w") as f:
        for s, loss in ((1, 4.9), (2, 4.8)):
            f.write(json.dumps({"step": s, "loss": loss}) + "\n")
        f.write(json.dumps({"step": 2, "split": "val", "val_loss": 4.85}) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_run(str(root / "a"))
    shutil.copytree(root / "a", root / "b")
    return root


def table_lines(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in out.splitlines() if line.startswith("|")]


def test_eval_cli_rows_rerun_force_table(runs, capsys):
    run = str(runs / "a")
    argv = [f"--run_dir={run}", "--steps=all", "--tasks=ppl,mqar", "--mqar_kv=4,8",
            "--lengths=64", "--n_examples=8", "--batch_size=8", "--ppl_batches=0",
            "--no_progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    jsonl = os.path.join(run, "eval", "results.jsonl")
    rows = read_rows(jsonl)
    # 2 steps x (ppl: loss, ppl, tokens + mqar: 2 settings x (acc, exact)) = 2 x 7 rows
    assert len(rows) == 14
    assert all(set(r) == set(FIELDS) and r["run"] == "a" and r["model"] == "transformer"
               for r in rows)
    get = {(r["step"], r["task"], r["setting"], r["metric"]): r["value"] for r in rows}
    assert get[(2, "ppl", "split=val", "ppl")] == pytest.approx(V, rel=1e-5)
    assert get[(2, "ppl", "split=val", "loss")] == pytest.approx(np.log(V), rel=1e-6)
    assert get[(2, "ppl", "split=val", "tokens")] == 16 * 8     # 16 held-out examples x 8 queries
    assert get[(2, "mqar", "len=64,kv=4", "acc")] == 0.0
    assert get[(2, "mqar", "len=64,kv=8", "exact")] == 0.0
    assert 1.0 < get[(1, "ppl", "split=val", "ppl")] < 10 * V
    # the CSV holds the same rows
    with open(os.path.join(run, "eval", "results.csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["step"], r["task"], r["setting"], r["metric"]) for r in csv_rows] == \
        [(str(r["step"]), r["task"], r["setting"], r["metric"]) for r in rows]
    # the markdown table: one line per (run, step, task, setting), metrics as columns
    tab = table_lines(out)
    head = tab[0]
    assert head[:5] == ["run", "model", "step", "task", "setting"]
    body = {(c[2], c[3], c[4]): dict(zip(head, c)) for c in tab[2:]}
    assert len(body) == 6
    assert body[("2", "ppl", "split=val")]["ppl"] == "128"
    assert body[("2", "mqar", "len=64,kv=8")]["acc"] == "0"
    # plots
    pdir = os.path.join(run, "eval", "plots")
    assert os.path.exists(os.path.join(pdir, "loss_curves.png"))
    assert os.path.exists(os.path.join(pdir, "mqar_acc_vs_length.png"))

    # rerun: everything is skipped, the table is printed again
    assert main(argv) == 0
    assert len(read_rows(jsonl)) == 14
    assert table_lines(capsys.readouterr().out) == tab

    # --force recomputes (the new rows supersede the old ones in the CSV and the table)
    assert main(argv[:1] + ["--steps=2", "--tasks=ppl", "--force", "--no_progress",
                            "--ppl_batches=0", "--batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert len(read_rows(jsonl)) == 17
    with open(os.path.join(run, "eval", "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == 14
    (line,) = [c for c in table_lines(out)[2:]]
    assert line[2:5] == ["2", "ppl", "split=val"]


def test_eval_cli_glob_sweep_into_one_out_dir(runs, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    argv = [f"--run_dir={runs}/*", "--tasks=ppl", f"--out={out_dir}", "--ppl_batches=1",
            "--batch_size=8", "--no_progress", "--no_plots"]
    assert main(argv) == 0
    rows = read_rows(str(out_dir / "results.jsonl"))
    assert sorted({(r["run"], r["step"]) for r in rows}) == [("a", 2), ("b", 2)]
    tab = table_lines(capsys.readouterr().out)
    assert sorted(c[0] for c in tab[2:]) == ["a", "b"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_eval_cli_bad_input(runs, tmp_path, capsys):
    base = ["--tasks=ppl", "--no_progress", "--no_plots", "--batch_size=8", "--ppl_batches=1"]
    # missing directory
    assert main([f"--run_dir={tmp_path}/nope"] + base) == 2
    assert _error_line(capsys) == f"eval: error: run directory '{tmp_path}/nope' does not exist"
    # a glob with no match
    assert main([f"--run_dir={tmp_path}/nothing*"] + base) == 2
    assert "no run directory matches" in _error_line(capsys)
    # not a run directory (no config.json)
    (tmp_path / "empty").mkdir()
    assert main([f"--run_dir={tmp_path}/empty"] + base) == 2
    assert "not a seqzoo run directory" in _error_line(capsys)
    # a run with no checkpoint
    (tmp_path / "nockpt").mkdir()
    shutil.copy(runs / "a" / "config.json", tmp_path / "nockpt" / "config.json")
    assert main([f"--run_dir={tmp_path}/nockpt"] + base) == 2
    assert _error_line(capsys) == f"eval: error: run directory '{tmp_path}/nockpt' has no checkpoint"
    # a step that is not there
    assert main([f"--run_dir={runs}/a", "--steps=7"] + base) == 2
    assert "no checkpoint at step(s) 7" in _error_line(capsys)
    # unknown task
    assert main([f"--run_dir={runs}/a", "--tasks=nope"]) == 2
    assert "unknown task 'nope'" in _error_line(capsys)


@pytest.mark.parametrize("change,message", [
    ({"dim": 32}, "has shape"),                 # a misshapen parameter
    ({"n_layers": 3}, "has no parameter"),      # a missing parameter
])
def test_eval_cli_checkpoint_that_does_not_fit(runs, tmp_path, capsys, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(runs / "a", bad)
    cfg_path = bad / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"].update(change)
    cfg_path.write_text(json.dumps(cfg))
    assert main([f"--run_dir={bad}", "--tasks=ppl", "--no_progress", "--no_plots",
                 "--batch_size=8", "--ppl_batches=1", f"--out={tmp_path}/o"]) == 2
    line = _error_line(capsys)
    assert line.startswith("eval: error: ") and message in line
    assert read_rows(str(tmp_path / "o" / "results.jsonl")) == []


def test_eval_cli_subprocess_missing_dir(tmp_path):
    p = subprocess.run([sys.executable, "-m", "eval", f"--run_dir={tmp_path}/missing",
                        "--tasks=ppl"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"eval: error: run directory '{tmp_path}/missing' does not exist"]
    assert p.stdout == ""


def test_results_store_rows_are_whole(tmp_path):
    st = ResultsStore(str(tmp_path))
    row = dict(run="r", model="m", step=3, task="t", setting="len=8", metric="acc", value=0.5)
    st.append([row, dict(row, metric="exact", value=0.0)])
    # an unterminated foreign line (e.g. a disk that filled up) is neither read nor glued to
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"run": "r", "model": "m", "st')
    assert len(read_rows(str(tmp_path / "results.jsonl"))) == 2
    st.append([dict(row, setting="len=16", value=1.0)])
    rows = read_rows(str(tmp_path / "results.jsonl"))
    assert [r["setting"] for r in rows] == ["len=8", "len=8", "len=16"]
    st2 = ResultsStore(str(tmp_path))
    assert st2.has("r", 3, "t", "len=16") and not st2.has("r", 3, "t", "len=32")
    # a later row of the same key supersedes the earlier one
    st2.append([dict(row, value=0.75)])
    assert {(r["setting"], r["metric"]): r["value"] for r in st2.rows()}[("len=8", "acc")] == 0.75
    tab = markdown_table(st2.rows()).splitlines()
    assert tab[0] == "| run | model | step | task | setting | acc | exact |"
    assert tab[2] == "| r | m | 3 | t | len=8 | 0.75 | 0 |"
    assert tab[3] == "| r | m | 3 | t | len=16 | 1 |  |"


def test_eval_cli_learned_positions_report_their_limit(tmp_path, capsys):
    """A model with learned positions (max_len 64) is not run past its limit: the setting gets
    one row "skipped_over_max_len" = 64; lengths within the limit are scored."""
    run = str(tmp_path / "lp")
    write_run(run, pos_embed="learned", rope_base=None)
    assert main([f"--run_dir={run}", "--tasks=passkey,selective_copying", "--lengths=64,128",
                 "--passkey_depths=0.5", "--copy_tokens=8", "--n_examples=8", "--batch_size=8",
                 "--no_progress", "--no_plots"]) == 0
    rows = read_rows(os.path.join(run, "eval", "results.jsonl"))
    got = {(r["task"], r["setting"], r["metric"]): r["value"] for r in rows}
    assert got[("passkey", "len=128,depth=0.5", "skipped_over_max_len")] == 64
    assert got[("selective_copying", "len=128", "skipped_over_max_len")] == 64
    assert 0.0 <= got[("passkey", "len=64,depth=0.5", "acc")] <= 1.0
    assert 0.0 <= got[("selective_copying", "len=64", "acc")] <= 1.0
    assert len(rows) == 6     # passkey acc + digit_acc + skip row; copying acc + exact + skip row
    tab = table_lines(capsys.readouterr().out)
    assert "skipped_over_max_len" in tab[0]


def test_eval_agrees_with_the_trainers_held_out_numbers(tmp_path, capsys):
    """A model trained a few steps with train's API: eval's held-out loss and MQAR accuracy on
    the same held-out examples equal the trainer's own final evaluation (metrics.jsonl)."""
    from train import trainer
    cfg = config_lib.default_config()
    cfg.model.dim, cfg.model.n_heads = 16, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.warmup_steps = 4, 8, 1
    cfg.train.mfu_probe, cfg.train.compilation_cache_dir, cfg.train.log_every = False, "", 2
    cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.async_save = str(tmp_path / "t"), 4, False
    cfg.eval.every, cfg.eval.batch_size, cfg.eval.max_batches = 0, 32, 0
    cfg.data.val_examples = 32
    trainer.train(cfg, verbose=False)
    val = [json.loads(line) for line in open(tmp_path / "t" / "metrics.jsonl") if '"val"' in line][-1]
    assert val["step"] == 4
    assert main([f"--run_dir={tmp_path / 't'}", "--tasks=ppl,mqar", "--ppl_batches=0",
                 "--batch_size=32", "--n_examples=32", "--mqar_kv=8", "--lengths=64",
                 "--no_progress", "--no_plots"]) == 0
    rows = read_rows(str(tmp_path / "t" / "eval" / "results.jsonl"))
    got = {(r["step"], r["task"], r["metric"]): r["value"] for r in rows}
    assert got[(4, "ppl", "tokens")] == val["val_tokens"] == 32 * 8
    assert got[(4, "ppl", "loss")] == pytest.approx(val["val_loss"], rel=1e-5)
    # 8 queries in every example: the mean per-example fraction is the per-token accuracy
    assert got[(4, "mqar", "acc")] == pytest.approx(val["val_accuracy"], abs=1e-6)


def test_eval_cli_runs_with_the_same_name_keep_apart(runs, tmp_path):
    for parent in ("x", "y"):
        shutil.copytree(runs / "a", tmp_path / parent / "a", ignore=shutil.ignore_patterns("eval"))
    assert main([f"--run_dir={tmp_path}/*/a", "--tasks=ppl", f"--out={tmp_path}/o",
                 "--ppl_batches=1", "--batch_size=8", "--no_progress", "--no_plots"]) == 0
    rows = read_rows(str(tmp_path / "o" / "results.jsonl"))
    assert sorted({r["run"] for r in rows}) == [f"{tmp_path}/x/a", f"{tmp_path}/y/a"]


def test_fidelity_cli_scores_the_runs_held_out_rows(runs, tmp_path, capsys):
    """`python -m eval.fidelity`: ETMF_Δ at every requested shift and ECLMF at every layer gap
    of a checkpoint equal the metrics computed directly on the run's held-out rows (data seed
    --seed), written as JSON lines beside the plot; a shift beyond the rows is one line, exit 2."""
    from eval import fidelity
    out = tmp_path / "fid" / "f.png"
    argv = [f"--run_dir={runs / 'a'}", "--shifts=0,1,5", "--n_rows=4", "--step=1", "--seed=7",
            f"--out={out}"]
    assert fidelity.main(argv) == 0
    (rec,) = [json.loads(line) for line in open(tmp_path / "fid" / "f.jsonl")]
    assert out.is_file() and rec["step"] == 1 and rec["seq_len"] == 64
    run = RunDir(str(runs / "a"))
    _, _, graphdef, params = run.restore_params(1)
    model = nnx.merge(graphdef, params)
    from train import data as data_lib
    x = jnp.asarray(next(data_lib.make_iterator(run.read_config().data, split="val",
                                                global_batch=4, seed=7))["inputs"])
    hs = fidelity.hidden_states(model, x)
    E = model.embed.embedding[...]
    assert len(hs) == run.read_config().model.n_layers and len(hs) >= 2
    for s in (0, 1, 5):
        assert rec["etmf"][str(s)] == pytest.approx(fidelity.etmf(model(x)[0], x, E, shift=s), abs=1e-6)
    assert set(rec["eclmf"]) == {str(g) for g in range(1, len(hs))}
    assert rec["eclmf"]["1"] == pytest.approx(fidelity.eclmf(hs, 1), abs=1e-6)
    assert len({round(v, 6) for v in rec["etmf"].values()}) > 1     # shifts differ
    capsys.readouterr()
    assert fidelity.main([f"--run_dir={runs / 'a'}", "--shifts=64", f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --shifts: [64] not in [0, 64)") and "\n" not in err
