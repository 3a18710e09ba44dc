#!/usr/bin/env python
"""The conditioners we train vs diffusers' ``Krea2TextFusion``, at equal configuration.

Every row runs the *whole* text-fusion stage on ``(B, S, n, H)`` encoder states with a
padding mask (lengths drawn in ``[min_len, S]``): layerwise blocks over the ``n`` layers,
``n -> 1`` pooling, then 2 refiner blocks over the sequence.

* ``krea2_diffusers``: diffusers ``Krea2TextFusion`` (2 layerwise + 2 refiner blocks), eager;
  the baseline every ratio is against.
* ``krea2_unifusion[impl]``: :class:`unifusion.conditioners.Krea2LayerwisePooling` (the same
  architecture, ``text_projection=False``) loaded with the diffusers weights through
  :func:`unifusion.conditioners.convert_krea2_state_dict`; its output is checked against
  diffusers' before timing.
* ``lap_unifusion[impl]``: :class:`unifusion.conditioners.LayerwiseAttentionPooling` (the
  paper's block: RMSNorm before and after attention, no gate, per-layer input norm,
  output norm, ``H -> D`` projection) followed by :class:`unifusion.refiners.Refiner` -- the
  conditioner + refiner the quickstart trains. Same n, H, heads, blocks and FFN width as
  Krea-2 (``mlp_ratio = ffn / H``); ``--width D`` (default H) is the DiT width.
* with ``--compile``: the unifusion modules again after ``module.compile()`` (inductor).

``impl`` is each module's own ``kernel_impl`` (:func:`unifusion.layers.set_kernel_impl`):
``torch`` everywhere, plus ``triton`` on CUDA. Modes: ``fwd`` (inference, no grad) and
``fwd+bwd`` (gradients of all parameters; encoder states are frozen inputs). Timing is
interleaved (one run of every row per round) and the median over ``--reps`` rounds is
reported, with the peak memory of one run (CUDA: ``max_memory_allocated``; CPU: the
profiler's memory timeline). Prints a table and the ratios, writes a CSV under
``benchmarks/results/``.

Defaults: CPU -- the quickstart's conditioner (tiny LLaVA: 7 taps x hidden 64, 4 heads,
FFN 1.3x; batch 32 padded to 32 tokens, 3..32 real, like the quickstart's captions), fp32;
CUDA -- Krea-2's text stage (n=12, H=2560, 20 heads, FFN 6912), bf16, B x S = 16 x 512.
``--min_len S`` removes the padding (the unifusion modules skip padded tokens, Krea-2
computes them). CUDA target: ``krea2_unifusion[triton]`` and
``lap_unifusion[triton]`` >= 1.5x ``krea2_diffusers`` fwd+bwd with lower peak memory.
CPU target: >= 1.0x in both modes.

    python benchmarks/bench_lap_module.py
    python benchmarks/bench_lap_module.py --threads 1 --reps 15
    python benchmarks/bench_lap_module.py --B 16 --S 512 --n 12 --hidden 2560 --heads 20 --ffn 6912 --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DTYPES, device_name, peak_mem_mb, print_table, results_path, versions, write_csv  # noqa: E402

from unifusion.conditioners import (  # noqa: E402
    BackboneSpec,
    Krea2LayerwisePooling,
    LayerwiseAttentionPooling,
    convert_krea2_state_dict,
)
from unifusion.features import EncoderFeatures, EncoderSpec  # noqa: E402
from unifusion.layers import set_kernel_impl  # noqa: E402
from unifusion.refiners import Refiner  # noqa: E402

BASELINE = "krea2_diffusers"


@dataclass
class Row:
    module: str
    mode: str
    shape: str
    dtype: str
    threads: int
    ms: float
    peak_mem_mb: float
    vs_krea2: float
    device: str
    torch: str
    triton: str


class LapWithRefiner(nn.Module):
    """LAP conditioner + refiner, as the model chains them."""

    def __init__(self, lap: LayerwiseAttentionPooling, refiner: Refiner) -> None:
        super().__init__()
        self.lap, self.refiner = lap, refiner

    def forward(self, features: EncoderFeatures) -> torch.Tensor:
        cond = self.lap(features)
        return self.refiner(cond.tokens, cond.mask)


class Krea2Ours(nn.Module):
    def __init__(self, module: Krea2LayerwisePooling) -> None:
        super().__init__()
        self.module = module

    def forward(self, features: EncoderFeatures) -> torch.Tensor:
        return self.module(features).tokens


def build(args: argparse.Namespace, impls: list[str]) -> tuple[dict[str, tuple[nn.Module, str]], nn.Module | None]:
    """name -> (module, input kind: 'krea' (hidden, mask) or 'features'); and the diffusers module."""
    n, h, d = args.n, args.hidden, args.width or args.hidden
    enc = EncoderSpec(hidden_size=h, layer_ids=tuple(range(n)), depth=n - 1, name="bench")
    mods: dict[str, tuple[nn.Module, str]] = {}
    krea = None
    try:
        from diffusers.models.transformers.transformer_krea2 import Krea2TextFusion

        krea = Krea2TextFusion(
            num_text_layers=n,
            dim=h,
            num_heads=args.heads,
            num_kv_heads=args.heads,
            intermediate_size=args.ffn,
            num_layerwise_blocks=2,
            num_refiner_blocks=2,
            eps=1e-5,
        )
        with torch.no_grad():  # Krea-2's zero-centred norm scales: small random values, a non-trivial check
            for name, p in krea.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.1)
        mods[BASELINE] = (krea, "krea")
    except ImportError as e:  # pragma: no cover - diffusers without Krea-2
        print(f"diffusers Krea2TextFusion unavailable ({e}); timing the unifusion modules only")
    mlp_ratio = args.ffn / h
    for impl in impls:
        ours = Krea2LayerwisePooling(
            enc,
            BackboneSpec(width=h, depth=1, num_heads=1),
            num_heads=args.heads,
            intermediate_size=args.ffn,
            text_projection=False,
        )
        if krea is not None:
            ours.load_state_dict(convert_krea2_state_dict(krea.state_dict()))
        set_kernel_impl(ours, impl)
        mods[f"krea2_unifusion[{impl}]"] = (Krea2Ours(ours), "features")
        lap = LayerwiseAttentionPooling(
            enc, BackboneSpec(width=d, depth=1, num_heads=1), num_blocks=2, num_heads=args.heads, mlp_ratio=mlp_ratio
        )
        refiner = Refiner(d, num_blocks=2, num_heads=args.refiner_heads or args.heads, mlp_ratio=mlp_ratio)
        both = LapWithRefiner(lap, refiner)
        set_kernel_impl(both, impl)
        mods[f"lap_unifusion[{impl}]"] = (both, "features")
    if args.compile:
        for name in [k for k in mods if k != BASELINE]:
            module = copy.deepcopy(mods[name][0])
            module.compile()
            mods[name.replace("unifusion", "unifusion_compiled")] = (module, "features")
    return mods, krea


def make_inputs(args: argparse.Namespace, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.S + 1, (args.B,), generator=g)
    mask = torch.arange(args.S)[None] < lengths[:, None]
    hidden = torch.randn(args.B, args.S, args.n, args.hidden, generator=g)
    return hidden.to(device=device, dtype=dtype), mask.to(device)


def cpu_peak_mb(fn: Callable[[], object]) -> float:
    """Peak CPU memory (MB) of one ``fn()`` above what was live before, from the profiler's memory timeline."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
            fn()
        _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline("cpu")
        return max((sum(s) for s in sizes), default=0) / 2**20
    except Exception as e:  # private API: report NaN rather than fail the benchmark
        print(f"(CPU peak memory unavailable: {type(e).__name__}: {e})")
        return float("nan")


