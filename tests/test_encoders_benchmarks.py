"""Smoke runs of the encoder benchmarks at toy sizes (the real runs are in benchmarks/)."""

import pytest


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the benchmarks set their own thread count


def test_bench_truncated_forward_smoke(tmp_path, capsys, load_benchmark):
    mod = load_benchmark("bench_truncated_forward")
    rows = mod.main(
        [
            "--hidden",
            "32",
            "--layers",
            "4",
            "--heads",
            "2",
            "--depths",
            "2,4",
            "--repeats",
            "1",
            "--words",
            "4",
            "--batch",
            "1",
            "--csv",
            str(tmp_path / "t.csv"),
        ]
    )
    assert [r["deepest_tap"] for r in rows] == [2, 4] and rows[0]["expected_fraction"] == 0.5
    assert all(r["truncated_ms"] > 0 for r in rows) and (tmp_path / "t.csv").exists()
    assert "measured_fraction" in capsys.readouterr().out


def test_bench_feature_cache_smoke(tmp_path, capsys, load_benchmark):
    """The real quickstart config, live vs cached, one short window each (the real run is in benchmarks/)."""
    mod = load_benchmark("bench_feature_cache")
    rows = mod.main(
        ["--samples", "40", "--windows", "1", "--steps", "1", "--warmup", "0", "--threads", "1"]
        + ["--csv", str(tmp_path / "c.csv")]
    )
    assert [r["mode"] for r in rows] == ["live", "cached", "cached_mem"]
    assert all(r["ms_per_step"] > 0 for r in rows) and (tmp_path / "c.csv").exists()
    assert rows[0]["encoder_ms"] > 0 and rows[1]["encoder_ms"] == 0 == rows[2]["encoder_ms"]
    out = capsys.readouterr().out
    assert "same tokens live and cached: yes" in out and "cached vs live" in out
    assert "conditioning input (data + encoder): live" in out and "every mode trains on the same batches" in out


@pytest.mark.parametrize("name", ["bench_truncated_forward", "bench_feature_cache"])
def test_bench_help(name, load_benchmark):
    with pytest.raises(SystemExit) as e:
        load_benchmark(name).main(["--help"])
    assert e.value.code == 0
