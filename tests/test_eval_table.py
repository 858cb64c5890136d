"""`python -m eval.table` (the docs/results.md command) end to end on a tiny budget: it trains
the cell through `python -m train`, scores it through `python -m eval`, writes the markdown, and
a second invocation evaluates the finished run without retraining it."""
import os

from eval import table

SMOKE = ("--set=train.steps=3,train.batch_size=8,train.warmup_steps=1,checkpoint.every=3,"
         "eval.every=3,model.dim=32")


def test_results_table_runs_on_a_tiny_budget(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results.md"
    argv = ["--models=transformer", "--tasks=mqar", f"--runs={runs}", f"--out={out}", SMOKE]
    assert table.main(argv) == 0
    md = out.read_text()
    assert "python -m eval.table --models=transformer --tasks=mqar" in md
    row = next(line for line in md.splitlines() if line.startswith("| transformer |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert 0.0 <= float(cells[2]) <= 1.0 and float(cells[4]) > 0, row   # accuracy, wall time
    run = runs / "mqar-transformer"
    assert (run / "config.json").exists() and (run / "wall.json").exists()
    mtime = os.path.getmtime(run / "wall.json")
    assert table.main(argv) == 0            # resumable: evaluated again, not retrained
    assert os.path.getmtime(run / "wall.json") == mtime
    assert out.read_text().splitlines()[-10:] == md.splitlines()[-10:]


def test_bad_override_is_one_line_and_exit_2(tmp_path, capsys):
    argv = ["--models=transformer", "--tasks=mqar", f"--runs={tmp_path}", "--set=train.nope=1"]
    assert table.main(argv) == 2
    assert "unknown config key train.nope" in capsys.readouterr().err
