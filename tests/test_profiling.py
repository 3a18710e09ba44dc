"""profile_training: a few steps of a real config under torch.profiler -> TensorBoard trace."""

from __future__ import annotations

import glob
import json
import os

import pytest

from unifusion.profiling import _lightning_args, profile_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.yaml")


def test_lightning_args_drop_subcommand_and_set_impl():
    args = _lightning_args(["fit", "-c", "x.yaml"], "out", 7, "triton")
    assert args[:2] == ["-c", "x.yaml"]
    assert "--trainer.max_steps=7" in args and "--model.kernel_impl=triton" in args
    assert not any(a.startswith("--model.kernel_impl") for a in _lightning_args(["-c", "x.yaml"], "out", 7, None))


@pytest.mark.slow
def test_profile_quickstart_writes_trace(tmp_path):
    out = tmp_path / "profile"
    args = [
        "fit",
        "-c",
        QUICKSTART,
        "--data.init_args.batch_size=4",
        "--data.init_args.shuffle_buffer=8",
        f"--data.init_args.sources=[{{path: {tmp_path}/shapes, task: t2i}}]",
        "--data.init_args.generate_shapes={num: 64, seed: 0, size: 16}",
        f"--model.encoder.init_args.path={tmp_path}/tiny_llava",
        "--model.sampling.steps=2",
    ]
    trace_dir = profile_training(args, steps=2, out_dir=str(out), impl="torch")
    assert trace_dir == str(out)
    traces = glob.glob(os.path.join(trace_dir, "*.pt.trace.json"))
    assert len(traces) == 1, os.listdir(trace_dir)
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    steps = {n for n in names if n.startswith("ProfilerStep#")}
    assert len(steps) == 2, sorted(steps)  # exactly the active steps
    assert any("aten::" in n for n in names)
    # the quickstart's ExportPipeline callback is dropped for a profile run
    assert not glob.glob(os.path.join(trace_dir, "**", "pipeline"), recursive=True)
