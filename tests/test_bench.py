"""The benchmark CLI (speed itself is never asserted in tests)."""
import json

from eval import bench


def test_bench_rows_and_errors(tmp_path, capsys):
    out = tmp_path / "b.jsonl"
    assert bench.main(["--models=transformer", "--seq_lens=16", "--batch=2", "--steps=1",
                       "--set=dim=16,n_layers=1,block=8", f"--out={out}",
                       "--baseline=transformer"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["reference", "impl=chunked", "impl=pallas_interpret"]
    assert rows[0]["vs_ref"] == 1.0 and rows[0]["vs_transformer"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["seq_len"] == 16 for r in rows)
    assert "| transformer | reference | 16 |" in capsys.readouterr().out
    assert bench.main(["--models=nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_bench_model_overrides_decode_and_fitted_exponents():
    """`name@key=value+...` overrides, the decode latency, and log-log slopes (exactly 1 and 2
    for times proportional to T and T^2)."""
    assert bench.split_name("rat@chunk=16+pe=none") == ("rat", {"chunk": 16, "pe": "none"})
    assert bench.split_name("transformer") == ("transformer", {})
    rows = [{"model": "a", "variant": "v", "seq_len": T, "step_s": 3e-3 * T, "decode_s": 1e-6 * T * T}
            for T in (1024, 2048, 4096)]
    fits = {k: s for _, _, k, s in bench.fitted_exponents(rows)}
    assert abs(fits["step_s"] - 1.0) < 1e-9 and abs(fits["decode_s"] - 2.0) < 1e-9
    cfg = bench.variants("rat", {"dim": 16, "n_layers": 1, "chunk": 4})[-1][1]
    assert bench.measure_decode("rat", cfg, batch=1, seq_len=6, steps=1) > 0


def test_ops_bench_rows_and_bad_op(tmp_path, capsys):
    """`--ops`: each kernel against its chunked form in one run (here the interpreter on a tiny
    length: the mechanics, not the speed); an unknown op is one line and exit 2."""
    import json

    from eval import bench
    out = tmp_path / "ops.jsonl"
    assert bench.main(["--ops=attention,gated_delta,neural_memory", "--seq_lens=16", "--batch=1", "--steps=1",
                       f"--out={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["op"], r["impl"]) for r in rows] == [
        ("attention", "chunked"), ("attention", "pallas_interpret"),
        ("gated_delta", "chunked"), ("gated_delta", "pallas_interpret"),
        ("neural_memory", "chunked"), ("neural_memory", "pallas_interpret")]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["vs_chunked_fwd_bwd"] > 0
    assert rows[0]["vs_chunked_fwd"] == 1.0
    assert bench.main(["--ops=nope"]) == 2
    assert "unknown op 'nope'" in capsys.readouterr().err
