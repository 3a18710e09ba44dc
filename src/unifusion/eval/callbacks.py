"""Lightning callback that runs ShapesBench during training and logs the scores."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from unifusion.eval.shapesbench import ShapesBench, flatten_scores, run_shapesbench

__all__ = ["ShapesBenchCallback"]


class ShapesBenchCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and optionally at validation end), generate the
    ShapesBench prompts with ``pl_module.generate(prompts, images, steps=..., guidance=...,
    seed=...) -> (B, 3, H, W) in [0, 1]`` (EMA weights) and log ``shapesbench/overall``,
    ``shapesbench/<category>`` and ``shapesbench/constraint_score`` to every logger (plus a
    sample grid to TensorBoard when ``log_images``). Runs on global rank 0 only; the module
    is put in eval mode and restored afterwards. ``last_result`` keeps the latest scores.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_per_category: int = 10,
        image_size: int = 16,
        num_steps: int = 20,
        guidance: float = 3.0,
        seed: int = 0,
        bench_seed: int = 0,
        batch_size: int = 32,
        log_images: bool = True,
        on_validation_end: bool = False,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"ShapesBenchCallback: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.bench = ShapesBench(image_size=image_size, num_per_category=num_per_category, seed=bench_seed)
        self.num_steps = int(num_steps)
        self.guidance = float(guidance)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.log_images = bool(log_images)
        self.run_on_validation_end = bool(on_validation_end)
        self.last_result: dict[str, Any] | None = None
        self._last_step = -1

    def _generate_fn(self, pl_module: pl.LightningModule):
        def fn(prompts: list[str], images: list[list[Tensor]] | None) -> Tensor:
            if images is not None:
                images = [[im.to(pl_module.device) for im in refs] for refs in images]
            out = pl_module.generate(  # type: ignore[operator]
                prompts, images, steps=self.num_steps, guidance=self.guidance, seed=self.seed
            )
            return out.detach().float().cpu()

        return fn

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run the benchmark now and log it; returns the flat metrics."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = run_shapesbench(
                self._generate_fn(pl_module), self.bench, batch_size=self.batch_size, return_images=self.log_images
            )
        finally:
            pl_module.train(was_training)
        images = result.pop("images", None)
        self.last_result = result
        flat = flatten_scores(result)
        step = trainer.global_step
        # visible to ModelCheckpoint(monitor="shapesbench/overall") / EarlyStopping too
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in flat.items()})
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=step)
            exp = getattr(logger, "experiment", None)
            if images and self.log_images and hasattr(exp, "add_image"):
                exp.add_image("shapesbench/samples", _grid(images[:64]), global_step=step)
        self._last_step = step
        return flat

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step and trainer.is_global_zero:
            self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_validation_end and trainer.is_global_zero and not trainer.sanity_checking:
            if trainer.global_step != self._last_step:
                self.evaluate(trainer, pl_module)


def _grid(images: list[Tensor], ncol: int = 8) -> Tensor:
    """(3, H', W') grid of same-size (3, H, W) images in [0, 1], 1-px white separators."""
    h, w = images[0].shape[-2:]
    n = len(images)
    ncol = min(ncol, n)
    nrow = (n + ncol - 1) // ncol
    grid = torch.ones(3, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        if im.shape[-2:] != (h, w):
            im = torch.nn.functional.interpolate(im[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = im.clamp(0, 1)
    return grid
