"""`python -m eval.table` (the results protocol, docs/results.md) end to end on a tiny budget: two
models, two rates, one task. It trains every cell through `python -m train`, chooses each model's
rate on held-out data, trains the claim cells with a second seed, scores through `python -m eval`
on the test seed, writes the markdown, the cell records and the plots; a second invocation reads
the finished cells back without training or scoring again."""
import json
import os
import shutil

import pytest

from eval import protocol, table

SMOKE = ("--set=train.steps=3,train.batch_size=8,train.warmup_steps=1,checkpoint.every=3,"
         "eval.every=3,train.mfu_probe=False,model.dim=32")
RATES = (1e-3, 3e-3)


def test_protocol_end_to_end_on_a_tiny_budget(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results.md"
    argv = ["--models=transformer,mamba", "--tasks=mqar", f"--runs={runs}", f"--out={out}",
            "--rates=" + ",".join(map(str, RATES)), "--seeds=0,1", "--n_examples=64", SMOKE]
    assert table.main(argv) == 0
    md = out.read_text()
    assert "python -m eval.table --models=transformer,mamba --tasks=mqar" in md
    recs = table.read_cells(str(tmp_path / "results_cells.jsonl"))
    proto = protocol.load_protocol()
    by = {(r["model"], r["lr"], r["seed"]): r for r in recs}
    # both rates at seed 0 for both models; the claim cells (both models are in a claim) again at
    # the chosen rate with seed 1
    for m in ("transformer", "mamba"):
        sweep = [by[(m, lr, 0)] for lr in RATES]
        best = max(sweep, key=lambda r: (r["val"]["val_accuracy"], -r["lr"]))
        assert protocol.select(proto, "mqar", sweep) is best
        assert (m, best["lr"], 1) in by and len([k for k in by if k[0] == m]) == 3
        row = next(line for line in md.splitlines() if line.startswith(f"| {m} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == f"{best['lr']:g}", row                      # the chosen rate
        accs = [by[(m, best["lr"], s)]["test"]["acc"] for s in (0, 1)]
        assert cells[5].startswith(f"{sum(accs) / 2:.3f} ± {abs(accs[0] - accs[1]) / 2:.3f}"), row
    for r in recs:   # seed, rate, wall time and the exact config of every cell
        assert r["config"]["train"]["lr"] == r["lr"] and r["config"]["train"]["seed"] == r["seed"]
        assert r["config"]["data"]["seed"] == r["seed"] and r["train_wall_s"] > 0
        assert r["config"]["model"]["dim"] == 32 and 0.0 <= r["test"]["acc"] <= 1.0
        assert {"acc@kv8", "acc@kv16"} <= set(r["test"]) and r["state_bytes_per_layer"] > 0
    t = by[("transformer", RATES[0], 0)]
    # attention's KV cache: keys and values, T x dim floats each (float32)
    assert t["state_bytes_per_layer"] == 2 * 64 * 32 * 4
    claims = {line.split("|")[1].strip(): line for line in md.splitlines() if "**" in line}
    attention = claims["Attention solves MQAR (about 100 % accuracy)"]
    assert "**held**" in attention or "**not held**" in attention
    assert "not testable here" in claims[next(c for c in claims if c.startswith("Mamba"))]
    assert "lssl not trained" in claims[next(c for c in claims if c.startswith("Mamba"))]
    for png in ("results_mqar_state.png", "results_mqar_pairs.png"):
        assert (tmp_path / png).stat().st_size > 1000
    cell_json = os.path.join(protocol.Cell("mqar", "mamba", RATES[1], 0).run_dir(str(runs)),
                             protocol.CELL_JSON)
    mtime = os.path.getmtime(cell_json)
    assert table.main(argv) == 0            # resumable: nothing retrained or rescored
    assert os.path.getmtime(cell_json) == mtime
    assert out.read_text() == md
    assert json.load(open(cell_json))["lr"] == RATES[1]
    # the ledger beside the markdown: a fresh checkout (no run directories) retrains nothing, and
    # an invocation over one model keeps the other model's cells in the markdown
    shutil.rmtree(runs)
    assert table.main(argv) == 0
    assert out.read_text() == md and not os.path.exists(os.path.dirname(cell_json))
    assert table.main([a for a in argv if not a.startswith("--models")] + ["--models=mamba"]) == 0
    assert "| transformer |" in out.read_text() and not os.path.exists(os.path.dirname(cell_json))


def test_fingerprint_is_the_cell_not_where_it_is_stored():
    proto = protocol.load_protocol()
    cell = protocol.Cell("mqar", "transformer", 1e-3, 0)
    cfg = protocol.cell_config(proto, cell)
    fp = protocol.fingerprint(proto, cell, cfg)
    moved = protocol.cell_config(proto, cell, [("checkpoint.dir", "/elsewhere")])
    assert protocol.fingerprint(proto, cell, moved) == fp
    for key, value in (("train.steps", "7"), ("model.dim", "64"), ("data.num_kv_pairs", "8")):
        assert protocol.fingerprint(proto, cell, protocol.cell_config(proto, cell, [(key, value)])) != fp
    assert protocol.fingerprint(proto, protocol.Cell("mqar", "transformer", 1e-3, 1),
                                protocol.cell_config(proto, cell)) != fp
    assert protocol.fingerprint(proto, cell, cfg, n_examples=8) != fp


def test_bad_override_is_one_line_and_exit_2(tmp_path, capsys):
    argv = ["--models=transformer", "--tasks=mqar", f"--runs={tmp_path}", "--set=train.nope=1"]
    assert table.main(argv) == 2
    assert "unknown config key train.nope" in capsys.readouterr().err
    assert table.main(["--models=nope", f"--runs={tmp_path}"]) == 2
    assert table.main(["--rates=fast", f"--runs={tmp_path}"]) == 2


def test_a_sweep_stopped_midway_keeps_its_finished_cells(tmp_path, monkeypatch):
    """Every finished cell goes into the ledger at once, so a session that stops mid-sweep (here
    an interrupt while the second rate trains) loses nothing finished: a fresh checkout (no run
    directories) trains only the cell that did not finish."""
    runs, out = tmp_path / "runs", tmp_path / "results.md"
    argv = ["--models=mamba", "--tasks=mqar", f"--runs={runs}", f"--out={out}",
            "--rates=" + ",".join(map(str, RATES)), "--seeds=0", "--n_examples=16", SMOKE]
    real, trained = table.run_cell, []

    def stop_at_second(proto, cell, *a, **kw):
        if cell.lr == RATES[1]:
            raise KeyboardInterrupt
        return real(proto, cell, *a, **kw)
    monkeypatch.setattr(table, "run_cell", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        table.main(argv)
    recs = table.read_cells(str(tmp_path / "results_cells.jsonl"))
    assert [(r["model"], r["lr"]) for r in recs] == [("mamba", RATES[0])]
    shutil.rmtree(runs)

    def count(proto, cell, runs_, *a, **kw):
        rec = real(proto, cell, runs_, *a, **kw)
        if os.path.isdir(cell.run_dir(runs_)):
            trained.append(cell.lr)
        return rec
    monkeypatch.setattr(table, "run_cell", count)
    assert table.main(argv) == 0
    assert trained == [RATES[1]]
    assert len(table.read_cells(str(tmp_path / "results_cells.jsonl"))) == 2
