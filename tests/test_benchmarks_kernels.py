"""The GPU suite's CPU dry run, and a smoke run of the LAP-vs-Krea-2 benchmark at toy sizes."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run_suite(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SUITE, *args], capture_output=True, text=True, timeout=60, env=env)


def test_gpu_suite_dry_run_lists_every_step_and_exits_0():
    out = _run_suite("--dry_run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    steps = [line for line in lines if line.startswith("[")]
    assert [s.split("]")[0][1:] for s in steps] == [
        "kernel_tests_bf16",
        "bench_kernels",
        "bench_lap_module",
        "bench_train_steps",
    ]
    text = out.stdout
    assert "-m pytest -q -m gpu tests/kernels" in text
    assert "--T 65536 --n 12 --H 32 --d 128 --dtype bf16" in text
    assert "bench_train_steps.py --steps 20 --impls torch triton" in text
    assert "benchmarks/results/" in text
    # every step is time-boxed and the boxes add up to at most 8 minutes
    boxes = [int(s.split("timeout ")[1].split("s:")[0]) for s in steps]
    assert sum(boxes) <= 480, boxes


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the suite for real")
def test_gpu_suite_without_gpu_fails_with_one_clear_line():
    out = _run_suite()
    assert out.returncode != 0
    assert out.stdout == ""
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "no NVIDIA GPU" in err[0] and "--dry_run" in err[0], out.stderr


def test_gpu_suite_rejects_unknown_arguments():
    out = _run_suite("--fast")
    assert out.returncode == 2 and "unknown argument '--fast'" in out.stderr


def test_bench_lap_module_smoke(tmp_path, capsys, load_benchmark):
    pytest.importorskip("diffusers.models.transformers.transformer_krea2")
    mod = load_benchmark("bench_lap_module")
    csv = tmp_path / "lap.csv"
    rows = mod.main(
        ["--B", "2", "--S", "5", "--min_len", "2", "--n", "3", "--hidden", "16", "--heads", "2", "--reps", "1"]
        + ["--no_memory", "--out", str(csv)]
    )
    out = capsys.readouterr().out
    names = {(r.module, r.mode) for r in rows}
    for module in ("krea2_diffusers", "krea2_unifusion[torch]", "lap_unifusion[torch]"):
        assert (module, "fwd") in names and (module, "fwd+bwd") in names
    assert "vs diffusers Krea2TextFusion, same weights: max |diff|" in out
    diff = float(out.split("max |diff| = ")[1].split()[0])
    assert diff < 1e-4  # the Krea-2 preset computes diffusers' function
    assert all(r.ms > 0 for r in rows) and csv.exists()
    assert "Targets (CPU)" in out and ("PASS" in out or "MISS" in out)


def test_cpu_peak_memory_from_the_profiler(load_benchmark):
    mod = load_benchmark("bench_lap_module")

    def two_live_tensors():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 4 MiB more while a is alive
        del a
        return b.sum()

    assert 7.5 < mod.cpu_peak_mb(two_live_tensors) < 9.0
