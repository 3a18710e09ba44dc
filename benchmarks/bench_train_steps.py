#!/usr/bin/env python
"""N real training steps of a config with ``kernel_impl=torch`` vs ``triton``: equal losses, step-time ratio.

Builds the run through the real CLI (``unifusion fit -c CONFIG`` without running it), turns
off the callbacks (sample grids, checkpoints, export), the logger and validation, sets
every kernel-calling module's implementation with :func:`unifusion.layers.set_kernel_impl`
and calls ``trainer.fit`` for ``--steps`` optimizer steps -- once per implementation, in
one process, from the same seed (same initial weights, data order, noise). A callback
records each step's loss and wall time (CUDA-synchronised). Prints per-step losses, the
largest relative loss difference (PASS when <= ``--rtol``) and the median step time of
each implementation after ``--warmup`` steps (Triton compiles its kernels on the first
ones); writes a CSV under ``benchmarks/results/``.

    python benchmarks/bench_train_steps.py                          # GPU: quickstart, 20 steps, torch vs triton
    python benchmarks/bench_train_steps.py --accelerator cpu --impls torch --steps 3   # CPU smoke run

Runs in a scratch directory (``--workdir``, default a temporary one): the quickstart builds
its tiny VLM and shapes data there (``--shapes`` images instead of the config's 20000).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import device_name, results_path, versions, write_csv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Row:
    impl: str
    step: int
    loss: float
    step_ms: float
    config: str
    device: str
    torch: str
    triton: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "experiments", "quickstart.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the step-time median")
    p.add_argument("--impls", nargs="+", default=["torch", "triton"], choices=["torch", "triton", "auto"])
    p.add_argument("--accelerator", default="gpu", help="trainer.accelerator (gpu, cpu)")
    p.add_argument("--shapes", type=int, default=2000, help="shapes images to generate (quickstart data)")
    p.add_argument("--rtol", type=float, default=1e-2, help="largest relative loss difference that passes")
    p.add_argument("--workdir", help="scratch directory for the tiny VLM and data (default: a temporary one)")
    p.add_argument(
        "--extra", nargs="*", default=[], help="more LightningCLI overrides, e.g. --data.init_args.batch_size=8"
    )
    p.add_argument("--out", help="CSV path (default benchmarks/results/bench_train_steps_<gpu>_<versions>.csv)")
    return p.parse_args(argv)


class StepRecorder:
    """Lightning callback: loss and wall time of every training step; re-applies the kernel impl at fit start."""

    def __init__(self, impl: str, cuda: bool) -> None:
        self.impl, self.cuda = impl, cuda
        self.losses: list[float] = []
        self.times_ms: list[float] = []
        self._t0 = 0.0

    def make(self) -> Any:
        from lightning.pytorch.callbacks import Callback

        rec = self

        class _Callback(Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                from unifusion.layers import set_kernel_impl

                set_kernel_impl(pl_module, rec.impl)  # after any setup hook that sets its own

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if rec.cuda:
                    torch.cuda.synchronize()
                rec._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
                if rec.cuda:
                    torch.cuda.synchronize()
                rec.times_ms.append((time.perf_counter() - rec._t0) * 1e3)
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                rec.losses.append(float(loss) if loss is not None else float("nan"))

        return _Callback()


def run_impl(args: argparse.Namespace, impl: str, cuda: bool) -> StepRecorder:
    from unifusion.cli import lightning_main
    from unifusion.layers import set_kernel_impl

    overrides = [
        "-c",
        os.path.abspath(args.config),
        f"--trainer.max_steps={args.steps}",
        f"--trainer.accelerator={args.accelerator}",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--data.init_args.generate_shapes.num={args.shapes}",
        *args.extra,
    ]
    cli = lightning_main(overrides, run=False)
    set_kernel_impl(cli.model, impl)
    rec = StepRecorder(impl, cuda)
    cli.trainer.callbacks.append(rec.make())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return rec


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and args.accelerator in ("gpu", "cuda", "auto")
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        print("bench_train_steps: no CUDA GPU; use --accelerator cpu (with --impls torch) for a CPU smoke run")
        sys.exit(2)
    v = versions()
    print(
        f"device: {device_name()}  torch {v['torch']}  triton {v['triton']}  config {args.config}  "
        f"steps {args.steps}  impls {args.impls}"
    )
    workdir = args.workdir or tempfile.mkdtemp(prefix="unifusion-train-steps-")
    os.makedirs(workdir, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(workdir)  # the config's relative artifacts/ and runs/ land here
    try:
        recs = {impl: run_impl(args, impl, cuda) for impl in args.impls}
    finally:
        os.chdir(cwd)

    rows: list[Row] = []
    name = os.path.basename(args.config)
    for impl, rec in recs.items():
        for i, (loss, ms) in enumerate(zip(rec.losses, rec.times_ms)):
            rows.append(Row(impl, i, loss, round(ms, 2), name, device_name(), v["torch"], v["triton"]))

    print("\nstep  " + "  ".join(f"{impl + ' loss':>14s}" for impl in recs))
    for i in range(max(len(r.losses) for r in recs.values())):
        vals = [f"{r.losses[i]:14.6f}" if i < len(r.losses) else " " * 14 for r in recs.values()]
        print(f"{i:4d}  " + "  ".join(vals))
    med = {}
    for impl, rec in recs.items():
        timed = rec.times_ms[args.warmup :] or rec.times_ms
        med[impl] = statistics.median(timed) if timed else float("nan")
        print(f"{impl}: median step time {med[impl]:.1f} ms (steps {args.warmup}..{len(rec.times_ms) - 1})")
    if "torch" in recs and "triton" in recs:
        a, b = recs["torch"].losses, recs["triton"].losses
        n = min(len(a), len(b))
        rel = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n])), default=float("nan"))
        ok = n == args.steps and rel <= args.rtol
        print(
            f"losses triton vs torch: max relative difference {rel:.2e} over {n} steps (tolerance {args.rtol})  "
            f"{'PASS' if ok else 'MISS'}"
        )
        print(f"step time torch / triton: {med['torch'] / med['triton']:.2f}x")
    if rows:
        path = args.out or results_path("bench_train_steps")
        write_csv(rows, path)
        print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
