"""The benchmark CLI (speed itself is never asserted in tests)."""
import json

from eval import bench


def test_bench_rows_and_errors(tmp_path, capsys):
    out = tmp_path / "b.jsonl"
    assert bench.main(["--models=transformer", "--seq_lens=16", "--batch=2", "--steps=1",
                       "--set=dim=16,n_layers=1,block=8", f"--out={out}",
                       "--baseline=transformer"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["reference", "impl=chunked"]
    assert rows[0]["vs_ref"] == 1.0 and rows[0]["vs_transformer"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["seq_len"] == 16 for r in rows)
    assert "| transformer | reference | 16 |" in capsys.readouterr().out
    assert bench.main(["--models=nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
