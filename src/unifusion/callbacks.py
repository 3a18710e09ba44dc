"""Callbacks: sample grids for fixed prompts, atomic checkpoint writing, a step-based progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from PIL import Image, ImageDraw, ImageFont

from unifusion.images import to_pil

log = logging.getLogger(__name__)


def tensorboard_experiment(trainer: pl.Trainer):
    """The SummaryWriter of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            return exp
    return None


def output_dir(trainer: pl.Trainer, sub: str) -> str:
    """``<logger's log_dir>/<sub>``; never ``trainer.log_dir``, which is a collective
    (a broadcast) and deadlocks DDP when called from rank 0 alone."""
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return os.path.join(log_dir, sub)
    return os.path.join(trainer.default_root_dir, sub)


class SampleGrid(pl.Callback):
    """Samples a grid for fixed prompts at step 0, every ``every_n_steps`` and at the end.

    Written to TensorBoard (``samples``) and as PNG files under ``<log_dir>/samples/``.
    ``num_steps`` / ``guidance`` default to the model's ``sample_steps`` / ``sample_guidance``.
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        upscale: int = 4,
        at_start: bool = True,
    ) -> None:
        if not prompts:
            raise ValueError("SampleGrid needs at least one prompt")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.num_steps = num_steps
        self.guidance = guidance
        self.seed = seed
        self.upscale = upscale
        self.at_start = at_start
        self.written: list[str] = []

    @pl.utilities.rank_zero_only
    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images = pl_module.generate(self.prompts, steps=self.num_steps, guidance=self.guidance, seed=self.seed)
        # each cell carries its prompt: a grid of tiny images is unreadable without them
        grid = captioned_grid(images.cpu(), self.prompts, nrow=min(len(self.prompts), 8), upscale=self.upscale)
        step = trainer.global_step
        exp = tensorboard_experiment(trainer)
        if exp is not None:
            description = "  \n".join(f"{i}: {p}" for i, p in enumerate(self.prompts))
            add_image_with_description(exp, "samples", grid, step, description)
            exp.add_text("samples/prompts", description, global_step=step)
        path = os.path.join(output_dir(trainer, "samples"), f"step_{step:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path)
        with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "prompts": self.prompts, "seed": self.seed}, f, indent=1)
        self.written.append(path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.log_samples(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step > 0
            and step % self.every_n_steps == 0
            and trainer.fit_loop._should_accumulate() is False
        ):
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.written or not self.written[-1].endswith(f"step_{trainer.global_step:06d}.png"):
            self.log_samples(trainer, pl_module)


def captioned_grid(images: torch.Tensor, prompts: Sequence[str], nrow: int = 8, upscale: int = 4) -> Image.Image:
    """A grid of ``(B, 3, H, W)`` images in [0, 1], each cell labelled with its prompt below it.

    Cells are upscaled (nearest neighbour) by ``upscale`` and at least 96 px wide so that
    two or three words fit per label line; long prompts wrap and are cut after 3 lines.
    """
    b = images.shape[0]
    nrow = max(1, min(nrow, b))
    ncol = math.ceil(b / nrow)
    font = ImageFont.load_default()
    cells = [to_pil(img, max(1, upscale)) for img in images]
    cell_w = max(96, max(c.width for c in cells))
    cell_h = max(c.height for c in cells)
    char_w = max(1, int(font.getlength("x"))) if hasattr(font, "getlength") else 6
    line_h = 12
    chars = max(4, (cell_w - 4) // char_w)
    labels = []
    for i in range(b):
        text = prompts[i] if i < len(prompts) else ""
        lines = textwrap.wrap(text, chars)[:3] or [""]
        labels.append(lines)
    label_h = line_h * max(len(lines) for lines in labels) + 4
    pad = 2
    canvas = Image.new("RGB", (nrow * (cell_w + pad) + pad, ncol * (cell_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, cell in enumerate(cells):
        r, c = divmod(i, nrow)
        x, y = pad + c * (cell_w + pad), pad + r * (cell_h + label_h + pad)
        canvas.paste(cell, (x + (cell_w - cell.width) // 2, y))
        for k, line in enumerate(labels[i]):
            draw.text((x + 2, y + cell_h + 2 + k * line_h), line, fill="black", font=font)
    return canvas


def add_image_with_description(writer: Any, tag: str, image: Image.Image, step: int, description: str) -> None:
    """``writer.add_image`` plus a description (TensorBoard shows it in the image card's info tooltip)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import image as image_summary

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if not isinstance(writer, SummaryWriter):  # e.g. the no-op logger of fast_dev_run
        writer.add_image(tag, arr, global_step=step, dataformats="HWC")
        return
    summary = image_summary(tag, arr, dataformats="HWC")
    for value in summary.value:
        value.metadata.summary_description = description
        value.metadata.plugin_data.plugin_name = "images"
    writer._get_file_writer().add_summary(summary, step)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same directory, then renames over the target.

    A kill during a save leaves the previous checkpoint intact (``os.replace`` is atomic
    on POSIX and Windows for paths on one file system).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, path: str, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        """Resuming (``fit --ckpt_path``) never unpickles code: tensors and plain data only."""
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        from unifusion.checkpoints import load_checkpoint_file

        return load_checkpoint_file(path, what="--ckpt_path checkpoint", map_location=map_location or "cpu")


class LossHistory(pl.Callback):
    """Appends ``{"step", "epoch", "loss", "task", "first_key"}`` per optimizer step to a JSON-lines file.

    Handy for comparing runs (e.g. an interrupted-and-resumed run against an uninterrupted
    one) without parsing TensorBoard event files.
    """

    def __init__(self, path: str = "loss_history.jsonl") -> None:
        self.path = path

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        # a skipped batch (model.nonfinite_loss: skip) returns no loss: None, or a dict without "loss"
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        task = batch.get("task") if isinstance(batch, dict) else None
        keys = batch.get("key") if isinstance(batch, dict) else None
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "loss": float(loss),
            "task": task,
            "first_key": keys[0] if keys else None,
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class ExportPipeline(pl.Callback):
    """At the end of training, save the pipeline (EMA weights) as a ``from_pretrained`` folder.

    Written to ``dirpath`` or ``<log_dir>/pipeline``; load it with
    ``UniFusionPipeline.from_pretrained(DIR)`` or ``unifusion generate --model DIR``.
    """

    def __init__(self, dirpath: str | None = None, use_ema: bool = True, include_encoder: bool = False) -> None:
        self.dirpath = dirpath
        self.use_ema = use_ema
        self.include_encoder = include_encoder
        self.exported: str | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = self.dirpath or output_dir(trainer, "pipeline")
        pl_module.export_pipeline(out, use_ema=self.use_ema, include_encoder=self.include_encoder)
        self.exported = out
        pl.utilities.rank_zero_info(
            f"exported the pipeline to {out} (load: UniFusionPipeline.from_pretrained({out!r}) "
            f"or unifusion generate --model {out})"
        )


# ---------------------------------------------------------------------------------- progress bar
def _step_limited(trainer: pl.Trainer) -> bool:
    """True when ``max_steps`` ends the run (Lightning then sets ``max_epochs=-1``)."""
    max_epochs = trainer.max_epochs
    return trainer.max_steps is not None and trainer.max_steps > 0 and (max_epochs is None or max_epochs < 0)


class _StepCounting:
    """Counts optimizer steps against ``max_steps`` on a step-limited run.

    Lightning's bars count batches of the current epoch against
    ``min(batches per epoch, remaining steps)``, which reads "Epoch 0/-2" on a step-limited
    run and "20/10" after a mid-epoch resume (batch 20 of the epoch, 10 steps left). On a
    step-limited run this bar shows ``global_step/max_steps``; epoch-limited runs are unchanged.
    """

    trainer: pl.Trainer

    @property
    def total_train_batches(self) -> int | float:
        if _step_limited(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches  # type: ignore[misc]

    def _position(self, trainer: pl.Trainer, batch_idx: int) -> int:
        # the parent bars show ``batch_idx + 1``
        return trainer.global_step - 1 if _step_limited(trainer) else batch_idx

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, self._position(trainer, batch_idx))  # type: ignore[misc]


class StepTQDMProgressBar(_StepCounting, TQDMProgressBar):
    """:class:`TQDMProgressBar` that counts steps on a step-limited run (see :class:`_StepCounting`)."""


class StepRichProgressBar(_StepCounting, RichProgressBar):
    """:class:`RichProgressBar` that counts steps on a step-limited run (see :class:`_StepCounting`)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            text += f"/{self.trainer.max_epochs - 1}"
        if len(self.validation_description) > len(text):
            text = f"{text:{len(self.validation_description)}}"
        return text


def default_progress_bar() -> pl.Callback:
    """The bar ``unifusion fit`` adds: Rich where installed (as Lightning's default), else TQDM."""
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()
