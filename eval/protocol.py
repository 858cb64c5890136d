"""The results protocol's cells: train one (task, model, rate, seed) cell, score it, record it.

`configs/results.py` defines the protocol (tasks, rates, seeds, claims); `eval.table` drives it.
A cell's run directory is `<runs>/<task>-<model>/lr<rate>_seed<seed>`. A cell is finished when
its run holds the final checkpoint or stopped early at the protocol's held-out accuracy; an
interrupted cell is resumed by `python -m train` from its latest checkpoint, so the table may be
built over many invocations (and sessions). The record of a finished cell (`cell.json` in its run
directory) holds everything the table shows: task, model, rate, seed, training wall time,
the held-out selection metric, the test-set scores, parameters, recurrent-state bytes and the
exact resolved config. Records are also kept in a ledger beside the results markdown
(`docs/results_cells.jsonl`, committed): a cell found there by its `fingerprint` (config and
scoring arguments) is finished in any checkout, so a sweep built over many sessions keeps every
finished cell even where the run directories are gone.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL_JSON = "cell.json"


def load_protocol(path: str | None = None):
    """configs/results.py as a module (configs are data read by the CLIs, never imported)."""
    path = path or os.path.join(REPO, "configs", "results.py")
    spec = importlib.util.spec_from_file_location("_results_protocol", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    model: str
    lr: float
    seed: int

    @property
    def variant(self) -> str:
        return f"{self.task}-{self.model}"

    def run_dir(self, runs: str) -> str:
        return os.path.join(runs, self.variant, f"lr{self.lr:g}_seed{self.seed}")

    def overrides(self) -> list[tuple[str, str]]:
        return [("train.lr", repr(self.lr)), ("train.seed", str(self.seed)),
                ("data.seed", str(self.seed))]


def cell_config(proto, cell: Cell, overrides: Sequence[tuple[str, str]] = ()):
    """The cell's config: the protocol's variant, the cell's rate and seed, then `overrides`
    (dotted keys; an unknown one raises KeyError naming it)."""
    cfg = proto.get_config(cell.variant)
    for key, value in [*cell.overrides(), *overrides]:
        section, _, name = key.partition(".")
        if section not in cfg or name not in cfg[section]:
            raise KeyError(f"unknown config key {key}")
        cfg[section][name] = _typed(cfg[section][name], value, key)
    return cfg


def _typed(old, value: str, key: str):
    """`value` (a command-line string) as the type of the config's current value."""
    if isinstance(old, bool):
        if value not in ("True", "False", "true", "false"):
            raise KeyError(f"{key}={value!r} must be true or false")
        return value in ("True", "true")
    return type(old)(value) if isinstance(old, (int, float)) else value


def _val_records(run_dir: str) -> list[dict]:
    from train.rundir import RunDir
    path = RunDir(run_dir).metrics_path
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("split") == "val"]


def finished(run_dir: str, cfg) -> dict | None:
    """The final held-out record of a finished cell (None while it is not finished)."""
    from train.rundir import RunDir
    try:
        latest = RunDir(run_dir).latest_step()
    except (FileNotFoundError, ValueError):
        return None
    if latest is None:
        return None
    vals = [r for r in _val_records(run_dir) if r["step"] == latest]
    if not vals:
        return None
    target = float(cfg.eval.early_stop_accuracy)
    if latest == int(cfg.train.steps) or (target and vals[-1]["val_accuracy"] >= target):
        return vals[-1]
    return None


def train(cell: Cell, cfg_overrides, run_dir: str, log) -> float | None:
    """Train (or resume) the cell with `python -m train`; its wall time, None on failure."""
    cmd = [sys.executable, "-m", "train", f"--config=configs/results.py:{cell.variant}",
           f"--config.checkpoint.dir={run_dir}",
           *(f"--config.{k}={v}" for k, v in [*cell.overrides(), *cfg_overrides])]
    print(f"[table] training {cell.variant} lr={cell.lr:g} seed={cell.seed}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"[table] {cell.variant} lr={cell.lr:g} seed={cell.seed}: training failed "
              f"(exit {rc}); see {log.name}", flush=True)
        return None
    return wall


def score(proto, cell: Cell, run_dir: str, step: int, out: str,
          n_examples: int = 0) -> dict[str, float]:
    """Test-set scores of the cell's final step by `python -m eval` (data seed
    `proto.TEST_SEED`), as {metric name of proto.METRICS[task]: value}."""
    from eval import cli
    from eval.results import latest, read_rows
    args = eval_args(proto, cell.task, n_examples)
    rc = cli.main([f"--run_dir={run_dir}", f"--out={out}", "--no_plots", "--no_progress",
                   f"--seed={proto.TEST_SEED}", *args])
    if rc not in (0, 1):
        print(f"[table] eval of {run_dir} failed (exit {rc})", flush=True)
    rows = [r for r in latest(read_rows(os.path.join(out, "results.jsonl")))
            if os.path.basename(r["run"].rstrip("/")) == os.path.basename(run_dir)
            and r["step"] == step]
    scores = {}
    for name, (task, setting, metric) in proto.METRICS[cell.task].items():
        if setting.endswith(","):
            vals = [r["value"] for r in rows if r["task"] == task and r["metric"] == metric
                    and r["setting"].startswith(setting)]
            if vals:
                scores[name] = sum(vals) / len(vals)
        else:
            vals = [r["value"] for r in rows if (r["task"], r["setting"], r["metric"])
                    == (task, setting, metric)]
            if vals:
                scores[name] = vals[-1]
    return scores