def peak_mb(fn: Callable[[], object], cuda: bool) -> float:
    """Peak memory (MB) of one ``fn()`` above what was live before: CUDA's counter, or the CPU allocator's."""
    return peak_mem_mb(fn, cuda) if cuda else cpu_peak_mb(fn)


def check_equal(krea: nn.Module, ours: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, layer_ids) -> float:
    """Max abs difference of Krea2LayerwisePooling vs diffusers on the real tokens (same weights)."""
    feats = EncoderFeatures(hidden=hidden, mask=mask, roles=mask.to(torch.int8) * 2, layer_ids=layer_ids)
    with torch.no_grad():
        a = krea(hidden, attention_mask=mask[:, None, None, :])
        b = ours(feats)
    return float((a[mask].float() - b[mask].float()).abs().max())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=16 if cuda else 32, help="batch")
    p.add_argument("--S", type=int, default=512 if cuda else 32, help="padded sequence length")
    p.add_argument(
        "--min_len", type=int, help="shortest sample (default S // 10); lengths uniform in [min_len, S]; S = no padding"
    )
    p.add_argument("--n", type=int, default=12 if cuda else 7, help="tapped layers")
    p.add_argument("--hidden", type=int, default=2560 if cuda else 64, help="encoder width H")
    p.add_argument("--heads", type=int, default=20 if cuda else 4, help="attention heads (both stages)")
    p.add_argument("--refiner_heads", type=int, help="refiner heads of the LAP row (default --heads)")
    p.add_argument("--ffn", type=int, help="SwiGLU width (default GPU 6912 = Krea-2's; CPU round(1.3 H), the paper's)")
    p.add_argument("--width", type=int, help="DiT width D of the LAP row (default H: equal configuration)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--reps", type=int, default=9, help="interleaved rounds; the median is reported (>= 5)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also time the unifusion modules after module.compile()")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--out", help="CSV path (default benchmarks/results/bench_lap_module_<gpu>_<versions>.csv)")
    args = p.parse_args(argv)
    args.ffn = args.ffn or (6912 if cuda else round(1.3 * args.hidden))
    args.min_len = args.min_len if args.min_len is not None else max(1, args.S // 10)
    if not 1 <= args.min_len <= args.S:
        p.error(f"--min_len must be in [1, S={args.S}], got {args.min_len}")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    v = versions()
    impls = ["torch", "triton"] if cuda else ["torch"]
    hidden, mask = make_inputs(args, device, dtype)
    real = int(mask.sum())
    shape = f"B={args.B} S={args.S} real={real} n={args.n} H={args.hidden} heads={args.heads} ffn={args.ffn}"
    print(
        f"device: {device_name()}  torch {v['torch']}  triton {v['triton']}  dtype {args.dtype}  "
        f"threads {torch.get_num_threads()}"
    )
    print(f"config: {shape}, 2 layerwise + 2 refiner blocks; LAP width D={args.width or args.hidden}")
    if not cuda:
        print("No CUDA GPU: CPU timings of the PyTorch paths (Triton rows need a GPU).")

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: fast for the GB-sized GPU configuration
        mods, krea = build(args, impls)
    layer_ids = tuple(range(args.n))
    feats = EncoderFeatures(hidden=hidden, mask=mask, roles=mask.to(torch.int8) * 2, layer_ids=layer_ids)
    for mod, _ in mods.values():
        mod.to(device=device, dtype=dtype)
    if krea is not None:
        for impl in impls:
            diff = check_equal(krea, mods[f"krea2_unifusion[{impl}]"][0], hidden, mask, layer_ids)
            print(f"krea2_unifusion[{impl}] vs diffusers Krea2TextFusion, same weights: max |diff| = {diff:.2e}")

    def make_step(mod: nn.Module, kind: str, mode: str) -> Callable[[], None]:
        params = [p for p in mod.parameters() if p.requires_grad]

        def run() -> torch.Tensor:
            if kind == "krea":
                return mod(hidden, attention_mask=mask[:, None, None, :])
            return mod(feats)

        def step() -> None:
            if mode == "fwd":
                with torch.no_grad():
                    run()
            else:
                out = run()
                torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
            if cuda:
                torch.cuda.synchronize()

        return step

    rows: list[Row] = []
    for mode in args.modes:
        steps = {name: make_step(mod, kind, mode) for name, (mod, kind) in mods.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        failed: set[str] = set()
        for name, step in steps.items():  # warm-up (and compile) outside the timed rounds
            try:
                step()
                step()
            except (torch.OutOfMemoryError, RuntimeError) as e:
                print(f"  {name} {mode}: failed ({type(e).__name__}: {str(e)[:160]})")
                failed.add(name)
        for _ in range(args.reps):
            for name, step in steps.items():
                if name in failed:
                    continue
                t0 = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - t0) * 1e3)
        med = {name: statistics.median(ts) for name, ts in times.items() if ts}
        base = med.get(BASELINE)
        for name, ms in med.items():
            mem = float("nan") if args.no_memory else peak_mb(steps[name], cuda)
            rows.append(
                Row(
                    module=name,
                    mode=mode,
                    shape=shape,
                    dtype=args.dtype,
                    threads=torch.get_num_threads(),
                    ms=round(ms, 3),
                    peak_mem_mb=round(mem, 1),
                    vs_krea2=round(base / ms, 3) if base else float("nan"),
                    device=device_name(),
                    torch=v["torch"],
                    triton=v["triton"],
                )
            )

    print(f"\nmedian of {args.reps} interleaved rounds; vs_krea2 = time of {BASELINE} / time of the row")
    print_table(rows, ["module", "mode", "ms", "peak_mem_mb", "vs_krea2"])
    report_targets(rows, cuda)
    if rows:
        path = args.out or results_path("bench_lap_module")
        write_csv(rows, path)
        print(f"\nwrote {path}")
    return rows


def report_targets(rows: list[Row], cuda: bool) -> None:
    """One line per unifusion module and mode: ratio vs Krea-2 and memory, PASS/MISS against the target."""
    want = 1.5 if cuda else 1.0
    impl = "triton" if cuda else "torch"
    base = {r.mode: r for r in rows if r.module == BASELINE}
    print(
        f"\nTargets ({'CUDA' if cuda else 'CPU'}): {impl} rows >= {want}x {BASELINE}"
        + (" with lower peak memory" if cuda else "")
    )
    for r in rows:
        if not r.module.endswith(f"[{impl}]") or r.mode not in base:
            continue
        b = base[r.mode]
        ok = r.vs_krea2 >= want
        mem_txt = ""
        if not (math.isnan(r.peak_mem_mb) or math.isnan(b.peak_mem_mb)):
            mem_txt = f", peak memory {r.peak_mem_mb:.0f} vs {b.peak_mem_mb:.0f} MB"
            if cuda:
                ok = ok and r.peak_mem_mb < b.peak_mem_mb
        print(f"  {r.module:28s} {r.mode:8s} {r.vs_krea2:.2f}x{mem_txt}  {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
