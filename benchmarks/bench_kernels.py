#!/usr/bin/env python
"""Benchmark the unifusion.kernels ops against eager PyTorch, torch.compile and chunked SDPA.

For every op and size: forward and forward+backward time, peak memory, achieved
bandwidth (minimum bytes the op must move / time) and its fraction of the GPU's peak
memory bandwidth. Prints a table and writes a CSV under benchmarks/results/ named after
the GPU and the torch/triton versions.

    python benchmarks/bench_kernels.py                       # GPU: full sweep; CPU: tiny PyTorch-only sweep
    python benchmarks/bench_kernels.py --ops layerwise_attention --T 65536 --n 12 --H 32 --d 128 --dtype bf16
    python benchmarks/bench_kernels.py --help

Without a GPU the script says so and times only the PyTorch paths (eager, chunked SDPA;
torch.compile with --compile) on small sizes, so it finishes in well under a minute.
GPU timings use ``triton.testing.do_bench`` (median ms); CPU timings use perf_counter.

Targets checked on GPU (printed as ratios at the end):
  layerwise_attention fwd+bwd at T=65536, n=12, H=32, d=128, bf16: >= 3x eager,
  >= 1.3x torch.compile, >= 70% of peak bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch
import torch.nn.functional as F

from unifusion import kernels

# Peak HBM bandwidth in GB/s (vendor datasheets), matched by substring of the device name.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM
    ("H800", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("A800", 2039.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def peak_gbps(name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key.lower() in name.lower():
            return gbps
    return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def results_path(prefix: str) -> str:
    v = versions()
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{device_name()}_torch{v['torch']}_triton{v['triton']}").strip("-")
    return os.path.join(RESULTS_DIR, f"{prefix}_{slug}.csv")


# ------------------------------------------------------------------------------ timing
def time_ms(fn: Callable[[], object], cuda: bool, warmup: int = 1, rep: int = 5) -> float:
    """Milliseconds of ``fn()``: do_bench median on CUDA; on CPU the minimum over ``rep`` runs
    (least disturbed by other processes -- CPU numbers are a smoke test only)."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def peak_mem_mb(fn: Callable[[], object], cuda: bool) -> float:
    """Peak memory (MB) allocated while running ``fn`` once, above what was live before."""
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------ baselines
def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What one writes by hand: matmuls in the input dtype, softmax in fp32."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 32768) -> torch.Tensor:
    """SDPA with batch = tokens, chunked over T to stay under the 65535 grid-dimension limit."""
    if q.shape[0] <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [
            F.scaled_dot_product_attention(q[i : i + chunk], k[i : i + chunk], v[i : i + chunk])
            for i in range(0, q.shape[0], chunk)
        ]
    )


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    mode: str
    ms: float
    peak_mem_mb: float
    gbps: float
    frac_peak: float
    speedup_vs_eager: float
    device: str
    torch: str
    triton: str


@dataclass
class Case:
    op: str
    shape: str
    make_inputs: Callable[[], list[torch.Tensor]]  # leaf tensors with requires_grad
    impls: dict[str, Callable[..., torch.Tensor]]
    bytes_fwd: int
    bytes_bwd: int


def attention_case(T: int, H: int, n: int, d: int, dtype: torch.dtype, device: str, compile_: bool) -> Case:
    def make() -> list[torch.Tensor]:
        return [torch.randn(T, H, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]

    impls: dict[str, Callable[..., torch.Tensor]] = {"eager": eager_attention, "sdpa_chunked": chunked_sdpa}
    if compile_:
        impls["torch.compile"] = torch.compile(eager_attention, dynamic=False)
    if device == "cuda":
        impls["triton"] = lambda q, k, v: kernels.layerwise_attention(q, k, v, impl="triton")
    unit = T * H * n * d * torch.finfo(dtype).bits // 8
    # fwd reads q, k, v, writes o; bwd reads q, k, v, do, writes dq, dk, dv
    return Case("layerwise_attention", f"T={T} H={H} n={n} d={d}", make, impls, 4 * unit, 7 * unit)


def rms_norm_case(M: int, N: int, dtype: torch.dtype, device: str, compile_: bool) -> Case:
    def make() -> list[torch.Tensor]:
        x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(N, device=device, dtype=dtype, requires_grad=True)
        return [x, w]

    impls: dict[str, Callable[..., torch.Tensor]] = {
        "eager": lambda x, w: kernels.rms_norm_reference(x, w, 1e-6),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (N,), w, 1e-6),
    }
    if compile_:
        impls["torch.compile"] = torch.compile(lambda x, w: kernels.rms_norm_reference(x, w, 1e-6), dynamic=False)
    if device == "cuda":
        impls["triton"] = lambda x, w: kernels.rms_norm(x, w, 1e-6, impl="triton")
    unit = M * N * torch.finfo(dtype).bits // 8
    return Case("rms_norm", f"M={M} N={N}", make, impls, 2 * unit, 3 * unit)


