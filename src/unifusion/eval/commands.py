"""One front door for the evaluation suites: ``eval_command(bench, generate_fn, out_dir, **options)``.

It runs a benchmark, writes ``<out_dir>/<bench>.json`` (everything) and ``<out_dir>/<bench>.csv``
(one row per category and metric: ``bench,group,metric,value``) and returns the result dict.
The CLI / TensorBoard wiring lives with the caller.

Benches and their options:

* ``shapes`` — ShapesBench: ``image_size=16, num_per_category=20, seed=0, batch_size=16,
  baseline=False`` (also score the unconditional baseline: empty prompts, no references).
* ``dpg`` — DPG-Bench: ``csv`` (path to ``dpg_bench.csv``, required), ``judge`` (a
  :class:`~unifusion.eval.judge.Judge`) or ``judge_model`` (local VLM dir), ``judge_mode``
  (``"logits"``/``"cot"``), ``images_per_prompt=4, batch_size=4, limit=None``.
* ``vqascore`` — GenAI-Bench-style VQAScore: ``prompts`` (JSON/text path, required),
  ``scorer`` (:class:`VQAScore`) or ``model`` (local VLM dir), ``images_per_prompt=1,
  batch_size=8, limit=None``.
* ``recon`` — reconstruction of shapes-world scenes through ``generate_fn([""]*B, [[img]]*B)``:
  ``image_size=16, num_images=32, seed=0, batch_size=16, lpips_weights=None,
  lpips_net="alex", dreamsim_model=None, ms_ssim_small="upsample"``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["BENCHES", "eval_command", "result_rows"]

BENCHES: tuple[str, ...] = ("shapes", "dpg", "vqascore", "recon")
GenerateFn = Callable[[list[str], "list[list[Tensor]] | None"], Tensor]
_OPTIONS: dict[str, set[str]] = {
    "shapes": {"image_size", "num_per_category", "seed", "batch_size", "baseline", "trained_on_edits"},
    "dpg": {"csv", "limit", "judge", "judge_model", "judge_mode", "images_per_prompt", "batch_size"},
    "vqascore": {"prompts", "limit", "scorer", "model", "images_per_prompt", "batch_size"},
    "recon": {
        "image_size",
        "num_images",
        "seed",
        "batch_size",
        "lpips_weights",
        "lpips_net",
        "dreamsim_model",
        "ms_ssim_small",
    },
}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return _jsonable(obj.tolist()) if obj.numel() < 64 else f"<tensor {tuple(obj.shape)}>"
    if isinstance(obj, np.ndarray):
        return f"<array {obj.shape}>"
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def result_rows(bench: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a result dict to ``{bench, group, metric, value}`` rows (per-category tables)."""
    rows: list[dict[str, Any]] = []

    def add(group: str, metric: str, value: Any) -> None:
        if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            rows.append({"bench": bench, "group": group, "metric": metric, "value": float(value)})

    for key, val in result.items():
        if key in ("items", "answers", "per_item", "per_prompt", "per_image", "images"):
            continue
        if isinstance(val, dict):
            for k2, v2 in val.items():
                if isinstance(v2, dict):  # categories: {cat: {metric: v}}
                    for k3, v3 in v2.items():
                        add(f"{key}/{k2}", k3, v3)
                else:
                    add(key, k2, v2)
        else:
            add("all", key, val)
    return rows


def _shapes(generate_fn: GenerateFn, opts: dict[str, Any]) -> dict[str, Any]:
    from unifusion.eval.shapesbench import ShapesBench, run_shapesbench, unconditional_baseline

    bench = ShapesBench(
        image_size=int(opts.pop("image_size", 16)),
        num_per_category=int(opts.pop("num_per_category", 20)),
        seed=int(opts.pop("seed", 0)),
    )
    batch_size = int(opts.pop("batch_size", 16))
    baseline = bool(opts.pop("baseline", False))
    trained_on_edits = opts.pop("trained_on_edits", None)
    result = run_shapesbench(generate_fn, bench, batch_size=batch_size, trained_on_edits=trained_on_edits)
    result["trained_on_edits"] = trained_on_edits
    for it, row in zip(bench.prompts, result.get("items", [])):
        row["prompt"] = it.prompt
    if baseline:
        base = unconditional_baseline(generate_fn, bench, batch_size=batch_size, trained_on_edits=trained_on_edits)
        base.pop("items", None)
        result["baseline"] = {"overall": base["overall"], **{c: v["accuracy"] for c, v in base["categories"].items()}}
    return result


