"""`python -m eval.bench --suite --quick`: every row's measurements, the files it writes, and the
facts the suite exists to show (a KV cache grows with the context, a recurrent state does not)."""
import json

import pytest

from eval import bench, bench_suite, peers


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    rc = bench.main(["--suite", "--quick", "--models=transformer,mamba", f"--out_dir={out}",
                     "--contexts=32,64,128"])
    rows = [json.loads(line) for line in open(out / "suite.jsonl")]
    return rc, {r["model"]: r for r in rows}, out


def test_every_row_carries_the_suite_measurements(suite):
    rc, rows, _ = suite
    assert rc == 0 and sorted(rows) == ["mamba", "transformer"]
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["peak_mib"] > 0
        assert 0 < r["mfu"] < 1
        assert r["params"] == bench_suite.zoo.get(r["model"]).param_count(
            bench_suite.model_config(r["model"], bench_suite.setting(True)))
        assert sorted(map(int, r["by_length"])) == [32, 64]
        assert sorted(map(int, r["decode_s"])) == [32, 64, 128]
        assert "step_s_exponent" in r and "decode_s_exponent" in r
        assert r["allocator"] in ("tcmalloc", "jemalloc", "system malloc")


def test_kv_cache_grows_with_context_and_the_recurrent_state_does_not(suite):
    _, rows, _ = suite
    kv = rows["transformer"]["state_bytes"]
    ssm = rows["mamba"]["state_bytes"]
    assert kv["128"] > 3.5 * kv["32"]           # linear in L (plus a constant)
    assert ssm["32"] == ssm["64"] == ssm["128"] > 0


def test_markdown_and_plots_are_written(suite):
    _, rows, out = suite
    md = (out / "suite.md").read_text()
    assert "allocator" in md and "| transformer |" in md and "| mamba |" in md
    assert f"{rows['transformer']['tokens_per_s']:,.0f}" in md
    for name in ("tokens_per_s", "step_vs_length", "decode_vs_context", "state_bytes"):
        assert (out / f"suite_{name}.png").stat().st_size > 1000


def test_exponent_fits_log_time_against_log_length():
    assert bench_suite.exponent({"1024": 1.0, "4096": 4.0, "16384": 16.0}) == pytest.approx(1.0)
    assert bench_suite.exponent({"1024": 1.0, "2048": 4.0}) == pytest.approx(2.0)
    assert bench_suite.exponent({"1024": 1.0}) is None


def test_missing_peers_get_one_line_and_no_ratio(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "missing", lambda: "PyTorch peers not installed (torch missing)")
    logged = []
    monkeypatch.setattr(bench_suite, "bench_model",
                        lambda name, s, peak, with_peers: {"model": name, "with_peers": with_peers,
                                                             "tokens_per_s": 1.0, "compile_s": 1.0})
    monkeypatch.setattr(bench_suite, "plots", lambda rows, out: [])
    monkeypatch.setattr(bench_suite, "markdown", lambda rows, head: "")
    rows = bench_suite.run(["transformer"], bench_suite.setting(True), str(tmp_path), True,
                           log=logged.append)
    assert any("peers not installed" in line for line in logged)
    assert rows[0]["with_peers"] is False


def test_unknown_model_is_one_line_and_exit_2(capsys):
    assert bench.main(["--suite", "--quick", "--models=nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
