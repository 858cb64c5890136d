"""The results protocol (configs/results.py), run resumably, and docs/results.md from it:

    python -m eval.table [--models=transformer,mamba,...] [--tasks=mqar,passkey,text] \
        [--runs=runs/results] [--out=docs/results.md] [--all_pairs] [--rates=1e-3,2e-3] \
        [--seeds=0,1] [--n_examples=N] [--set=train.steps=4,...]

For every (task, model) cell of `configs/results.py:PAIRS` (every cell with --all_pairs) it trains
the task's fixed setting at every rate of `TASKS[task].rates` (or --rates) with the first seed,
chooses the rate with the best held-out metric (the trainer's `VAL_STREAM`), trains the cells a
claim rests on again at that rate with every seed of `CLAIM_SEEDS` (or --seeds), scores every
cell on a separate test set (`python -m eval --seed=TEST_SEED`), and writes the markdown: one
table per task (parameters, recurrent-state bytes per layer, the rates swept with their held-out
metric, the chosen rate, the test scores as mean and spread over seeds, wall time), the claims
held / not held / not testable here with the cells behind them, and two plots in docs/ (MQAR
accuracy against recurrent-state bytes, Zoology's figure, and against the number of key-value
pairs, per family). Every number comes from the cells' records (`eval.protocol`); a finished cell
is never retrained or rescored, an interrupted one resumes from its checkpoint. `--set`
overrides config keys of every cell (a smoke run: --set=train.steps=4,model.dim=32;
tests/test_eval_table.py runs the command so). The exact config, seed, rate and wall time of
every cell are also written beside the markdown (`<out stem>_cells.jsonl`), the ledger: a cell
recorded there is finished in any checkout (commit it with the markdown), and the markdown shows
every cell of the ledger, also those of models and tasks this invocation did not name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from eval.protocol import REPO, Cell, load_protocol, read_ledger, run_cell, select


def _err(msg: str) -> int:
    print(f"eval.table: error: {msg}", file=sys.stderr)
    return 2


def _numbers(text: str, kind, what: str):
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"--{what} expects comma-separated numbers, got {text!r}") from None


def claim_cells(proto) -> set[tuple[str, str]]:
    return {(c[0], c[1]) for cl in proto.CLAIMS for chk in cl.checks
            for c in (chk[0], chk[2]) if isinstance(c, tuple)}


def main(argv=None) -> int:
    proto = load_protocol()
    ap = argparse.ArgumentParser(prog="python -m eval.table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(proto.MODELS))
    ap.add_argument("--tasks", default=",".join(proto.TASKS))
    ap.add_argument("--runs", default="runs/results")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--all_pairs", action="store_true",
                    help="train every (task, model) cell, not only configs/results.py:PAIRS")
    ap.add_argument("--rates", default="", help="learning rates swept (default: the task's)")
    ap.add_argument("--seeds", default="", help="seeds of the claim cells (default CLAIM_SEEDS)")
    ap.add_argument("--n_examples", type=int, default=0,
                    help="test examples per eval setting (default: the task's eval_args)")
    ap.add_argument("--set", default="", help="config overrides section.key=value,... for every "
                    "cell (a smoke run: --set=train.steps=4,train.batch_size=8)")
    a = ap.parse_args(argv)
    overrides = []
    for item in filter(None, a.set.split(",")):
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            return _err(f"--set expects section.key=value, got {item!r}")
        overrides.append((key, value))
    try:
        rates = _numbers(a.rates, float, "rates")
        seeds = _numbers(a.seeds, int, "seeds") or list(proto.CLAIM_SEEDS)
    except ValueError as e:
        return _err(str(e))
    models = [m for m in a.models.split(",") if m]
    tasks = [t for t in a.tasks.split(",") if t]
    for m in models:
        if m not in proto.MODELS:
            return _err(f"unknown model {m!r} (configs/results.py has {', '.join(proto.MODELS)})")
    for t in tasks:
        if t not in proto.TASKS:
            return _err(f"unknown task {t!r} (configs/results.py has {', '.join(proto.TASKS)})")
    from eval.protocol import cell_config
    try:   # every override names a real key, checked before anything trains
        cell_config(proto, Cell(tasks[0], models[0], 1e-3, 0), overrides)
    except KeyError as e:
        return _err(f"--set: {e.args[0]}")
    runs = os.path.join(REPO, a.runs)
    os.makedirs(runs, exist_ok=True)
    out = os.path.join(REPO, a.out)
    ledger_path = os.path.splitext(out)[0] + "_cells.jsonl"
    ledger = read_ledger(ledger_path)
    claimed = claim_cells(proto)
    cells = defaultdict(list)      # (task, model) -> records (every rate, every seed)
    chosen = {}                    # (task, model) -> chosen rate
    with open(os.path.join(runs, "train.log"), "a") as log:
        for task in tasks:
            for m in models:
                if not a.all_pairs and f"{task}-{m}" not in proto.PAIRS:
                    continue
                recs = []
                for lr in rates or proto.TASKS[task].rates:
                    rec = run_cell(proto, Cell(task, m, lr, seeds[0]), runs, overrides, log,
                                   n_examples=a.n_examples, ledger=ledger)
                    if rec is not None:
                        recs.append(remember(ledger_path, ledger, rec))
                best = select(proto, task, recs)
                if best is None:
                    cells[(task, m)] = []
                    continue
                chosen[(task, m)] = best["lr"]
                if (task, m) in claimed:
                    for s in seeds[1:]:
                        rec = run_cell(proto, Cell(task, m, best["lr"], s), runs, overrides,
                                       log, n_examples=a.n_examples, ledger=ledger)
                        if rec is not None:
                            recs.append(remember(ledger_path, ledger, rec))
                cells[(task, m)] = recs
    keep_ledger(proto, ledger.values(), cells, chosen, seeds[0])
    tasks = [t for t in proto.TASKS if t in tasks or any(k[0] == t for k in cells)]
    models = [m for m in proto.MODELS if m in models or any(k[1] == m for k in cells)]
    from eval import report
    report.write(out, proto, cells, chosen, models, tasks, argv_line(a))
    print(f"[table] wrote {a.out}")
    return 0


def remember(path: str, ledger: dict, rec: dict) -> dict:
    """Append a newly finished cell's record to the ledger file at once (a session that stops
    mid-sweep keeps every finished rate and seed; the invocation's end rewrites the file whole,
    and `read_ledger` keeps the last record of a fingerprint)."""
    fp = rec.get("fingerprint")
    if fp and fp not in ledger:
        with open(path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        ledger[fp] = rec
    return rec


def keep_ledger(proto, records, cells, chosen, first_seed: int) -> None:
    """Add the ledger's cells of (task, model) pairs this invocation did not ask for, so the
    results markdown and its ledger keep every finished cell (a partial sweep never drops the
    others)."""
    other = defaultdict(list)
    for r in records:
        if (r["task"], r["model"]) not in cells and r["model"] in proto.MODELS \
                and r["task"] in proto.TASKS:
            other[(r["task"], r["model"])].append(r)
    for key, recs in other.items():
        best = select(proto, key[0], [r for r in recs if r["seed"] == first_seed])
        if best is not None:
            chosen[key] = best["lr"]
            cells[key] = recs


def argv_line(a) -> str:
    parts = [f"--models={a.models}", f"--tasks={a.tasks}"]
    if a.all_pairs:
        parts.append("--all_pairs")
    if a.n_examples:
        parts.append(f"--n_examples={a.n_examples}")
    for flag in ("rates", "seeds", "set"):
        if getattr(a, flag):
            parts.append(f"--{flag}={getattr(a, flag)}")
    return "python -m eval.table " + " ".join(parts)


def read_cells(path: str) -> list[dict]:
    """The cell records written beside a results markdown (`<stem>_cells.jsonl`)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
