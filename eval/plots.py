"""PNG plots of evaluation results and training logs (matplotlib, Agg backend).

  passkey_heatmaps(rows, out_dir)   one depth x length heat-map of passkey accuracy per (run, step)
  accuracy_vs_length(rows, out_dir) one figure per task with "len" settings: accuracy against
                                    context length, a line per (run, step[, other setting]),
                                    averaged over needle depths; skipped (over max_len) cells are
                                    left out and the limit is drawn as a dotted vertical line
  loss_curves(run_dirs, path)       training loss (left) and held-out loss (right) of several
                                    runs side by side, from each run's metrics.jsonl

Each function returns the paths it wrote.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from eval.results import latest  # noqa: E402
from eval.tasks import SKIPPED, parse_setting  # noqa: E402
from train import paths as fs  # noqa: E402


def _save(fig, path: str) -> None:
    """Save a figure as PNG to a local path or to object storage (train.paths), then close it."""
    if fs.is_remote(path):
        import io
        buf = io.BytesIO()
        fig.savefig(buf, dpi=100, format="png")
        with fs.open_(path, "wb") as f:
            f.write(buf.getvalue())
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    plt.close(fig)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def passkey_heatmaps(rows: Iterable[Mapping], out_dir: str, task: str = "passkey",
                     metric: str = "acc") -> list[str]:
    cells: dict[tuple, dict[tuple, float]] = collections.defaultdict(dict)
    for r in latest(rows):
        if r["task"] != task or r["metric"] not in (metric, SKIPPED):
            continue
        s = parse_setting(r["setting"])
        if "len" not in s or "depth" not in s:
            continue
        val = r["value"] if r["metric"] == metric else np.nan
        cells[(r["run"], r["step"])][(int(s["len"]), float(s["depth"]))] = val
    paths = []
    for (run, step), grid in cells.items():
        lens = sorted({k[0] for k in grid})
        depths = sorted({k[1] for k in grid})
        a = np.full((len(depths), len(lens)), np.nan)
        for (L, d), v in grid.items():
            a[depths.index(d), lens.index(L)] = v
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lens), 1.2 + 0.5 * len(depths)))
        im = ax.imshow(np.ma.masked_invalid(a), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto",
                       origin="lower")
        ax.set_xticks(range(len(lens)), [str(x) for x in lens])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for i in range(len(depths)):
            for j in range(len(lens)):
                txt = "n/a" if np.isnan(a[i, j]) else f"{a[i, j]:.2f}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=8)
        ax.set_title(f"{task} {metric}: {run} @ {step}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = fs.join(out_dir, f"{_safe(task)}_heatmap_{_safe(run)}_step{step}.png")
        _save(fig, path)
        paths.append(path)
    return paths


def accuracy_vs_length(rows: Iterable[Mapping], out_dir: str, metric: str = "acc") -> list[str]:
    # task -> line label -> len -> [values]; limits: task -> line label -> max_len
    series: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    limits: dict = collections.defaultdict(dict)
    for r in latest(rows):
        s = parse_setting(r["setting"])
        if "len" not in s or r["metric"] not in (metric, SKIPPED):
            continue
        other = ",".join(f"{k}={v}" for k, v in s.items() if k not in ("len", "depth"))
        label = f"{r['run']}@{r['step']}" + (f" {other}" if other else "")
        if r["metric"] == SKIPPED:
            limits[r["task"]][label] = r["value"]
        else:
            series[r["task"]][label][int(s["len"])].append(r["value"])
    paths = []
    for task, lines in series.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in sorted(lines.items()):
            xs = sorted(pts)
            line, = ax.plot(xs, [np.mean(pts[x]) for x in xs], marker="o", label=label)
            if label in limits[task]:
                ax.axvline(limits[task][label], color=line.get_color(), linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric} against context length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = fs.join(out_dir, f"{_safe(task)}_{metric}_vs_length.png")
        _save(fig, path)
        paths.append(path)
    return paths


def read_metrics(run_dir: str) -> list[dict]:
    from train.rundir import RunDir
    path = RunDir(run_dir).metrics_path
    out = []
    if not fs.exists(path):
        return out
    with fs.open_(path, "r") as f:
        for line in f.read().splitlines(keepends=True):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def loss_curves(run_dirs: Sequence[str], path: str) -> list[str]:
    """Train loss and held-out loss against step for several runs side by side."""
    runs = [(fs.basename(fs.absolute(d)), read_metrics(d)) for d in run_dirs]
    runs = [(n, m) for n, m in runs if m]
    if not runs:
        return []
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for name, rows in runs:
        tr = [(r["step"], r["loss"]) for r in rows if r.get("split", "train") == "train"
              and "loss" in r and "step" in r]
        va = [(r["step"], r.get("val_loss", r.get("loss"))) for r in rows if r.get("split") == "val"
              and "step" in r and ("val_loss" in r or "loss" in r)]
        if tr:
            ax_t.plot(*zip(*tr), label=name)
        if va:
            ax_v.plot(*zip(*va), marker="o", label=name)
    for ax, title in ((ax_t, "training loss"), (ax_v, "held-out loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return [path]
