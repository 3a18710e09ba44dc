"""``unifusion fit | validate | test | predict``: LightningCLI with the project's defaults.

Kept apart from :mod:`unifusion.cli` so that the tool commands (``generate``, ``data``,
``eval``, ...) and ``unifusion --help`` start without importing Lightning.

What this adds to LightningCLI:

* checkpoints are written atomically (:class:`~unifusion.callbacks.AtomicCheckpointIO`) and
  read with ``weights_only=True``;
* ``--run_dir DIR``: a fixed run folder (logs, ``config.yaml``, ``checkpoints/``, ``samples/``)
  instead of a new ``version_N`` per start, so ``--ckpt_path=last`` finds the previous
  attempt's ``last.ckpt`` (SLURM requeue, re-running a stage after a failed start);
* a progress bar that counts steps on step-limited runs;
* one summary line when a command finishes (where checkpoints and logs went).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from unifusion.callbacks import AtomicCheckpointIO, default_progress_bar, output_dir
from unifusion.models import UniFusionModel

log = logging.getLogger(__name__)

#: "setup" while arguments are parsed and classes built, "run" once the subcommand runs; the
#: ``unifusion`` command reports a ValueError/TypeError of the setup phase (a bad config) in one line
PHASE = {"value": "setup"}

#: logger classes whose log folder is ``save_dir/name/version`` (what ``--run_dir`` sets)
_FOLDER_LOGGERS = ("TensorBoardLogger", "CSVLogger")


class UniFusionCLI(LightningCLI):
    """LightningCLI with the project's defaults (atomic checkpoints, TensorBoard under runs/, ``--run_dir``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_data", True)
        trainer_defaults = {"default_root_dir": "runs"}
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}) or {})
        kwargs["trainer_defaults"] = trainer_defaults
        PHASE["value"] = "setup"
        super().__init__(UniFusionModel, LightningDataModule, *args, **kwargs)

    # -- arguments ---------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help=(
                "Fixed run folder: TensorBoard logs, config.yaml, checkpoints/ and samples/ go to DIR itself "
                "(no version_N), so a restarted or requeued job with --ckpt_path=last continues from "
                "DIR/checkpoints/last.ckpt. Replaces the save_dir/name/version of a TensorBoard or CSV logger."
            ),
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # the `unifusion` command always passes its arguments explicitly (sys.argv holds the
        # command name too), so LightningCLI's "args and sys.argv both given" warning is noise
        if isinstance(args, dict):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters with a bare torch.load; read it the
        # project's way instead: weights_only, one clear line for a missing/corrupt/unsafe file
        subcommand = self.config.get("subcommand")
        if subcommand:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if (
                ckpt_path
                and ckpt_path not in ("last", "best", "hpc", "registry")
                and not ckpt_path.startswith("registry:")
            ):
                from unifusion.checkpoints import load_checkpoint_file

                load_checkpoint_file(ckpt_path, what="--ckpt_path checkpoint")
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = cfg.get("run_dir")
        if run_dir:
            _apply_run_dir(cfg, run_dir)
            if cfg.get("ckpt_path"):
                # resuming in a fixed folder is the point of --run_dir: its checkpoints are expected there
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    # -- trainer -----------------------------------------------------------------------
    def instantiate_trainer(self, **kwargs: Any):
        # checkpoints are always written atomically unless the config brings its own CheckpointIO
        plugins = self._get(self.config_init, "trainer.plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs.setdefault("plugins", plugins)
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning's default bar reads "Epoch 0/-2" on a step-limited run: swap in ours
        for i, cb in enumerate(trainer.callbacks):
            if type(cb) in (RichProgressBar, TQDMProgressBar):
                trainer.callbacks[i] = default_progress_bar()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        PHASE["value"] = "run"
        super()._run_subcommand(subcommand)

    # -- hooks ---------------------------------------------------------------------------
    def before_fit(self) -> None:
        _check_cache_matches(self.model, self.datamodule)
        _warn_settings_without_effect(self.model, self.datamodule)

    def after_fit(self) -> None:
        t = self.trainer
        status = "interrupted" if t.interrupted else "done"
        ckpts = sorted({cb.dirpath for cb in t.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath})
        last = [cb.last_model_path for cb in t.checkpoint_callbacks if getattr(cb, "last_model_path", "")]
        where = f"last checkpoint {last[0]}" if last else ("checkpoints in " + ", ".join(ckpts) if ckpts else "")
        # the epoch of the last step (Lightning's current_epoch already counts a stopped epoch as done)
        epoch = max(0, int(t.fit_loop.epoch_progress.current.started) - 1)
        _summary(
            f"fit {status}: step {t.global_step} (epoch {epoch})"
            + (f"; {where}" if where else "")
            + f"; logs in {output_dir(t, '')}"
        )

    def after_validate(self) -> None:
        _summary(f"validate done: {_metrics(self.trainer)}; logs in {output_dir(self.trainer, '')}")

    def after_test(self) -> None:
        _summary(f"test done: {_metrics(self.trainer)}; logs in {output_dir(self.trainer, '')}")

    def after_predict(self) -> None:
        from lightning.pytorch.callbacks import BasePredictionWriter

        outs = [getattr(cb, "out_dir", None) for cb in self.trainer.callbacks if isinstance(cb, BasePredictionWriter)]
        outs = [o for o in outs if o]
        batches = sum(int(n) for n in (self.trainer.num_predict_batches or []))
        _summary(f"predict done: {batches} batches" + (f"; written to {', '.join(outs)}" if outs else ""))


@rank_zero_only
def _summary(line: str) -> None:
    print(line.replace(os.sep + os.sep, os.sep).rstrip(os.sep))


def _metrics(trainer: Any) -> str:
    items = []
    for k, v in sorted(trainer.callback_metrics.items()):
        try:
            items.append(f"{k}={float(v):.4f}")
        except (TypeError, ValueError):
            continue
    return ", ".join(items[:8]) or "no metrics logged"


def _apply_run_dir(cfg: Any, run_dir: str) -> None:
    """Point the trainer's root and every folder logger at ``run_dir`` itself (no ``version_N``)."""
    run_dir = os.path.normpath(run_dir)
    parent, leaf = os.path.split(run_dir)
    trainer = cfg.trainer
    trainer.default_root_dir = run_dir
    logger = trainer.get("logger")
    if logger is None or logger is True:
        from jsonargparse import Namespace

        logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace())
        trainer.logger = logger
    for item in logger if isinstance(logger, list) else [logger]:
        class_path = str(item.get("class_path", "")) if hasattr(item, "get") else ""
        if class_path.rsplit(".", 1)[-1] in _FOLDER_LOGGERS:
            init = item.get("init_args")
            if init is None:
                from jsonargparse import Namespace

                init = item.init_args = Namespace()
            # log_dir = save_dir/name/version; an empty name drops that level
            init.save_dir = parent or "."
            init.name = ""
            init.version = leaf


