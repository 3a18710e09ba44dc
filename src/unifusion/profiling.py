"""Profile a few training steps of any experiment config with ``torch.profiler``.

    from unifusion.profiling import profile_training
    profile_training(["-c", "experiments/quickstart.yaml"], steps=5, out_dir="runs/profile", impl="torch")

or ``unifusion profile -c experiments/quickstart.yaml --steps 5 --out runs/profile --impl triton``.
Open the trace with ``tensorboard --logdir runs/profile`` (PyTorch Profiler tab, from the
``torch-tb-profiler`` package) or load the ``*.pt.trace.json`` file in chrome://tracing /
https://ui.perfetto.dev. Compare kernel implementations by profiling twice into two
directories (``--impl torch`` vs ``--impl triton``); see benchmarks/README.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["ProfilerStepCallback", "profile_training"]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ProfilerStepCallback(Callback):
    """Advances a ``torch.profiler.profile`` schedule after every training batch."""

    def __init__(self, profiler: torch.profiler.profile) -> None:
        self.profiler = profiler

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.profiler.step()


def _lightning_args(config_args: list[str], out_dir: str, total_steps: int, impl: str | None) -> list[str]:
    args = list(config_args)
    if args and args[0] in _SUBCOMMANDS:  # LightningCLI(run=False) has no subcommands
        args = args[1:]
    args += [
        "--trainer.fast_dev_run=false",
        f"--trainer.max_steps={total_steps}",
        "--trainer.max_epochs=-1",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={os.path.join(out_dir, 'lightning')}",
    ]
    if impl is not None:
        args.append(f"--model.kernel_impl={impl}")
    return args


def profile_training(
    config_args: list[str],
    steps: int = 5,
    out_dir: str = "runs/profile",
    impl: str | None = None,
    *,
    wait: int = 1,
    warmup: int = 1,
    record_shapes: bool = True,
    profile_memory: bool = True,
    with_stack: bool = False,
) -> str:
    """Run ``wait + warmup + steps`` training steps of a config under ``torch.profiler``.

    Args:
        config_args: LightningCLI arguments, e.g. ``["-c", "experiments/quickstart.yaml",
            "--data.init_args.batch_size=8"]``; a leading ``fit`` is accepted and dropped.
        steps: profiled (active) steps; ``wait`` + ``warmup`` steps run before them.
        out_dir: where ``tensorboard_trace_handler`` writes ``*.pt.trace.json``.
        impl: kernel implementation (``torch | triton | auto``); None keeps the config's
            ``model.kernel_impl``.
        with_stack: record Python stacks (bigger traces, enables the stack view).

    Returns:
        The trace directory (``out_dir``).

    Checkpoints and scalars of the short run go to ``out_dir/lightning`` (no validation).
    """
    from unifusion import kernels
    from unifusion.lightning_cli import UniFusionCLI

    if steps < 1:
        raise ValueError(f"profile_training needs steps >= 1, got {steps}")
    os.makedirs(out_dir, exist_ok=True)
    total = wait + warmup + steps
    cli = UniFusionCLI(args=_lightning_args(config_args, out_dir, total, impl), run=False)
    if impl is not None:
        kernels.set_impl(impl)
    # the config's logger is replaced by one inside out_dir (callbacks such as
    # LearningRateMonitor need a logger; the profile run must not write into the config's runs)
    from lightning.pytorch.loggers import TensorBoardLogger

    cli.trainer.loggers = [TensorBoardLogger(save_dir=out_dir, name="lightning")]
    # a few profiled steps make no model worth keeping: drop the config's pipeline export
    from unifusion.callbacks import ExportPipeline

    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, ExportPipeline)]

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=steps, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(out_dir),
        record_shapes=record_shapes,
        profile_memory=profile_memory,
        with_stack=with_stack,
    )
    cli.trainer.callbacks.append(ProfilerStepCallback(profiler))
    with profiler:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return out_dir
