"""The small-budget results tables of docs/results.md, reproduced by one command (outside CI):

    python -m eval.table [--models=transformer,mamba,...] [--tasks=mqar,passkey,text] \
        [--runs=runs/results] [--out=docs/results.md] [--all_pairs] [--set=train.steps=4,...]

For every (task, model) cell listed in `configs/results.py:PAIRS` (every cell with --all_pairs) it
trains `configs/results.py:<task>-<model>` with `python -m train`
(skipped when the run already holds its final checkpoint), records the training wall time, scores
the run with `python -m eval` (mqar: accuracy at the training setting; passkey: exact match over
context lengths 128..512 and depths 0/0.5/1, decoded through the state; text: held-out
bits-per-byte) and writes the markdown tables. Every number in the file comes from this run.
Each cell's run directory is `<runs>/<task>-<model>`. `--set` overrides config keys of every
cell (dotted, e.g. `--set=train.steps=4,model.dim=32` for a smoke run; tests/test_eval_table.py
runs the command so).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EVAL_ARGS = {
    "mqar": ["--tasks=mqar", "--lengths=64", "--mqar_kv=8", "--n_examples=512"],
    "passkey": ["--tasks=passkey", "--lengths=128,256,512", "--passkey_depths=0,0.5,1",
                "--n_examples=32"],
    "text": ["--tasks=ppl", "--ppl_batches=0"],
}


def _results_config():
    spec = importlib.util.spec_from_file_location("_results_cfg", os.path.join(REPO, "configs", "results.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _final_step_done(run_dir: str, steps: int) -> bool:
    from train.rundir import RunDir
    try:
        return steps in RunDir(run_dir).steps()
    except (FileNotFoundError, ValueError):
        return False


def train_run(variant: str, run_dir: str, steps: int, log, overrides=()) -> float | None:
    from train.rundir import RunDir
    wall_path = RunDir(run_dir).wall_path
    if _final_step_done(run_dir, steps) and os.path.exists(wall_path):
        with open(wall_path) as f:
            return json.load(f)["train_wall_s"]
    cmd = [sys.executable, "-m", "train", f"--config=configs/results.py:{variant}",
           f"--config.checkpoint.dir={run_dir}",
           *(f"--config.{k}={v}" for k, v in overrides)]
    print(f"[table] training {variant}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc != 0 or not _final_step_done(run_dir, steps):
        print(f"[table] {variant}: training failed (exit {rc}); see the log", flush=True)
        return None
    with open(wall_path, "w") as f:
        json.dump({"train_wall_s": wall}, f)
    return wall


def param_count(name: str, model_cfg) -> int:
    from flax import nnx

    import zoo
    abstract = nnx.eval_shape(lambda: zoo.build(name, model_cfg))
    return zoo.lm.count_params(nnx.state(abstract, nnx.Param))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.table", description=__doc__.split("\n\n")[0])
    cfgmod = _results_config()
    ap.add_argument("--models", default=",".join(cfgmod.MODELS))
    ap.add_argument("--tasks", default=",".join(cfgmod.TASKS))
    ap.add_argument("--runs", default="runs/results")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--all_pairs", action="store_true",
                    help="train every (task, model) cell, not only configs/results.py:PAIRS")
    ap.add_argument("--set", default="", help="config overrides section.key=value,... for every "
                    "cell (a smoke run: --set=train.steps=4,train.batch_size=8)")
    a = ap.parse_args(argv)
    overrides = []
    for item in filter(None, a.set.split(",")):
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            print(f"eval.table: error: --set expects section.key=value, got {item!r}", file=sys.stderr)
            return 2
        overrides.append((key, value))
    models = [m for m in a.models.split(",") if m]
    tasks = [t for t in a.tasks.split(",") if t]
    for m in models:
        if m not in cfgmod.MODELS:
            print(f"eval.table: error: unknown model {m!r} (configs/results.py has {', '.join(cfgmod.MODELS)})", file=sys.stderr)
            return 2
    for t in tasks:
        if t not in EVAL_ARGS:
            print(f"eval.table: error: unknown task {t!r} (known: {', '.join(EVAL_ARGS)})", file=sys.stderr)
            return 2
    from eval import cli
    from eval.results import read_rows
    from train import config as C
    os.makedirs(os.path.join(REPO, a.runs), exist_ok=True)
    log = open(os.path.join(REPO, a.runs, "train.log"), "a")
    table = defaultdict(dict)   # (task, model) -> info
    for task in tasks:
        for m in models:
            variant = f"{task}-{m}"
            if not a.all_pairs and variant not in cfgmod.PAIRS:
                continue
            cfg = cfgmod.get_config(variant)
            run_dir = os.path.join(REPO, a.runs, variant)
            for key, value in overrides:
                section, field = key.split(".", 1)
                if section not in cfg or field not in cfg[section]:
                    print(f"eval.table: error: --set: unknown config key {key}", file=sys.stderr)
                    return 2
                old = cfg[section][field]
                cfg[section][field] = type(old)(value) if isinstance(old, (int, float)) else value
            steps = int(cfg.train.steps)
            wall = train_run(variant, run_dir, steps, log, overrides)
            info = table[(task, m)]
            _, model_cfg = C.resolve(cfg)
            info["params"] = param_count(m, model_cfg)
            info["wall"] = wall
            if wall is None:
                continue
            out = os.path.join(REPO, a.runs, "eval")
            rc = cli.main([f"--run_dir={run_dir}", f"--out={out}", "--no_plots", "--no_progress",
                           *EVAL_ARGS[task]])
            if rc not in (0, 1):
                print(f"[table] eval of {variant} failed (exit {rc})", flush=True)
            rows = [r for r in read_rows(os.path.join(out, "results.jsonl"))
                    if os.path.basename(r["run"].rstrip("/")) == variant and r["step"] == steps]
            for r in rows:   # later rows supersede earlier ones
                info[(r["task"], r["setting"], r["metric"])] = r["value"]
    write_markdown(os.path.join(REPO, a.out), table, models, tasks, a)
    print(f"[table] wrote {a.out}")
    return 0


def _fmt(v, digits=3):
    return "—" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _models_of(table, task, models):
    """The models with a cell for `task` (cells outside PAIRS are not rows)."""
    return [m for m in models if (task, m) in table]


def _section(table, task, models, title, columns: dict) -> list[str]:
    """A markdown section with one row per model: params, the result `columns` (header ->
    (task, setting, metric) key) and the training wall time."""
    heads = ["model", "params", *columns, "train wall (s)"]
    lines = [f"## {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for m in _models_of(table, task, models):
        i = table[(task, m)]
        cells = [m, f"{i.get('params', '—'):,}", *(_fmt(i.get(k)) for k in columns.values()),
                 _fmt(i.get("wall"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_markdown(path, table, models, tasks, a):
    import jax
    lines = ["# Results at a small training budget", "",
             "Every number below was measured by this command, run outside CI on "
             f"{jax.device_count()} × {jax.devices()[0].device_kind}:", "",
             f"    python -m eval.table --models={','.join(models)} --tasks={','.join(tasks)}", "",
             "It is resumable: a cell whose run already holds its final checkpoint is evaluated, "
             "not retrained (its recorded training wall time is kept), so the cells may have been "
             "trained by earlier invocations over subsets of the models.", "",
             "Budget and settings: `configs/results.py` (width 128, 2 layers, same optimiser, "
             "batch and steps for every model within a task). Training wall times are on a "
             "shared 2-core CPU: compare them within this table only. Which (task, model) cells "
             "are trained, and each model's settings and why, are in the docstring of "
             "`configs/results.py` (`PAIRS`).", ""]
    if "mqar" in tasks:
        lines += _section(table, "mqar", models,
                          "MQAR (8 key-value pairs, T = 64, vocabulary 128; 512 held-out examples)",
                          {"MQAR acc": ("mqar", "len=64,kv=8", "acc"),
                           "exact": ("mqar", "len=64,kv=8", "exact")})
    if "passkey" in tasks:
        lines += ["## Passkey retrieval (token format, trained at T = 128; exact match over depths 0, 0.5, 1; 32 examples each)", "",
                  "| model | params | T=128 | T=256 | T=512 | train wall (s) |", "|---|---|---|---|---|---|"]
        for m in _models_of(table, "passkey", models):
            i = table[("passkey", m)]
            cells = []
            for L in (128, 256, 512):
                vals = [i.get(("passkey", f"len={L},depth={d}", "acc")) for d in ("0", "0.5", "1")]
                vals = [v for v in vals if v is not None]
                skipped = [k for k in i if isinstance(k, tuple) and k[1].startswith(f"len={L}") and k[2] == "skipped_over_max_len"]
                cells.append(_fmt(sum(vals) / len(vals)) if vals else ("over max_len" if skipped else "—"))
            lines.append(f"| {m} | {i.get('params', '—'):,} | {' | '.join(cells)} | {_fmt(i.get('wall'), 0)} |")
        lines.append("")
    if "text" in tasks:
        lines += _section(table, "text", models,
                          "Byte-level tinyshakespeare (T = 128; held-out last 10 %)",
                          {"val bits/byte": ("ppl", "split=val", "bpb"),
                           "val loss (nats)": ("ppl", "split=val", "loss")})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