def _check_cache_matches(model: UniFusionModel, datamodule: Any) -> None:
    """A feature cache made with other layers or another model must not be used silently."""
    meta_fn = getattr(datamodule, "cache_metadata", None)
    meta = meta_fn() if callable(meta_fn) else None
    if not meta:
        return
    from unifusion.encoders.cache import check_cache_compatible

    check_cache_compatible(meta, model.encoder)


def _warn_settings_without_effect(model: Any, datamodule: Any) -> None:
    """Settings that parse fine but change nothing deserve a warning before a long run."""
    encoder = getattr(model, "encoder", None)
    size = getattr(datamodule, "reference_size", None)
    if size is None:
        size = getattr(datamodule, "image_size", None)
    message = max_tiles_warning(getattr(encoder, "max_tiles", 1), lambda: encoder.tile_size, size)
    if message:
        log.warning(message)


def max_tiles_warning(max_tiles: int | None, tile_size: Any, image_size: int | None) -> str | None:
    """Why ``max_tiles`` > 1 has no effect for square ``image_size`` images, or None when it has.

    A square image is cut into a 2x2 (or larger) grid only when its area exceeds half of the
    area the tiles cover (InternVL's rule, :func:`unifusion.encoders.tiling.plan_tiles`), i.e.
    when its side is more than about 1.41x the tile size. ``tile_size`` may be a callable
    (the encoder's, which reads the model config).
    """
    if not max_tiles or max_tiles <= 1 or not image_size:
        return None
    from unifusion.encoders.tiling import num_tiles

    try:
        tile = int(tile_size() if callable(tile_size) else tile_size)
    except Exception:  # noqa: BLE001 - no config to read the tile size from: nothing to check
        return None
    if num_tiles(image_size, image_size, max_tiles, tile_size=tile) > 1:
        return None
    fits = [t for t in range(image_size, 0, -1) if num_tiles(image_size, image_size, max_tiles, tile_size=t) > 1]
    hint = f"set the encoder's tile_size to {fits[0]} or less" if fits else "use larger images"
    return (
        f"encoder max_tiles={max_tiles} has no effect: {image_size} px images with {tile} px tiles give one "
        f"thumbnail and no tiles (a square image is tiled when its side exceeds ~1.41x the tile size); {hint}"
    )


def lightning_main(args: list[str], run: bool = True) -> UniFusionCLI:
    """Run (or, with ``run=False``, only build) a LightningCLI command from explicit arguments."""
    return UniFusionCLI(args=args, run=run)


__all__ = ["PHASE", "UniFusionCLI", "lightning_main", "max_tiles_warning"]