def swiglu_case(M: int, N: int, dtype: torch.dtype, device: str, compile_: bool) -> Case:
    def make() -> list[torch.Tensor]:
        return [torch.randn(M, N, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]

    impls: dict[str, Callable[..., torch.Tensor]] = {
        "eager": kernels.swiglu_reference,
        "eager_native": lambda g, u: F.silu(g) * u,
    }
    if compile_:
        impls["torch.compile"] = torch.compile(kernels.swiglu_reference, dynamic=False)
    if device == "cuda":
        impls["triton"] = lambda g, u: kernels.swiglu(g, u, impl="triton")
    unit = M * N * torch.finfo(dtype).bits // 8
    return Case("swiglu", f"M={M} N={N}", make, impls, 3 * unit, 5 * unit)


def layer_pool_case(T: int, n: int, H: int, dtype: torch.dtype, device: str, compile_: bool) -> Case:
    def make() -> list[torch.Tensor]:
        x = torch.randn(T, n, H, device=device, dtype=dtype, requires_grad=True)
        w = torch.full((n,), 1.0 / n, device=device, dtype=dtype, requires_grad=True)
        return [x, w]

    def krea2_style(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # diffusers Krea2TextFusion: permute to (..., H, n) then Linear(n, 1)
        return F.linear(x.transpose(1, 2), w[None]).squeeze(-1)

    impls: dict[str, Callable[..., torch.Tensor]] = {
        "eager": lambda x, w: torch.einsum("tnh,n->th", x, w),
        "krea2_permute_linear": krea2_style,
    }
    if compile_:
        impls["torch.compile"] = torch.compile(lambda x, w: torch.einsum("tnh,n->th", x, w), dynamic=False)
    if device == "cuda":
        impls["triton"] = lambda x, w: kernels.layer_pool(x, w, impl="triton")
    el = torch.finfo(dtype).bits // 8
    # fwd reads x, writes y; bwd reads x and dy, writes dx
    return Case("layer_pool", f"T={T} n={n} H={H}", make, impls, el * T * H * (n + 1), el * T * H * (2 * n + 1))


def run_case(case: Case, dtype_name: str, cuda: bool, modes: list[str]) -> list[Row]:
    rows: list[Row] = []
    v = versions()
    peak = peak_gbps(device_name()) if cuda else None
    eager_ms: dict[str, float] = {}
    try:
        inputs = case.make_inputs()
    except torch.OutOfMemoryError:
        print(f"  {case.op} {case.shape}: inputs do not fit in memory; skipped")
        return rows
    for impl, fn in case.impls.items():
        for mode in modes:
            if mode == "fwd":

                def step(fn=fn) -> None:
                    with torch.no_grad():
                        fn(*inputs)

                nbytes = case.bytes_fwd
            else:
                out = fn(*inputs)
                grad = torch.randn_like(out)
                del out

                def step(fn=fn, grad=grad) -> None:
                    out = fn(*inputs)
                    torch.autograd.grad(out, inputs, grad)

                nbytes = case.bytes_fwd + case.bytes_bwd
            try:
                step()  # compile / autotune outside the timed region
                ms = time_ms(step, cuda)
                mem = peak_mem_mb(step, cuda)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                print(f"  {case.op} {case.shape} {impl} {mode}: failed ({type(e).__name__}: {str(e)[:120]})")
                if cuda:
                    torch.cuda.empty_cache()
                continue
            if impl == "eager":
                eager_ms[mode] = ms
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append(
                Row(
                    op=case.op,
                    shape=case.shape,
                    dtype=dtype_name,
                    impl=impl,
                    mode=mode,
                    ms=round(ms, 4),
                    peak_mem_mb=round(mem, 1),
                    gbps=round(gbps, 1),
                    frac_peak=round(gbps / peak, 3) if peak else float("nan"),
                    speedup_vs_eager=round(eager_ms[mode] / ms, 2) if mode in eager_ms else float("nan"),
                    device=device_name(),
                    torch=v["torch"],
                    triton=v["triton"],
                )
            )
    return rows


KERNEL_COLUMNS = ["op", "shape", "dtype", "impl", "mode", "ms", "peak_mem_mb", "gbps", "frac_peak", "speedup_vs_eager"]


def print_table(rows: list[Any], cols: list[str] | None = None) -> None:
    """``rows`` (dataclasses) as an aligned text table of the fields ``cols`` (default: this script's)."""
    cols = cols or KERNEL_COLUMNS
    data = [[str(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for d in data:
        print("  ".join(x.ljust(w) for x, w in zip(d, widths)))


def write_csv(rows: list[Any], path: str) -> None:
    """``rows`` (dataclasses or dicts, one schema) as a CSV file at ``path``; its folder is created."""
    dicts = [asdict(r) if is_dataclass(r) else dict(r) for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dicts[0]))
        w.writeheader()
        w.writerows(dicts)


def check_targets(rows: list[Row]) -> None:
    """Print the layerwise-attention targets for the production shape, when it was measured."""
    target = "T=65536 H=32 n=12 d=128"
    sel = {r.impl: r for r in rows if r.op == "layerwise_attention" and r.shape == target and r.mode == "fwd+bwd"}
    if "triton" not in sel:
        print(f"\n(targets: run on a GPU with --T 65536 --n 12 --H 32 --d 128 --dtype bf16 to check {target})")
        return
    tri = sel["triton"]
    print(f"\nTargets at {target} {tri.dtype}, fwd+bwd:")
    for impl, want in (("eager", 3.0), ("torch.compile", 1.3), ("sdpa_chunked", None)):
        if impl in sel:
            ratio = sel[impl].ms / tri.ms
            verdict = "" if want is None else ("  PASS" if ratio >= want else "  MISS")
            want_s = f" (target >= {want}x)" if want else ""
            print(f"  triton vs {impl}: {ratio:.2f}x{want_s}{verdict}")
    if not math.isnan(tri.frac_peak):
        verdict = "PASS" if tri.frac_peak >= 0.7 else "MISS"
        print(f"  bandwidth: {tri.gbps:.0f} GB/s = {100 * tri.frac_peak:.0f}% of peak (target >= 70%)  {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ops",
        nargs="+",
        default=["layerwise_attention", "rms_norm", "swiglu", "layer_pool"],
        choices=["layerwise_attention", "rms_norm", "swiglu", "layer_pool"],
    )
    p.add_argument("--T", nargs="+", type=int, help="token counts (default GPU: 4096 16384 65536; CPU: 256 1024)")
    p.add_argument("--n", nargs="+", type=int, help="layer counts (default GPU: 6 12 24; CPU: 4 12)")
    p.add_argument("--H", type=int, help="heads (default GPU: 32; CPU: 4)")
    p.add_argument("--d", type=int, help="head dim (default GPU: 128; CPU: 32); hidden size = H * d")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for GPU")
    p.add_argument(
        "--out", default=None, help="CSV path (default benchmarks/results/bench_kernels_<gpu>_<versions>.csv)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        print("No CUDA GPU: timing only the PyTorch paths on CPU at small sizes (no Triton, no bandwidth fractions).")
    Ts = args.T or ([4096, 16384, 65536] if cuda else [256, 1024])
    ns = args.n or ([6, 12, 24] if cuda else [4, 12])
    H = args.H or (32 if cuda else 4)
    d = args.d or (128 if cuda else 32)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = DTYPES[dtype_name]
    compile_ = cuda if args.compile is None else args.compile
    v = versions()
    print(f"device: {device_name()}  torch {v['torch']}  triton {v['triton']}  dtype {dtype_name}  compile {compile_}")
    if cuda:
        print(f"peak bandwidth: {peak_gbps(device_name()) or 'unknown (add it to PEAK_GBPS)'} GB/s")

    rows: list[Row] = []
    torch.manual_seed(0)
    for T in Ts:
        for n in ns:
            cases = []
            if "layerwise_attention" in args.ops:
                cases.append(attention_case(T, H, n, d, dtype, device, compile_))
            if "layer_pool" in args.ops:
                cases.append(layer_pool_case(T, n, H * d, dtype, device, compile_))
            for case in cases:
                rows += run_case(case, dtype_name, cuda, args.modes)
        for name in ("rms_norm", "swiglu"):
            if name in args.ops:
                # one row per token and layer, hidden H*d (rms_norm) / 1.3x FFN hidden (swiglu)
                M = T * max(ns)
                N = H * d if name == "rms_norm" else int(1.3 * H * d)
                make = rms_norm_case if name == "rms_norm" else swiglu_case
                rows += run_case(make(M, N, dtype, device, compile_), dtype_name, cuda, args.modes)
            if cuda:
                torch.cuda.empty_cache()
        if cuda:
            torch.cuda.empty_cache()

    print()
    rows.sort(key=lambda r: (r.op, r.mode))  # stable: keeps the size sweep order within an op
    print_table(rows)
    if rows:
        path = args.out or results_path("bench_kernels")
        write_csv(rows, path)
        print(f"\nwrote {path}")
    check_targets(rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
