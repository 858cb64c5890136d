"""Plots are written from result rows and metrics.jsonl, with the right cells."""
from __future__ import annotations

import json
import os

import matplotlib.image as mpimg

from eval import plots
from eval.results import make_row
from eval.tasks import SKIPPED


def _rows():
    rows = []
    for L in (64, 128, 256):
        for d in (0.0, 0.5, 1.0):
            if L == 256:
                rows.append(make_row("r", "m", 5, "passkey", f"len={L},depth={d:g}", SKIPPED, 128))
            else:
                rows.append(make_row("r", "m", 5, "passkey", f"len={L},depth={d:g}", "acc",
                                     1.0 if d < 1 else 0.5))
        rows.append(make_row("r", "m", 5, "mqar", f"len={L},kv=8", "acc", 64 / L))
    return rows


def test_heatmap_and_accuracy_vs_length(tmp_path):
    paths = plots.passkey_heatmaps(_rows(), str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["passkey_heatmap_r_step5.png"]
    img = mpimg.imread(paths[0])
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    paths = plots.accuracy_vs_length(_rows(), str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["mqar_acc_vs_length.png",
                                                         "passkey_acc_vs_length.png"]
    for p in paths:
        assert mpimg.imread(p).ndim == 3


def test_loss_curves_of_several_runs(tmp_path):
    dirs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as f:
            for s in range(1, 6):
                f.write(json.dumps({"step": s, "loss": 5.0 / s}) + "\n")
            f.write(json.dumps({"step": 5, "split": "val", "val_loss": 1.1}) + "\n")
        dirs.append(str(d))
    (tmp_path / "c").mkdir()                  # a run without metrics is left out
    out = tmp_path / "plots" / "loss.png"
    assert plots.loss_curves(dirs + [str(tmp_path / "c")], str(out)) == [str(out)]
    assert mpimg.imread(out).shape[1] > 500
    assert plots.loss_curves([str(tmp_path / "c")], str(tmp_path / "none.png")) == []
