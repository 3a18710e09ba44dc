"""Evaluation: ShapesBench, reconstruction metrics, DPG-Bench (original and corrected aggregation),
VQAScore with local VLMs, a command front door and a Lightning callback.

Heavy submodules (transformers, lightning) are imported lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # shapesbench
    "CATEGORIES": "shapesbench",
    "BenchItem": "shapesbench",
    "DetectedObject": "shapesbench",
    "ShapeParser": "shapesbench",
    "ShapesBench": "shapesbench",
    "baseline_summary": "shapesbench",
    "bootstrap_means": "shapesbench",
    "flatten_scores": "shapesbench",
    "percentile_ci": "shapesbench",
    "run_shapesbench": "shapesbench",
    "summarize": "shapesbench",
    "trained_on_edits_from_config": "shapesbench",
    "trained_on_edits_from_run": "shapesbench",
    "unconditional_baseline": "shapesbench",
    # recon
    "LPIPS": "recon",
    "FeatureDistance": "recon",
    "lpips_distance": "recon",
    "ms_ssim": "recon",
    "psnr": "recon",
    "reconstruction_metrics": "recon",
    "ssim": "recon",
    "tile_study": "recon",
    # judge
    "DPG_JUDGE_SYSTEM_PROMPT": "judge",
    "HFYesNoJudge": "judge",
    "Judge": "judge",
    "judge_many": "judge",
    "load_vlm": "judge",
    "parse_yes_no": "judge",
    # dpg
    "DPGItem": "dpg",
    "DPGQuestion": "dpg",
    "aggregate_dpg": "dpg",
    "aggregate_dpg_original": "dpg",
    "answer_dpg": "dpg",
    "load_dpg_bench": "dpg",
    "run_dpg": "dpg",
    "split_grid": "dpg",
    # vqascore
    "VQASCORE_QUESTION": "vqascore",
    "VQAScore": "vqascore",
    "load_genai_bench_prompts": "vqascore",
    "run_vqascore": "vqascore",
    # front doors
    "eval_command": "commands",
    "ShapesBenchCallback": "callbacks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'unifusion.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"unifusion.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
