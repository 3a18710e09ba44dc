"""The ``unifusion`` command.

``fit | validate | test | predict`` are LightningCLI subcommands (``-c`` stacks YAML files,
``--print_config`` shows the merged result; see :mod:`unifusion.lightning_cli`). The other
subcommands are plain tools: ``generate``, ``edit``, ``data``, ``cache``, ``eval``,
``profile``, ``analyze``, ``export``.

Every command exits 0 after succeeding and prints a short summary (where files went, the
headline numbers). A problem the user can fix (a missing or corrupt file, a bad option or
config) ends with one line ``error: ...`` on stderr and exit status 1, no traceback; set
``UNIFUSION_DEBUG=1`` to see the traceback anyway. Option errors found by the argument
parser exit 2 with its usage message.

``-c/--config`` means the same for every command that takes an experiment config (``fit`` and
the other Lightning commands, ``cache``, ``profile``, ``study``): a YAML file of the training
config, repeatable, later files overriding earlier ones; ``--trainer.*``, ``--model.*`` and
``--data.*`` overrides work there as for ``fit``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

from unifusion.allocator import retain_freed_memory
from unifusion.errors import CheckpointError, UserError, first_line

# Lightning is imported only by the commands that need it: `unifusion --help`, `data` and the
# error paths of the tools start in a few seconds instead of ~15

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "generate": "sample images from a model for prompts",
    "edit": "edit one or several reference images with an instruction",
    "data": "write shapes shards (`data shapes`) or convert your data (`data convert`)",
    "cache": "run the encoder over a dataset once and write a feature cache (-c CONFIG)",
    "eval": "evaluate a model: eval shapes | recon | dpg | vqascore",
    "profile": "profile a few training steps with torch.profiler (-c CONFIG; TensorBoard trace)",
    "analyze": "paper analyses: layer-weights | layer-similarity | layer-dropout | all",
    "export": "convert a training checkpoint into a pipeline folder (safetensors + JSON)",
    "study": "train and compare conditioner arms x seeds on an equal budget (-c STUDY.yaml)",
}
#: where each tool's function lives ("module:function"), imported only when the tool runs
TOOL_FUNCTIONS = {
    "generate": "unifusion.cli:generate_command",
    "edit": "unifusion.cli:edit_command",
    "cache": "unifusion.cli:cache_command",
    "profile": "unifusion.cli:profile_command",
    "analyze": "unifusion.cli:analyze_command",
    "export": "unifusion.cli:export_command",
    "study": "unifusion.study:study_command",
}
#: tools whose ``-c/--config`` is an experiment config as for ``fit``; their function takes the
#: LightningCLI arguments (``-c FILE`` ... and ``--model.x=...`` overrides) as ``config: list[str]``
EXPERIMENT_COMMANDS = ("cache", "profile", "study")
#: argument prefixes handed on to LightningCLI by the experiment commands
_EXPERIMENT_PREFIXES = ("--trainer.", "--model.", "--data.", "--trainer=", "--model=", "--data=", "--seed_everything")

#: exceptions that are the user's to fix: reported in one line, no traceback
_USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    FloatingPointError,
)


def __getattr__(name: str) -> Any:
    # the LightningCLI pieces live in unifusion.lightning_cli (Lightning is slow to import)
    if name == "UniFusionCLI":
        from unifusion import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module 'unifusion.cli' has no attribute {name!r}")


def lightning_main(args: list[str], run: bool = True) -> Any:
    """Run (or, with ``run=False``, only build) ``UniFusionCLI`` from explicit arguments."""
    from unifusion.lightning_cli import lightning_main as _main

    return _main(args, run=run)


# ---------------------------------------------------------------------- tool commands
def load_pipeline(model: str | None = None, ckpt: str | None = None, device: str | None = None):
    """The pipeline a tool command works on: ``--model DIR`` (exported) or ``--ckpt FILE`` (training
    checkpoint, EMA weights). Neither is unpickled (see :mod:`unifusion.checkpoints`)."""
    from unifusion.pipeline import load_pipeline as _load

    return _load(model=model, ckpt=ckpt, device=device)


def export_command(
    ckpt: str, out: str, raw_weights: bool = False, include_encoder: bool = False, shapesbench: str | None = None
) -> str:
    """Convert a training checkpoint into a pipeline folder (safetensors + JSON, no pickle) that
    ``UniFusionPipeline.from_pretrained(OUT)`` and ``--model OUT`` load.

    Args:
        ckpt: checkpoint written by ``unifusion fit`` (e.g. ``runs/quickstart/checkpoints/last.ckpt``).
        out: output folder.
        raw_weights: store the raw training weights instead of the EMA weights.
        include_encoder: also save the frozen VLM (its own ``save_pretrained``) into ``OUT/encoder``,
            so the folder is self-contained; default: a reference (path) to it.
        shapesbench: a ShapesBench result JSON for the model card (default: the newest one found
            under the checkpoint's run folder, if any).
    """
    from unifusion.pipeline import export_checkpoint

    return export_checkpoint(
        ckpt, out, use_ema=not raw_weights, include_encoder=include_encoder, eval_results=shapesbench
    )


def generate_command(
    model: str | None = None,
    ckpt: str | None = None,
    prompt: list[str] | None = None,
    prompts_file: str | None = None,
    out: str = "samples",
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: Literal["euler", "heun"] | None = None,
    shift: float | None = None,
    spacing: Literal["flux", "diffusers"] | None = None,
    size: int | None = None,
    verifi: bool | None = None,
    system_prompt: str | None = None,
    upscale: int = 1,
) -> list[str]:
    """Generate one PNG per prompt, each with a JSON sidecar of every setting.

    Args:
        model: an exported pipeline folder (``unifusion export``, or the ``pipeline/`` folder a run writes).
        ckpt: a checkpoint written by ``unifusion fit`` (EMA weights are used when the run kept them).
        spacing: timestep spacing: ``flux`` (even, Flux/Krea-2) or ``diffusers`` (diffusers'
            ``FlowMatchEulerDiscreteScheduler.set_timesteps``, equal step for step); default: the model's.
        prompt: one or more prompts.
        prompts_file: a text file with one prompt per line (or a JSON list / GenAI-Bench dict).
        out: a ``.png`` path (single prompt) or a directory.
        seed: the first sample's seed; sample i uses ``seed + i``.
        verifi: turn the encoder's VERIFI rewriting on/off (default: as trained).
        system_prompt: override the VERIFI system prompt at inference.
    """
    from unifusion.inference import generate_to_files, read_prompts

    prompts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompts_file FILE")
    pipeline = load_pipeline(model=model, ckpt=ckpt)
    return generate_to_files(
        pipeline,
        prompts,
        out,
        seed=seed,
        num_steps=steps,
        guidance=guidance,
        sampler=sampler,
        shift=shift,
        spacing=spacing,
        size=size,
        verifi=verifi,
        system_prompt=system_prompt,
        upscale=upscale,
        source=model or ckpt,
    )


def edit_command(
    image: list[str],
    instruction: str,
    model: str | None = None,
    ckpt: str | None = None,
    out: str = "edit.png",
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    image_guidance: float | None = None,
    sampler: Literal["euler", "heun"] | None = None,
    verifi: bool | None = None,
    system_prompt: str | None = None,
    upscale: int = 1,
) -> list[str]:
    """Edit reference image(s) with an instruction; writes a PNG and a JSON sidecar.

    Args:
        model: an exported pipeline folder; or ``ckpt``: a training checkpoint.
        image: one or several reference image paths (repeat ``--image``).
        instruction: the edit instruction ("make the circle blue").
        image_guidance: image guidance scale (three-way CFG); text scale is ``guidance``.
    """
    from unifusion.images import load_image
    from unifusion.inference import generate_to_files

    refs = [load_image(p) for p in image]
    pipeline = load_pipeline(model=model, ckpt=ckpt)
    return generate_to_files(
        pipeline,
        [instruction],
        out,
        images=[refs],
        seed=seed,
        num_steps=steps,
        guidance=guidance,
        image_guidance=image_guidance,
        sampler=sampler,
        verifi=verifi,
        system_prompt=system_prompt,
        upscale=upscale,
        source=model or ckpt,
        extra={"images": list(image)},
    )


def cache_command(
    config: list[str],
    out: str,
    dtype: Literal["float16", "bfloat16", "float32"] = "float16",
    batch_size: int = 16,
    split: Literal["train", "val"] = "train",
) -> dict[str, Any]:
    """Run the encoder over the config's data once and write its tapped features as shards.

    Train from the result with ``sources: [{path: OUT, task: t2i, cached: true}]``.

    Args:
        config: the experiment (``-c CONFIG``, repeatable, plus ``--model.*``/``--data.*``
            overrides, as for ``fit``); its encoder and data sources are used.
        out: output directory for the cache shards and ``cache_meta.json`` (one sub-folder
            per source when the config has several).
        dtype: storage dtype of the features.
        batch_size: samples per encoder forward.
        split: ``train`` (``data.sources``) or ``val`` (``data.val_sources``).
    """
    experiment = _require_experiment(config, "cache")
    from unifusion.encoders.cache import write_feature_cache

    cli = lightning_main(experiment, run=False)
    dm = cli.datamodule
    sources = getattr(dm, "sources", None) if split == "train" else getattr(dm, "val_sources", None)
    if not sources:
        raise UserError(f"the config's data has no {split} sources to cache (data.{_SPLIT_KEYS[split]})")
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    results = {}
    for i, src in enumerate(sources):
        target = out if len(sources) == 1 else os.path.join(out, f"source{i}_{src.task}")
        results[f"{src.path} ({src.task})"] = write_feature_cache(
            cli.model.encoder,
            src.path,
            target,
            dtype=dtype,
            batch_size=batch_size,
            task=src.task,
            reference_size=dm.image_size if dm.reference_size is None else (dm.reference_size or None),
        )
    return results


_SPLIT_KEYS = {"train": "sources", "val": "val_sources"}


def profile_command(
    config: list[str],
    steps: int = 5,
    out: str = "runs/profile",
    impl: Literal["torch", "triton", "auto"] | None = None,
) -> str:
    """Profile a few training steps of an experiment; open with ``tensorboard --logdir OUT``.

    Args:
        config: the experiment (``-c CONFIG``, repeatable, plus ``--model.*``/``--data.*``/
            ``--trainer.*`` overrides, as for ``fit``).
        steps: profiled steps (after one wait and one warm-up step).
        out: trace directory (``*.pt.trace.json``; the short run's own logs go to ``OUT/lightning``).
        impl: kernel implementation to profile; default: the config's ``model.kernel_impl``.
    """
    experiment = _require_experiment(config, "profile")
    from unifusion.profiling import profile_training

    return profile_training(experiment, steps=steps, out_dir=out, impl=impl)


def analyze_command(
    analysis: Literal["layer-weights", "layer-similarity", "layer-dropout", "all"],
    model: str | None = None,
    ckpt: str | None = None,
    out: str = "analysis",
    prompts: list[str] | None = None,
    drop: list[list[int]] | None = None,
    seed: int = 0,
) -> list[str]:
    """The paper's layer analyses, written as PNG + CSV (and TensorBoard images under ``out``).

    Args:
        analysis: ``layer-weights`` (LAP pooling weight per VLM layer; Fig. 8/11),
            ``layer-similarity`` (adjacent-layer cosine similarity of the VLM's hidden
            states; Fig. 10), ``layer-dropout`` (zero chosen layers' pooling weights and
            sample; Fig. 12) or ``all`` (the three).
        model: an exported pipeline folder; or ``ckpt``: a training checkpoint.
        prompts: prompts for the similarity and dropout analyses (default: a few shapes prompts).
        drop: for layer-dropout, groups of absolute layer ids to drop, e.g. ``[[0],[2,3]]``
            (default: the first, middle and last third of the tapped layers).
    """
    from unifusion.analysis import run_analysis

    pipeline = load_pipeline(model=model, ckpt=ckpt)
    return run_analysis(pipeline, analysis, out, prompts=prompts, drop=drop, seed=seed)


# ---------------------------------------------------------------------- eval subcommands
def _eval_run(
    bench: str,
    model: str | None,
    ckpt: str | None,
    out: str,
    generation: dict[str, Any],
    options: dict[str, Any],
) -> dict[str, Any]:
    from unifusion.inference import run_eval

    pipeline = load_pipeline(model=model, ckpt=ckpt)
    return run_eval(pipeline, bench, out, **generation, **options)


def _must_exist(path: str | None, what: str) -> None:
    """Fail before the model loads (seconds) rather than after (minutes)."""
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")


def eval_shapes(
    model: str | None = None,
    ckpt: str | None = None,
    out: str = "eval",
    num_per_category: int = 20,
    baseline: bool = True,
    batch_size: int = 16,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """ShapesBench: generate each prompt and score it with the exact shapes-world checker.

    Writes ``OUT/shapes.json`` (everything), ``OUT/shapes.csv`` (one row per category and
    metric) and TensorBoard scalars under ``OUT``.

    Args:
        model: an exported pipeline folder; or ``ckpt``: a training checkpoint.
        num_per_category: prompts per category (counting, colours, positions, ...).
        baseline: also score the unconditional baseline (empty prompts): the floor to beat.
        steps: sampler steps (default: the model's).
        guidance: guidance scale (default: the model's).
        seed: seeds the prompt set and the initial noise.
    """
    result = _eval_run(
        "shapes",
        model,
        ckpt,
        out,
        {"steps": steps, "guidance": guidance, "seed": seed},
        {"num_per_category": num_per_category, "baseline": baseline, "batch_size": batch_size},
    )
    return result


def eval_recon(
    model: str | None = None,
    ckpt: str | None = None,
    out: str = "eval",
    num_images: int = 32,
    max_tiles: int | None = None,
    lpips_weights: str | None = None,
    lpips_net: Literal["alex", "vgg"] = "alex",
    dreamsim_model: str | None = None,
    ms_ssim_small: Literal["upsample", "skip", "error"] = "upsample",
    batch_size: int = 16,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Reconstruction (image -> VLM -> image): PSNR, SSIM, MS-SSIM, and LPIPS / DreamSim-like
    distances when their local weights are given (nothing is downloaded).

    Args:
        model: an exported pipeline folder; or ``ckpt``: a training checkpoint.
        num_images: shapes-world scenes to reconstruct.
        max_tiles: tiles per image given to the VLM (the paper's 1/5/10 study); default: the model's.
        lpips_weights: a local LPIPS checkpoint: a torchvision AlexNet/VGG16 state dict
            (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``) or a full LPIPS state dict.
        lpips_net: the LPIPS backbone the weights are for.
        dreamsim_model: a local Hugging Face vision model folder (CLIP, SigLIP, DINOv2, ...)
            for the DreamSim-like feature distance.
        ms_ssim_small: images below 176 px: ``upsample`` (default, reported as such), ``skip``, ``error``.
    """
    _must_exist(lpips_weights, "--lpips_weights")
    _must_exist(dreamsim_model, "--dreamsim_model")
    options: dict[str, Any] = {
        "num_images": num_images,
        "batch_size": batch_size,
        "ms_ssim_small": ms_ssim_small,
        "lpips_net": lpips_net,
    }
    if lpips_weights:
        options["lpips_weights"] = lpips_weights
    if dreamsim_model:
        options["dreamsim_model"] = dreamsim_model
    return _eval_run(
        "recon",
        model,
        ckpt,
        out,
        {"steps": steps, "guidance": guidance, "seed": seed, "max_tiles": max_tiles},
        options,
    )


def eval_dpg(
    prompts_file: str,
    judge: str,
    model: str | None = None,
    ckpt: str | None = None,
    out: str = "eval",
    judge_mode: Literal["logits", "cot"] = "logits",
    images_per_prompt: int = 4,
    limit: int | None = None,
    batch_size: int = 4,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """DPG-Bench with the paper's corrected aggregation (App. C) and a local VLM judge.

    Args:
        prompts_file: DPG-Bench's question file (``dpg_bench.csv``).
        judge: a local Hugging Face VLM folder that answers the yes/no questions.
        model: an exported pipeline folder; or ``ckpt``: a training checkpoint.
        judge_mode: ``logits`` (P(yes) from one forward) or ``cot`` (generate, then parse).
        limit: only the first N prompts.
    """
    _must_exist(prompts_file, "--prompts_file")
    _must_exist(judge, "--judge")
    options = {
        "csv": prompts_file,
        "judge_model": judge,
        "judge_mode": judge_mode,
        "images_per_prompt": images_per_prompt,
        "limit": limit,
        "batch_size": batch_size,
    }
    return _eval_run("dpg", model, ckpt, out, {"steps": steps, "guidance": guidance, "seed": seed}, options)


def eval_vqascore(
    prompts_file: str,
    judge: str,
    model: str | None = None,
    ckpt: str | None = None,
    out: str = "eval",
    images_per_prompt: int = 1,
    limit: int | None = None,
    batch_size: int = 8,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """GenAI-Bench-style VQAScore: P("Yes") of a local VLM that sees the image and the prompt.

    Args:
        prompts_file: GenAI-Bench's JSON (``{id: {"prompt": ...}}``), a JSON list or a text file.
        judge: a local Hugging Face VLM folder used as the scorer.
        model: an exported pipeline folder; or ``ckpt``: a training checkpoint.
        limit: only the first N prompts.
    """
    _must_exist(prompts_file, "--prompts_file")
    _must_exist(judge, "--judge")
    options = {
        "prompts": prompts_file,
        "model": judge,
        "images_per_prompt": images_per_prompt,
        "limit": limit,
        "batch_size": batch_size,
    }
    return _eval_run("vqascore", model, ckpt, out, {"steps": steps, "guidance": guidance, "seed": seed}, options)


EVAL_COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "shapes": eval_shapes,
    "recon": eval_recon,
    "dpg": eval_dpg,
    "vqascore": eval_vqascore,
}


# ---------------------------------------------------------------------- summaries
def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _paths_summary(what: str, paths: list[str], sidecars: bool = True) -> str:
    if not paths:
        return f"{what}: nothing written"
    where = paths[0] if len(paths) == 1 else f"{len(paths)} files under {os.path.dirname(paths[0]) or '.'}"
    extra = f" (+ JSON sidecar{'s' if len(paths) > 1 else ''})" if sidecars else ""
    return f"{what}: wrote {where}{extra}"


def _eval_summary(bench: str, out: str, result: dict[str, Any]) -> str:
    files = ", ".join(os.path.join(out, f"{bench}.{ext}") for ext in ("json", "csv"))
    if bench == "shapes" and isinstance(result.get("categories"), dict):
        cats = ", ".join(f"{c} {_short(v['accuracy'])}" for c, v in result["categories"].items())
        if result.get("overall_note"):
            note = f" ({result['overall_note']})"
        elif result.get("trained_on_edits") is None and "editing" in result["categories"]:
            note = " (editing included: the model does not record whether it trained on edits)"
        else:
            note = ""
        base = result.get("baseline") or {}
        floor = f"; unconditional baseline {_short(base['overall'])}" if "overall" in base else ""
        return (
            f"eval shapes: overall {_short(result['overall'])} [95% CI {_short(result['overall_ci_low'])}, "
            f"{_short(result['overall_ci_high'])}]{note}; {cats}{floor}; wrote {files} (TensorBoard: {out})"
        )
    headline = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    base = result.get("baseline")
    if isinstance(base, dict) and isinstance(base.get("overall"), (int, float)):
        headline["baseline_overall"] = base["overall"]
    numbers = ", ".join(f"{k}={_short(v)}" for k, v in list(headline.items())[:8]) or "no scalar results"
    return f"eval {bench}: {numbers}; wrote {files} (TensorBoard: {out})"


def _summary(command: str, sub: str | None, result: Any, argv: list[str]) -> str | None:
    """The line a successful tool command prints."""
    if command in ("generate", "edit"):
        return _paths_summary(command, list(result or []))
    if command == "export":
        return (
            f"export: wrote pipeline folder {result} (load with --model {result} or UniFusionPipeline.from_pretrained)"
        )
    if command == "analyze":
        return _paths_summary("analyze", list(result or []), sidecars=False)
    if command == "profile":
        return f"profile: trace written to {result}; view with: tensorboard --logdir {result}"
    if command == "cache":
        parts = [
            f"{r.get('num_samples', '?')} samples ({r.get('skipped', 0)} skipped) -> {r.get('out_dir')}"
            for r in result.values()
        ]
        return "cache: " + "; ".join(parts)
    if command == "eval" and sub is not None:
        return _eval_summary(sub, _option(argv, "--out", "eval"), result)
    if command == "data" and isinstance(result, dict):
        counts = ", ".join(f"{k} {v}" for k, v in result.items() if not isinstance(v, dict))
        return f"data {sub}: wrote {_option(argv, '--out', '?')}: {counts}"
    return None


def _option(argv: list[str], flag: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


# ---------------------------------------------------------------------- dispatch
def _require_experiment(config: list[str], command: str) -> list[str]:
    if not any(a in ("-c", "--config") or a.startswith(("-c=", "--config=")) for a in config):
        raise UserError(f"give the experiment config: unifusion {command} -c CONFIG.yaml (repeatable, as for fit)")
    return list(config)


def split_experiment_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split a tool's arguments into LightningCLI ones (``-c/--config FILE`` and ``--trainer.*``,
    ``--model.*``, ``--data.*``, ``--seed_everything`` overrides, in their order) and the rest."""
    experiment: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise UserError(f"{arg} needs a config file")
            experiment += ["-c", argv[i + 1]]
            i += 2
            continue
        if arg.startswith(("--config=", "-c=")):
            experiment += ["-c", arg.split("=", 1)[1]]
        elif arg.startswith(_EXPERIMENT_PREFIXES):
            experiment.append(arg)
            has_value = "=" in arg
            if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                experiment.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return experiment, rest


def _complete_bool_flags(fn: Callable[..., Any], argv: list[str]) -> list[str]:
    """``--dry_run`` alone means ``--dry_run true`` for a boolean option (jsonargparse wants a value)."""
    import typing

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: leave the arguments as they are
        return argv
    flags = {f"--{name}" for name, hint in hints.items() if hint is bool or hint == (bool | None)}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in flags and (following is None or following.startswith("-")):
            out.append("true")
    return out


def _function(command: str) -> Callable[..., Any]:
    module, name = TOOL_FUNCTIONS[command].split(":")
    return getattr(importlib.import_module(module), name)


def _experiment_tool(command: str, fn: Callable[..., Any], argv: list[str]) -> Any:
    """A tool that takes an experiment config: ``-c`` and overrides go to LightningCLI as for fit."""
    from jsonargparse import ArgumentParser

    experiment, rest = split_experiment_args(argv)
    _check_config_files(experiment)
    doc = inspect.getdoc(fn) or ""
    parser = ArgumentParser(prog=f"unifusion {command}", description=doc.split("\n\n")[0])
    # here only for --help: -c/--config and the overrides are taken out of argv above
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="CONFIG",
        help="experiment config YAML as for `unifusion fit` (repeatable; later files override earlier ones); "
        "--trainer.*, --model.*, --data.* overrides are passed on too",
    )
    param = "config" if "config" in inspect.signature(fn).parameters else "experiment"
    parser.add_function_arguments(fn, skip={param})
    cfg = parser.parse_args(_complete_bool_flags(fn, rest))
    kwargs = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    return fn(**{param: experiment}, **kwargs)


def _tool_main(command: str, argv: list[str]) -> tuple[str | None, Any]:
    """Run a tool command; returns (subcommand or None, the function's result)."""
    from jsonargparse import CLI

    if command == "data":
        from unifusion.data.convert import convert_command
        from unifusion.data.shards import shapes_command

        functions: dict[str, Callable[..., Any]] = {"shapes": shapes_command, "convert": convert_command}
        sub = _first_positional(argv)
        if sub in functions:
            argv = _complete_bool_flags(functions[sub], argv)
        return sub, CLI(functions, args=argv, prog="unifusion data", as_positional=False)
    if command == "eval":
        sub = _first_positional(argv)
        if sub in EVAL_COMMANDS:
            argv = _complete_bool_flags(EVAL_COMMANDS[sub], argv)
        return sub, CLI(EVAL_COMMANDS, args=argv, prog="unifusion eval", as_positional=False)
    fn = _function(command)
    if command in EXPERIMENT_COMMANDS:
        return None, _experiment_tool(command, fn, argv)
    # `--prompt` / `--image` repeat to give several
    repeatable = {"generate": ("--prompt",), "edit": ("--image",)}.get(command, ())
    argv = [a + "+" if a in repeatable else a for a in _complete_bool_flags(fn, argv)]
    return None, CLI(fn, args=argv, prog=f"unifusion {command}", as_positional=False)


def _check_config_files(argv: list[str]) -> None:
    """A ``-c`` file that does not exist fails at once (jsonargparse would say so too, after the
    seconds it takes to import Lightning)."""
    for i, arg in enumerate(argv):
        path = None
        if arg in ("-c", "--config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith(("-c=", "--config=")):
            path = arg.split("=", 1)[1]
        # a value that is YAML/JSON text rather than a path is LightningCLI's to parse
        if path and not path.lstrip().startswith(("{", "[")) and "\n" not in path and not os.path.exists(path):
            raise UserError(f"config file {path!r} does not exist")


def _check_ckpt_path_early(argv: list[str]) -> None:
    """A missing, empty or non-checkpoint ``--ckpt_path`` file fails in a second, before Lightning
    is imported and the model built. Only cheap checks: the file is read (``weights_only``) later."""
    import zipfile

    path = _option(argv, "--ckpt_path", "")
    if not path or path in ("last", "best", "hpc", "null", "None") or path.startswith("registry"):
        return
    if "://" in path:  # remote (fsspec) paths are Lightning's to read
        return
    what = f"--ckpt_path checkpoint {path!r}"
    if not os.path.exists(path):
        raise CheckpointError(f"{what} does not exist (look under runs/*/checkpoints/)")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} is a directory, not a checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{what} is empty (0 bytes); the download or save did not finish")
    # torch.save writes a zip archive (a truncated one has no central directory at its end);
    # torch's legacy format is a protocol-2 pickle
    with open(path, "rb") as f:
        legacy = f.read(2) == b"\x80\x02"
    if not legacy and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{what} cannot be read: it is truncated or not a PyTorch checkpoint ({size} bytes)")


def _first_positional(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _print_help() -> None:
    print("usage: unifusion COMMAND [options]\n")
    print("Training (LightningCLI; `unifusion fit --help`, `-c a.yaml -c b.yaml`, `--print_config`, `--run_dir DIR`):")
    for c in LIGHTNING_COMMANDS:
        print(f"  {c:<10} Lightning {c}")
    print("\nTools (`unifusion COMMAND --help`):")
    for c, doc in TOOL_COMMANDS.items():
        print(f"  {c:<10} {doc}")
    print("\nQuickstart: unifusion fit -c experiments/quickstart.yaml")


def configure_logging(level: int = logging.INFO) -> None:
    """Show the library's INFO messages (task mix, init_from reports, cache counts) the way
    Lightning shows its own: on stderr, from rank zero only."""
    logger = logging.getLogger("unifusion")
    logger.setLevel(level)
    # as Lightning does for its own logger: a handler only when the application configured none
    # (pytest's log capture, or a user's logging.basicConfig, then receive the records instead)
    if logging.getLogger().hasHandlers() or any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_RankZeroFilter())
    logger.addHandler(handler)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


class _RankZeroFilter(logging.Filter):
    """Drops records on every process but global rank 0 (as Lightning's ``rank_zero_*`` helpers),
    reading the rank from the launcher's environment without importing Lightning."""

    def filter(self, record: logging.LogRecord) -> bool:
        for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
            value = os.environ.get(var)
            if value is not None:
                return int(value) == 0
        return True


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0
    command = argv[0]
    if command in LIGHTNING_COMMANDS:
        _check_config_files(argv)
        _check_ckpt_path_early(argv)
        lightning_main(argv)
        return 0
    if command in TOOL_COMMANDS:
        sub, result = _tool_main(command, argv[1:])
        line = _summary(command, sub, result, argv[1:])
        if line:
            print(line)
        return 0
    print(
        f"error: unknown command {command!r}; choose from {', '.join((*LIGHTNING_COMMANDS, *TOOL_COMMANDS))}",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    """The ``unifusion`` console script; returns the exit status (0 = success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    # CPU steps re-allocate the same activations: keep freed blocks instead of page-faulting
    retain_freed_memory()
    debug = os.environ.get("UNIFUSION_DEBUG", "") not in ("", "0")
    lightning = bool(argv) and argv[0] in LIGHTNING_COMMANDS
    try:
        return _run(argv)
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, KeyError) as e:
        # a bad config or option: for a training command only while it is being set up (a
        # ValueError deep inside a training step is a bug to see in full); tools check their
        # inputs before working
        if debug or (lightning and _lightning_phase() == "run"):
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 1


def _lightning_phase() -> str:
    mod = sys.modules.get("unifusion.lightning_cli")
    return mod.PHASE["value"] if mod is not None else "setup"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
