"""Smoke test of the quickstart step benchmark (the measured run is in benchmarks/README.md)."""

import pytest


def test_bench_quickstart_step_runs_each_mode_in_its_own_worker(tmp_path, capsys, load_benchmark):
    rows = load_benchmark("bench_quickstart_step").main(
        ["--samples", "64", "--windows", "2", "--steps", "1", "--warmup", "1", "--threads", "1"]
        + ["--cache", "--csv", str(tmp_path / "q.csv")]
    )
    assert [r["mode"] for r in rows] == ["before", "after", "after+cache"]
    assert all(r["ms_per_step"] > 0 and r["paired_speedup"] > 0 for r in rows)
    assert rows[0]["speedup_vs_before"] == 1.0 and (tmp_path / "q.csv").exists()
    out = capsys.readouterr().out
    # the template is conditioned before and not after: the workers really ran different paths
    assert "one process per mode" in out and "before 19, after 3" in out
    assert "after+cache: the in-memory feature cache" in out


def test_bench_quickstart_step_modes(load_benchmark):
    modes = load_benchmark("bench_quickstart_step").timed_modes
    assert modes() == ["before", "after"]
    assert modes(cache=True) == ["before", "after", "after+cache"]
    every = ["before", "after", "after+compile", "after+cache", "after+compile+cache"]
    assert modes(compile_model=True, cache=True) == every


def test_bench_quickstart_step_help(load_benchmark):
    with pytest.raises(SystemExit) as e:
        load_benchmark("bench_quickstart_step").main(["--help"])
    assert e.value.code == 0
