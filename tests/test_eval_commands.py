"""eval_command front door (JSON + CSV) and the ShapesBench Lightning callback."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import Tensor

from unifusion.data import shapes as sw
from unifusion.eval import ShapesBench, ShapesBenchCallback, eval_command


def _oracle_for(bench: ShapesBench):
    table = {(p.prompt, p.ref_images[0].tobytes() if p.ref_images else b""): p.target for p in bench.prompts}

    def generate(prompts: list[str], images: list[list[Tensor]] | None) -> Tensor:
        out = []
        for i, prompt in enumerate(prompts):
            key = b""
            if images is not None:
                key = (images[i][0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy().tobytes()
            scene = table.get((prompt, key), sw.Scene([]))
            out.append(torch.from_numpy(sw.render(scene, 16)).permute(2, 0, 1).float() / 255)
        return torch.stack(out)

    return generate


def test_eval_command_shapes_writes_json_and_csv(tmp_path: Path) -> None:
    opts: dict[str, Any] = {"num_per_category": 4, "seed": 3, "image_size": 16}
    gen = _oracle_for(ShapesBench(**opts))
    result = eval_command("shapes", gen, str(tmp_path), batch_size=8, baseline=True, **opts)
    assert result["overall"] >= 0.95
    assert result["baseline"]["overall"] == 0.0
    saved = json.loads((tmp_path / "shapes.json").read_text())
    assert saved["overall"] == pytest.approx(result["overall"])
    assert len(saved["items"]) == len(ShapesBench(**opts)) and "prompt" in saved["items"][0]
    with open(tmp_path / "shapes.csv") as f:
        rows = list(csv.DictReader(f))
    acc = {r["group"]: float(r["value"]) for r in rows if r["metric"] == "accuracy"}
    assert set(acc) == {f"categories/{c}" for c in result["categories"]}
    assert any(r["group"] == "all" and r["metric"] == "overall" for r in rows)


def test_eval_command_recon_and_errors(tmp_path: Path) -> None:
    def reconstruct(prompts: list[str], images: list[list[Tensor]] | None) -> Tensor:
        assert images is not None and all(p == "" for p in prompts)
        return torch.stack([refs[0] for refs in images]) * 0.9

    r = eval_command("recon", reconstruct, str(tmp_path), num_images=6, batch_size=4, ms_ssim_small="skip")
    assert 10 < r["psnr"] < 60 and 0 < r["ssim"] < 1
    assert (tmp_path / "recon.json").is_file() and (tmp_path / "recon.csv").is_file()
    with pytest.raises(TypeError, match="unknown option"):
        eval_command("shapes", reconstruct, str(tmp_path), num_per_catgory=3)
    with pytest.raises(ValueError, match="unknown bench"):
        eval_command("geneval", reconstruct, str(tmp_path))
    with pytest.raises(ValueError, match="csv="):
        eval_command("dpg", reconstruct, str(tmp_path))


class _Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "rec"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.calls: list[dict[str, Any]] = []

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)

    def generate(self, prompts, images=None, steps=10, guidance=1.0, seed=0) -> Tensor:  # noqa: ANN001
        self.calls.append(
            {
                "n": len(prompts),
                "images": images is not None,
                "training": self.training,
                "num_steps": steps,
                "guidance": guidance,
                "seed": seed,
            }
        )
        return torch.zeros(len(prompts), 3, 16, 16)


def test_shapesbench_callback_logs_during_fit(tmp_path: Path) -> None:
    module, logger = _Module(), _Recorder()
    cb = ShapesBenchCallback(every_n_steps=2, num_per_category=2, num_steps=3, guidance=2.5, seed=7, batch_size=4)
    trainer = pl.Trainer(
        max_steps=4,
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    trainer.fit(module)
    logged = [(step, m) for step, m in logger.metrics if "shapesbench/overall" in m]
    assert [step for step, _ in logged] == [2, 4]
    assert set(logged[0][1]) >= {"shapesbench/overall", "shapesbench/counting", "shapesbench/editing"}
    assert logged[0][1]["shapesbench/overall"] == 0.0  # blank images satisfy nothing
    assert all(c["num_steps"] == 3 and c["guidance"] == 2.5 and c["seed"] == 7 for c in module.calls)
    assert not any(c["training"] for c in module.calls) and module.training
    assert sum(c["n"] for c in module.calls) == 2 * len(cb.bench) and any(c["images"] for c in module.calls)
    assert float(trainer.callback_metrics["shapesbench/overall"]) == 0.0
    assert cb.last_result is not None and set(cb.last_result["categories"]) == set(cb.bench.categories)
