"""Classifier-free-guidance sampling: batched (one DiT call per step) vs one call per branch.

Builds the pipeline of an experiment config (default: the quickstart; random weights —
speed does not depend on them) and samples the same prompts with the same seeds both ways,
interleaved, ``--repeats`` times; prints the median wall time of each, the ratio, and the
largest difference between the two outputs (they must agree). ``--edit`` times three-way
guidance (text + image) on a reference image.

    python benchmarks/bench_cfg_sampling.py --config experiments/quickstart.yaml --prompts 8 --steps 25
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch
import yaml

from unifusion.pipeline import UniFusionPipeline

PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a magenta square",
    "a cyan triangle",
    "a green circle on the left",
    "a red square and a blue circle",
]


def build(config: str) -> UniFusionPipeline:
    with open(config, encoding="utf-8") as f:
        model = yaml.safe_load(f)["model"]
    keep = ("encoder", "conditioner", "refiner", "backbone", "autoencoder", "flow", "sampling", "kernel_impl")
    return UniFusionPipeline.from_config({k: v for k, v in model.items() if k in keep})


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/quickstart.yaml")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--edit", action="store_true", help="three-way guidance with a reference image")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    pipe = build(args.config)
    with torch.no_grad():  # non-trivial weights (the DiT's output layer starts at zero)
        g = torch.Generator().manual_seed(0)
        for prm in pipe.backbone.final_layer.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[: args.prompts]
    side = pipe.image_size
    images = None
    if args.edit:
        ref = torch.rand(3, side, side, generator=torch.Generator().manual_seed(1))
        images = [[ref] for _ in prompts]
    kw = dict(steps=args.steps, seed=list(range(len(prompts))), output_type="pt")
    pipe.generate(prompts[:1], images[:1] if images else None, steps=1, output_type="pt")  # warm-up (loads the VLM)
    times: dict[str, list[float]] = {"batched": [], "unbatched": []}
    outs = {}
    for _ in range(args.repeats):
        for mode in ("unbatched", "batched"):
            t0 = time.perf_counter()
            outs[mode] = pipe.generate(prompts, images, batched_cfg=mode == "batched", **kw).images
            times[mode].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((outs["batched"] - outs["unbatched"]).abs().max())
    ratio = med["unbatched"] / med["batched"]
    print(
        f"config {args.config}: {len(prompts)} prompts x {args.steps} steps, {'edit (3-way)' if args.edit else 't2i'}"
    )
    print(f"{'mode':<10} {'median s':>9} {'per image ms':>13}")
    for k in ("unbatched", "batched"):
        print(f"{k:<10} {med[k]:9.3f} {1000 * med[k] / len(prompts):13.1f}")
    print(f"speed-up batched / unbatched: {ratio:.2f}x; max |difference| of the images: {diff:.2e}")
    row = {
        "config": args.config,
        "prompts": len(prompts),
        "steps": args.steps,
        "edit": args.edit,
        **med,
        "ratio": ratio,
        "max_diff": diff,
    }
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerow(row)
    return row


if __name__ == "__main__":
    main()