def _dpg(generate_fn: GenerateFn, opts: dict[str, Any]) -> dict[str, Any]:
    from unifusion.eval.dpg import load_dpg_bench, run_dpg
    from unifusion.eval.judge import HFYesNoJudge

    path = opts.pop("csv", None)
    if path is None:
        raise ValueError("eval dpg: pass csv=/path/to/dpg_bench.csv (DPG-Bench's question file)")
    items = load_dpg_bench(path)
    limit = opts.pop("limit", None)
    if limit is not None:
        items = items[: int(limit)]
    judge = opts.pop("judge", None)
    if judge is None:
        model = opts.pop("judge_model", None)
        if model is None:
            raise ValueError("eval dpg: pass judge=<Judge> or judge_model=/path/to/local/vlm")
        judge = HFYesNoJudge(model, mode=opts.pop("judge_mode", "logits"))
    return run_dpg(
        generate_fn,
        items,
        judge,
        images_per_prompt=int(opts.pop("images_per_prompt", 4)),
        batch_size=int(opts.pop("batch_size", 4)),
    )


def _vqascore(generate_fn: GenerateFn, opts: dict[str, Any]) -> dict[str, Any]:
    from unifusion.eval.vqascore import VQAScore, load_genai_bench_prompts, run_vqascore

    path = opts.pop("prompts", None)
    if path is None:
        raise ValueError("eval vqascore: pass prompts=/path/to/genai_bench.json (or a text file, one prompt a line)")
    prompts = load_genai_bench_prompts(path)
    limit = opts.pop("limit", None)
    if limit is not None:
        prompts = dict(list(prompts.items())[: int(limit)])
    scorer = opts.pop("scorer", None)
    if scorer is None:
        model = opts.pop("model", None)
        if model is None:
            raise ValueError("eval vqascore: pass scorer=<VQAScore> or model=/path/to/local/vlm")
        scorer = VQAScore(model)
    return run_vqascore(
        generate_fn,
        prompts,
        scorer,
        batch_size=int(opts.pop("batch_size", 8)),
        images_per_prompt=int(opts.pop("images_per_prompt", 1)),
    )


def _recon(generate_fn: GenerateFn, opts: dict[str, Any]) -> dict[str, Any]:
    from unifusion.data import shapes as sw
    from unifusion.eval.recon import LPIPS, FeatureDistance, reconstruction_metrics

    # load the learned metrics first: a wrong weights path fails before any image is generated
    lpips_weights = opts.pop("lpips_weights", None)
    if lpips_weights is not None and not isinstance(lpips_weights, LPIPS):
        lpips_weights = LPIPS.from_checkpoint(lpips_weights, net=opts.pop("lpips_net", "alex"))
    opts.pop("lpips_net", None)
    dreamsim = opts.pop("dreamsim_model", None)
    if dreamsim is not None and not isinstance(dreamsim, FeatureDistance):
        dreamsim = FeatureDistance(dreamsim)
    size = int(opts.pop("image_size", 16))
    n = int(opts.pop("num_images", 32))
    rng = random.Random(f"recon-{int(opts.pop('seed', 0))}")
    batch_size = int(opts.pop("batch_size", 16))
    target = torch.stack(
        [torch.from_numpy(sw.render(sw.random_scene(rng, 1, 4), size)).permute(2, 0, 1).float() / 255 for _ in range(n)]
    )
    preds = []
    for i in range(0, n, batch_size):
        chunk = target[i : i + batch_size]
        with torch.no_grad():
            out = generate_fn([""] * len(chunk), [[im] for im in chunk])
        preds.append(out.detach().float().cpu().clamp(0, 1))
    pred = torch.cat(preds)
    if pred.shape[-2:] != target.shape[-2:]:
        pred = torch.nn.functional.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    metrics = reconstruction_metrics(
        pred,
        target,
        lpips_weights=lpips_weights,
        dreamsim_model=dreamsim,
        ms_ssim_small=opts.pop("ms_ssim_small", "upsample"),
    )
    return {**metrics, "num_images": n, "image_size": size}


def eval_command(bench: str, generate_fn: GenerateFn, out_dir: str, **options: Any) -> dict[str, Any]:
    """Run ``bench`` (one of :data:`BENCHES`) with ``generate_fn``; write JSON + CSV to ``out_dir``.

    ``generate_fn(prompts: list[str], images: list[list[Tensor]] | None) -> (B, 3, H, W)`` in [0, 1].
    Unknown options raise ``TypeError`` naming them.
    """
    name = {"shapesbench": "shapes", "genai": "vqascore", "genai_bench": "vqascore", "dpg_bench": "dpg"}.get(
        bench, bench
    )
    runners = {"shapes": _shapes, "dpg": _dpg, "vqascore": _vqascore, "recon": _recon}
    if name not in runners:
        raise ValueError(f"eval: unknown bench {bench!r}; choose one of {', '.join(BENCHES)}")
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        raise TypeError(f"eval {name}: unknown option(s) {unknown}; valid: {sorted(_OPTIONS[name])}")
    result = runners[name](generate_fn, dict(options))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(_jsonable(result), f, indent=1)
    rows = result_rows(name, result)
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["bench", "group", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    return result
