"""Inference plumbing: prompt files, PNG + JSON sidecars, batch prediction through Lightning."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from unifusion.errors import UserError
from unifusion.images import save_png


def read_prompts(path: str) -> list[str]:
    """One prompt per line (``.txt``), a JSON list of strings/objects, or a GenAI-Bench-style
    JSON dict ``{id: {"prompt": ...}}``; ``.jsonl`` lines with a ``prompt`` field."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    if path.endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            data = [data[k] for k in sorted(data, key=lambda k: (len(str(k)), str(k)))]
        out = []
        for item in data:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and "prompt" in item:
                out.append(item["prompt"])
            else:
                raise ValueError(
                    f"{path}: each entry must be a string or an object with a 'prompt' field, got {item!r}"
                )
        return out
    return [line.strip() for line in text.splitlines() if line.strip()]


def _slug(text: str, limit: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    while "__" in keep:
        keep = keep.replace("__", "_")
    return keep[:limit] or "sample"


def _encode_kwargs(verifi: bool | None, system_prompt: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if verifi is not None:
        kw["verifi"] = verifi
    if system_prompt is not None:
        kw["system_prompt"] = system_prompt
    return kw


def generate_to_files(
    pipeline,
    prompts: Sequence[str],
    out: str,
    *,
    images: Sequence[Sequence[torch.Tensor]] | None = None,
    seed: int = 0,
    num_steps: int | None = None,
    guidance: float | None = None,
    image_guidance: float | None = None,
    sampler: str | None = None,
    shift: float | None = None,
    spacing: str | None = None,
    size: int | None = None,
    verifi: bool | None = None,
    system_prompt: str | None = None,
    upscale: int = 1,
    source: str | None = None,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Generate with a :class:`~unifusion.pipeline.UniFusionPipeline` and write
    ``<out>/<index>_<slug>.png`` (or ``out`` itself for one prompt) + a ``.json`` sidecar of
    every setting that made it.

    Sample ``i`` uses seed ``seed + i`` so results do not depend on the batch size.
    """
    single_file = out.lower().endswith(".png")
    if single_file and len(prompts) != 1:
        raise UserError(f"--out {out!r} is a single PNG but {len(prompts)} prompts were given; pass a directory")
    written: list[str] = []
    enc_kw = _encode_kwargs(verifi, system_prompt)
    encoder = pipeline.encoder
    used_verifi = bool(getattr(encoder, "verifi", False)) if verifi is None else verifi
    used_system_prompt = system_prompt
    if used_system_prompt is None:
        used_system_prompt = getattr(encoder, "system_prompt", None)
        if used_system_prompt is None and used_verifi:
            from unifusion.encoders.hf import DEFAULT_VERIFI_PROMPT

            used_system_prompt = DEFAULT_VERIFI_PROMPT
    for i, prompt in enumerate(prompts):
        imgs = [list(images[i])] if images is not None else None
        result = pipeline.generate(
            [prompt],
            imgs,
            steps=num_steps,
            guidance=guidance,
            image_guidance=image_guidance,
            sampler=sampler,
            shift=shift,
            spacing=spacing,
            seed=seed + i,
            size=size,
            encode_kwargs=enc_kw,
            output_type="pt",
        )
        image = result.images[0]
        path = out if single_file else os.path.join(out, f"{i:04d}_{_slug(prompt)}.png")
        save_png(image, path, upscale)
        settings = asdict(result.settings)
        settings.pop("seed", None)
        sidecar = {
            "prompt": prompt,
            "seed": seed + i,
            **settings,
            "size": int(image.shape[-1]),
            "upscale": int(upscale),
            "weights": pipeline.provenance.get("weights", "raw"),
            "verifi": used_verifi,
            "system_prompt": used_system_prompt,
            "rewrite": (result.texts or [None])[0],
            "source": source,
            **(extra or {}),
        }
        with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2)
        written.append(path)
    return written


#: Lightning-based prediction classes, imported on first use (Lightning is slow to import and
#: ``generate`` / ``edit`` / ``eval`` do not need it); they live in :mod:`unifusion.prediction`
_PREDICTION = ("PromptDataset", "PromptDataModule", "ImageWriter")


def __getattr__(name: str) -> Any:
    if name in _PREDICTION:
        from unifusion import prediction

        return getattr(prediction, name)
    raise AttributeError(f"module 'unifusion.inference' has no attribute {name!r}")


def run_eval(
    pipeline,
    bench: str,
    out: str,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    max_tiles: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run one benchmark on a pipeline; JSON/CSV under ``out`` plus TensorBoard scalars there.

    ``steps``, ``guidance``, ``seed`` and ``max_tiles`` say how images are generated; ``options``
    are the benchmark's own (see :mod:`unifusion.eval.commands`; unknown ones raise
    ``TypeError``). ShapesBench and reconstruction default ``image_size`` to the pipeline's
    and ``seed`` to the generation seed. ``unifusion eval shapes|recon|dpg|vqascore`` call this.
    """
    from torch.utils.tensorboard import SummaryWriter

    from unifusion.eval.commands import eval_command, result_rows

    enc_kw = {"max_tiles": max_tiles} if max_tiles else None

    def generate_fn(prompts: list[str], images: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        result = pipeline.generate(
            prompts, images, steps=steps, guidance=guidance, seed=seed, encode_kwargs=enc_kw, output_type="pt"
        )
        return result.images

    if bench in ("shapes", "recon"):
        options.setdefault("image_size", pipeline.image_size)
        options.setdefault("seed", seed)
    if bench == "shapes":
        # known for models exported by `unifusion fit` / checkpoints beside their run's config.yaml
        options.setdefault("trained_on_edits", (getattr(pipeline, "provenance", None) or {}).get("trained_on_edits"))
    result = eval_command(bench, generate_fn, out, **options)
    writer = SummaryWriter(out)
    try:
        for row in result_rows(bench, result):
            writer.add_scalar(f"eval/{bench}/{row['group']}/{row['metric']}", row["value"], global_step=0)
    finally:
        writer.close()
    return result
