"""Batch prediction through Lightning: ``unifusion predict`` with a prompt file.

    unifusion predict -c experiments/quickstart.yaml --ckpt_path CKPT \\
        --data=unifusion.inference.PromptDataModule --data.prompts_file=prompts.txt \\
        --trainer.callbacks+=unifusion.inference.ImageWriter --trainer.callbacks.out_dir=predictions

Kept apart from :mod:`unifusion.inference` (which re-exports these names) so that ``generate``,
``edit`` and ``eval`` do not import Lightning, which takes longer than the rest of their start-up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from unifusion.images import save_png
from unifusion.inference import _slug, read_prompts


class PromptDataset(Dataset):
    def __init__(self, prompts: Sequence[str], seed: int = 0) -> None:
        self.prompts = list(prompts)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompt": self.prompts[i], "key": f"{i:06d}", "seed": self.seed + i}


def _collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "task": "t2i",
        "prompt": [it["prompt"] for it in items],
        "key": [it["key"] for it in items],
        "seed": torch.tensor([it["seed"] for it in items]),
    }


class PromptDataModule(pl.LightningDataModule):
    """Prompts for ``unifusion predict`` (large prompt files, batched, any number of devices).

    Prompt ``i`` is sampled with seed ``seed + i`` whatever the batch size, as in
    ``unifusion generate`` (batched samples can differ from single ones by float rounding only).
    """

    def __init__(self, prompts_file: str, batch_size: int = 8, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.prompts_file = prompts_file
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        ds = PromptDataset(read_prompts(self.prompts_file), self.seed)
        return DataLoader(ds, batch_size=self.batch_size, collate_fn=_collate_prompts, num_workers=self.num_workers)


class ImageWriter(BasePredictionWriter):
    """Writes predicted images as PNGs with JSON sidecars under ``out_dir``."""

    def __init__(self, out_dir: str = "predictions", upscale: int = 1) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self.upscale = upscale

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        texts = prediction.get("texts") or [None] * len(prediction["prompt"])
        for j, (img, prompt) in enumerate(zip(prediction["images"], prediction["prompt"])):
            key = prediction["key"][j] if prediction.get("key") else f"{batch_idx:05d}_{j:03d}"
            path = os.path.join(self.out_dir, f"{key}_{_slug(prompt)}.png")
            save_png(img, path, self.upscale)
            with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "prompt": prompt,
                        "seed": prediction["seed"][j] if isinstance(prediction["seed"], list) else prediction["seed"],
                        "rewrite": texts[j] if j < len(texts) else None,
                        "upscale": self.upscale,
                        **prediction.get("options", {}),
                    },
                    f,
                    indent=2,
                )
