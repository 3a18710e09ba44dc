#!/usr/bin/env python
"""Eager vs ``torch.compile`` of the model parts at the quickstart sizes, forward+backward.

Parts (defaults = ``experiments/quickstart.yaml``): the DiT (width 128, depth 4, 4 heads,
16 px, patch 2, batch 32) conditioned on a padded prefix of ``S`` tokens; LAP (2 blocks, 4
heads over the tiny LLaVA's 7 taps x hidden 64, projected to 128); the refiner (2 blocks,
width 128). Each part is compiled in place (``module.compile()``, inductor, as the model's
``compile`` option does -- the state-dict keys stay the same) on a copy of the eager module;
the first call's time (cold compile) is reported separately. Timing is interleaved (one
eager and one compiled step per round), median of ``--reps`` rounds; prints the table and
the eager / compiled ratio, writes a CSV under ``benchmarks/results/``.

    python benchmarks/bench_compile.py
    python benchmarks/bench_compile.py --parts dit --reps 20 --threads 1
    python benchmarks/bench_compile.py --impl triton           # CUDA: the Triton ops inside the compiled graph
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import device_name, results_path, versions, write_csv  # noqa: E402

from unifusion.backbones import DiT  # noqa: E402
from unifusion.conditioners import BackboneSpec, Conditioning, LayerwiseAttentionPooling  # noqa: E402
from unifusion.features import EncoderFeatures, EncoderSpec  # noqa: E402
from unifusion.layers import set_kernel_impl  # noqa: E402
from unifusion.refiners import Refiner  # noqa: E402

PARTS = ("dit", "lap", "refiner")


@dataclass
class Row:
    part: str
    impl: str
    eager_ms: float
    compiled_ms: float
    speedup: float
    cold_compile_s: float
    shape: str
    threads: int
    device: str
    torch: str
    triton: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--S", type=int, default=32, help="padded conditioning tokens (lengths uniform in [3, S])")
    p.add_argument("--image", type=int, default=16, help="image side (pixel space, 3 channels)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--taps", type=int, default=7, help="encoder layers LAP pools")
    p.add_argument("--hidden", type=int, default=64, help="encoder width")
    p.add_argument("--impl", default="torch", choices=["torch", "triton", "auto"], help="kernel_impl of every part")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="CSV path (default benchmarks/results/bench_compile_<gpu>_<versions>.csv)")
    return p.parse_args(argv)


def build(args: argparse.Namespace, device: str) -> dict[str, tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]:
    """part -> (eager module, run(module) -> output)."""
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.S
    lengths = torch.randint(min(3, s), s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).to(device)
    parts: dict[str, tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]] = {}
    if "dit" in args.parts:
        dit = DiT(
            in_channels=3, input_size=args.image, patch_size=2, width=args.width, depth=args.depth, num_heads=args.heads
        )
        with torch.no_grad():  # wake the zero-initialised (adaLN-Zero) layers: realistic, non-zero gradients
            for p in dit.parameters():
                if p.abs().max() == 0:
                    p.normal_(0.0, 0.02)
        x = torch.randn(b, 3, args.image, args.image, generator=g).to(device)
        t = torch.rand(b, generator=g).to(device)
        cond = Conditioning(tokens=(torch.randn(b, s, args.width, generator=g).to(device) * mask[..., None]), mask=mask)
        parts["dit"] = (dit, lambda m: m(x, t, cond))
    if "lap" in args.parts:
        enc = EncoderSpec(args.hidden, tuple(range(args.taps)), args.taps - 1, name="tiny-llava")
        lap = LayerwiseAttentionPooling(
            enc, BackboneSpec(args.width, args.depth, args.heads), num_blocks=2, num_heads=args.heads
        )
        hidden = torch.randn(b, s, args.taps, args.hidden, generator=g).to(device)
        feats = EncoderFeatures(
            hidden=hidden, mask=mask, roles=mask.to(torch.int8) * 2, layer_ids=tuple(range(args.taps))
        )
        parts["lap"] = (lap, lambda m: m(feats).tokens)
    if "refiner" in args.parts:
        refiner = Refiner(args.width, num_blocks=2, num_heads=args.heads)
        tokens = torch.randn(b, s, args.width, generator=g).to(device)
        parts["refiner"] = (refiner, lambda m: m(tokens, mask))
    return parts


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    v = versions()
    print(
        f"device: {device_name()}  torch {v['torch']}  triton {v['triton']}  threads {torch.get_num_threads()}  "
        f"impl {args.impl}"
    )
    torch.manual_seed(0)
    rows: list[Row] = []
    for name, (eager, run) in build(args, device).items():
        eager.to(device)
        set_kernel_impl(eager, args.impl)
        compiled = copy.deepcopy(eager)
        compiled.compile()  # in place, inductor; same parameters and state-dict keys

        def step(m: nn.Module, run=run) -> None:
            out = run(m)
            params = [p for p in m.parameters() if p.requires_grad]
            torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
            if cuda:
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        step(compiled)
        cold = time.perf_counter() - t0
        step(compiled)
        step(eager)
        with torch.no_grad():
            diff = (run(compiled).float() - run(eager).float()).abs().max().item()
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.reps):
            for label, m in (("eager", eager), ("compiled", compiled)):
                t1 = time.perf_counter()
                step(m)
                times[label].append((time.perf_counter() - t1) * 1e3)
        e_ms, c_ms = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"{name}: cold compile {cold:.1f} s, compiled vs eager max |diff| {diff:.1e}")
        rows.append(
            Row(
                part=name,
                impl=args.impl,
                eager_ms=round(e_ms, 2),
                compiled_ms=round(c_ms, 2),
                speedup=round(e_ms / c_ms, 2),
                cold_compile_s=round(cold, 1),
                shape=f"batch={args.batch} S={args.S} image={args.image} width={args.width} depth={args.depth}",
                threads=torch.get_num_threads(),
                device=device_name(),
                torch=v["torch"],
                triton=v["triton"],
            )
        )
    if len(rows) > 1:
        e, c = sum(r.eager_ms for r in rows), sum(r.compiled_ms for r in rows)
        print(f"all parts: eager {e:.1f} ms, compiled {c:.1f} ms per fwd+bwd -> {e / c:.2f}x")
    print(f"\nfwd+bwd, median of {args.reps} interleaved rounds")
    cols = ["part", "impl", "eager_ms", "compiled_ms", "speedup", "cold_compile_s"]
    print("  ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(getattr(r, c)):>14s}" for c in cols))
    if rows:
        path = args.out or results_path("bench_compile")
        write_csv(rows, path)
        print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