def state_bytes(name: str, model_cfg, seq_len: int) -> int:
    """Recurrent-state bytes per sequence and layer at `seq_len` (Zoology's state size): the
    floating arrays of `init_state(1, max_len=seq_len)` (a KV cache for attention), integer
    position counters excluded, divided by the number of layers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import zoo
    model = nnx.eval_shape(lambda: zoo.build(name, model_cfg))
    # built inside the trace: a state that starts from parameters (Hydra's m_{-1}, its
    # workspace slots M_0) needs their values, which the abstract model does not hold
    state = jax.eval_shape(lambda: zoo.build(name, model_cfg).init_state(1, seq_len))
    n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
            if jnp.issubdtype(x.dtype, jnp.floating))
    return int(n // max(1, len(model.blocks)))


def param_count(name: str, model_cfg) -> int:
    from flax import nnx

    import zoo
    abstract = nnx.eval_shape(lambda: zoo.build(name, model_cfg))
    return zoo.lm.count_params(nnx.state(abstract, nnx.Param))


def eval_args(proto, task: str, n_examples: int = 0) -> list[str]:
    """The `python -m eval` arguments a cell of `task` is scored with."""
    args = list(proto.TASKS[task].eval_args)
    if n_examples:
        args = [a for a in args if not a.startswith("--n_examples=")] + [f"--n_examples={n_examples}"]
    return args


def fingerprint(proto, cell: Cell, cfg, n_examples: int = 0) -> str:
    """What a cell is, as a short hash: its exact config without the checkpoint section (where a
    run is stored is not what it trains), the arguments it is scored with and the scoring
    versions of its eval tasks (`eval.tasks.Task.version`, where not 1). A ledger record
    with the same fingerprint is that cell, finished."""
    import hashlib

    from eval.tasks import TASKS
    from train import config as C
    d = {k: v for k, v in C.to_jsonable(cfg).items() if k != "checkpoint"}
    args = eval_args(proto, cell.task, n_examples)
    names = [t for a in args if a.startswith("--tasks=") for t in a[8:].split(",")]
    versions = {t: TASKS[t].version for t in names if TASKS[t].version != 1}
    blob = json.dumps({"cell": dataclasses.asdict(cell), "config": d, "eval": args,
                       **({"scoring": versions} if versions else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_ledger(path: str) -> dict[str, dict]:
    """{fingerprint: record} of a committed ledger (`<results stem>_cells.jsonl`): the records of
    finished cells, which outlive the run directories (a fresh clone has no runs/). Records
    without a fingerprint (written before it existed) are not matched."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return {r["fingerprint"]: r for r in recs if "fingerprint" in r}


def run_cell(proto, cell: Cell, runs: str, overrides, log,
             n_examples: int = 0, ledger: dict[str, dict] | None = None) -> dict[str, Any] | None:
    """The cell's record: trained (resumed) if not finished, scored, written to cell.json.
    A cell in the `ledger` (same fingerprint) or finished with its record is read back without
    training or scoring again."""
    from train import config as C
    from train.rundir import RunDir
    run_dir = cell.run_dir(runs)
    rec_path = os.path.join(run_dir, CELL_JSON)
    cfg = cell_config(proto, cell, overrides)
    fp = fingerprint(proto, cell, cfg, n_examples)
    if ledger and fp in ledger:
        return ledger[fp]
    if os.path.exists(rec_path) and finished(run_dir, cfg):
        with open(rec_path) as f:
            rec = json.load(f)
        if rec.get("fingerprint") == fp:
            return rec
    wall_before = 0.0
    if os.path.exists(RunDir(run_dir).wall_path):     # time of earlier, interrupted invocations
        with open(RunDir(run_dir).wall_path) as f:
            wall_before = json.load(f)["train_wall_s"]
    wall = None if finished(run_dir, cfg) else train(cell, overrides, run_dir, log)
    if wall is not None:
        wall += wall_before
        os.makedirs(run_dir, exist_ok=True)
        with open(RunDir(run_dir).wall_path, "w") as f:
            json.dump({"train_wall_s": wall}, f)
    elif os.path.exists(RunDir(run_dir).wall_path):
        wall = wall_before
    val = finished(run_dir, cfg)
    if val is None:
        return None
    resolved, model_cfg = C.resolve(cfg)
    name = str(resolved.model.name)      # the registry entry (a label may name a second config)
    rec = {"task": cell.task, "model": cell.model, "name": name, "lr": cell.lr, "seed": cell.seed,
           "train_wall_s": wall, "step": int(val["step"]),
           "val": {k: v for k, v in val.items() if k.startswith("val_")},
           "test": score(proto, cell, run_dir, int(val["step"]), RunDir(run_dir).eval_path,
                         n_examples),
           "params": param_count(name, model_cfg),
           "state_bytes_per_layer": state_bytes(name, model_cfg,
                                                int(resolved.data.seq_len)),
           "config": _config_json(run_dir), "fingerprint": fp}
    with open(rec_path + ".tmp", "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
    os.replace(rec_path + ".tmp", rec_path)
    return rec


def _config_json(run_dir: str) -> dict:
    from train.rundir import RunDir
    with open(RunDir(run_dir).config_path) as f:
        return json.load(f)


def select(proto, task: str, records: Sequence[dict]) -> dict | None:
    """The record of the best rate on held-out data (first seed), by the task's `select`."""
    key = proto.TASKS[task].select
    recs = [r for r in records if key in r["val"]]
    if not recs:
        return None
    sign = 1.0 if key == "val_accuracy" else -1.0
    return max(recs, key=lambda r: (sign * r["val"][key], -r["lr"]))
