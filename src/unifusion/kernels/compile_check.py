"""Compile every Triton kernel ahead of time for a CUDA architecture -- no GPU needed.

Triton ships ``ptxas``, so ``triton.compile`` can lower a kernel to a cubin for, say,
sm_90 (H100) on a CPU-only machine. This catches compile errors the CPU interpreter
cannot see (layouts, dot shapes, dtype rules) and reports registers and spills per
kernel and configuration::

    python -m unifusion.kernels.compile_check                  # sm_90, bf16/fp16/fp32
    python -m unifusion.kernels.compile_check --arch 80 --dtypes bf16 --n 12 24 --d 64 128

Integer arguments are compiled as i32 without divisibility hints, so the cubin can
differ slightly from the one specialised at launch; registers/spills are indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from ._triton_utils import interpreted_launch_happened, next_pow2

# the package re-exports functions under the module names, so import the modules explicitly
layer_pool = importlib.import_module(f"{__package__}.layer_pool")
layerwise_attention = importlib.import_module(f"{__package__}.layerwise_attention")
rms_norm = importlib.import_module(f"{__package__}.rms_norm")
swiglu = importlib.import_module(f"{__package__}.swiglu")


@dataclass
class KernelSpec:
    name: str
    fn: Any  # the raw Python kernel function
    pointers: dict[str, str]  # arg -> element type ("bf16", "fp32", ...)
    floats: tuple[str, ...]
    constexprs: dict[str, Any]
    num_warps: int


@dataclass
class CompileResult:
    spec: KernelSpec
    ok: bool
    registers: int | None
    spill_bytes: int | None
    shared: int | None
    error: str = ""


def attention_specs(n: int, d: int, dtype: str) -> list[KernelSpec]:
    prec = "ieee" if dtype == "fp32" else "tf32"
    out = []
    for backward in (False, True):
        n_pad, d_pad, block_t, warps = layerwise_attention._config(n, d, backward, 4 if dtype == "fp32" else 2)
        names = ("Q", "K", "V", "DO", "DQ", "DK", "DV") if backward else ("Q", "K", "V", "Out")
        fn = layerwise_attention._lwa_bwd_kernel if backward else layerwise_attention._lwa_fwd_kernel
        consts = {"BLOCK_T": block_t, "N_PAD": n_pad, "D_PAD": d_pad, "PREC": prec}
        out.append(KernelSpec(fn.__name__, fn, dict.fromkeys(names, dtype), ("scale",), consts, warps))
    return out


def rms_norm_specs(N: int, dtype: str) -> list[KernelSpec]:
    block_n = next_pow2(N)
    warps = rms_norm._num_warps(block_n)
    consts = {"HAS_W": True, "BLOCK_N": block_n}
    fwd = {"X": dtype, "W": dtype, "Y": dtype, "RSTD": "fp32"}
    bwd = {"DY": dtype, "X": dtype, "W": dtype, "RSTD": "fp32", "DX": dtype, "DW_PARTIAL": "fp32"}
    return [
        KernelSpec("_rms_fwd_kernel", rms_norm._rms_fwd_kernel, fwd, ("eps",), consts, warps),
        KernelSpec("_rms_bwd_kernel", rms_norm._rms_bwd_kernel, bwd, (), consts, warps),
    ]


def swiglu_specs(dtype: str) -> list[KernelSpec]:
    consts = {"BLOCK": swiglu.BLOCK}
    return [
        KernelSpec("_swiglu_fwd_kernel", swiglu._swiglu_fwd_kernel, dict.fromkeys("GUY", dtype), (), consts, 4),
        KernelSpec(
            "_swiglu_bwd_kernel",
            swiglu._swiglu_bwd_kernel,
            dict.fromkeys(("DY", "G", "U", "DG", "DU"), dtype),
            (),
            consts,
            4,
        ),
    ]


def layer_pool_specs(T: int, n: int, H: int, dtype: str) -> list[KernelSpec]:
    block_t, block_h = layer_pool._blocks(T, H)
    fwd = {"X": dtype, "W": dtype, "B": dtype, "Y": dtype}
    bwd = {"X": dtype, "W": dtype, "DY": dtype, "DX": dtype, "DW_PARTIAL": "fp32"}
    return [
        KernelSpec(
            "_pool_fwd_kernel",
            layer_pool._pool_fwd_kernel,
            fwd,
            (),
            {"HAS_B": False, "BLOCK_T": block_t, "BLOCK_H": block_h},
            4,
        ),
        KernelSpec(
            "_pool_bwd_kernel",
            layer_pool._pool_bwd_kernel,
            bwd,
            (),
            {"BLOCK_T": block_t, "BLOCK_H": block_h, "N_PAD": next_pow2(n)},
            4,
        ),
    ]


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    return compile_specs([spec], arch)[0]


def compile_specs(specs: list[KernelSpec], arch: int) -> list[CompileResult]:
    """Compile each spec for ``sm_<arch>``; in a fresh process if this one already ran an interpreted kernel.

    (Triton's interpreter leaves ``triton.language`` patched for interpretation, which breaks
    a later GPU compile in the same process.)
    """
    if not interpreted_launch_happened():
        return _compile_many(specs, arch)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # the child must import triton without TRITON_INTERPRET, or triton.language starts out interpreted
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_compile_many, specs, arch).result()
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _compile_many(specs: list[KernelSpec], arch: int) -> list[CompileResult]:
    # ptxas log on stdout; always compile (a cache hit prints no log); silence the fp-fusion notice
    with _env(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1", TRITON_DEFAULT_FP_FUSION="1"):
        return [_compile_spec(spec, arch) for spec in specs]


def _compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = JITFunction(spec.fn)
    signature = {}
    for name in jit.arg_names:
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name in spec.pointers:
            signature[name] = "*" + spec.pointers[name]
        elif name in spec.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    constexprs = {(jit.arg_names.index(k),): v for k, v in spec.constexprs.items()}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn=jit, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": spec.num_warps},
            )
    except Exception as e:  # compile errors are the point of this check
        return CompileResult(spec, False, None, None, None, f"{type(e).__name__}: {str(e)[-400:]}")
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return CompileResult(
        spec,
        True,
        int(regs[-1]) if regs else None,
        sum(int(a) + int(b) for a, b in spills) if spills else None,
        kernel.metadata.shared,
    )


def all_specs(dtypes: list[str], ns: list[int], ds: list[int], hidden: int) -> list[tuple[str, KernelSpec]]:
    specs = []
    for dtype in dtypes:
        for n in ns:
            for d in ds:
                specs += [(f"{dtype} n={n} d={d}", s) for s in attention_specs(n, d, dtype)]
            specs += [(f"{dtype} n={n} H={hidden}", s) for s in layer_pool_specs(65536, n, hidden, dtype)]
        specs += [(f"{dtype} N={hidden}", s) for s in rms_norm_specs(hidden, dtype)]
        specs += [(f"{dtype}", s) for s in swiglu_specs(dtype)]
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (80 = A100, 90 = H100)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--n", nargs="+", type=int, default=[12])
    p.add_argument("--d", nargs="+", type=int, default=[128])
    p.add_argument("--hidden", type=int, default=4096, help="hidden size for rms_norm / layer_pool")
    args = p.parse_args(argv)
    failures = 0
    print(f"{'kernel':<22} {'case':<22} {'warps':>5} {'regs':>5} {'spill B':>8} {'smem B':>7}  status")
    cases = all_specs(args.dtypes, args.n, args.d, args.hidden)
    results = compile_specs([spec for _, spec in cases], args.arch)
    for (case, spec), r in zip(cases, results):
        status = "ok" if r.ok else f"FAILED {r.error}"
        failures += not r.ok
        print(
            f"{spec.name:<22} {case:<22} {spec.num_warps:>5} {r.registers!s:>5} {r.spill_bytes!s:>8} {r.shared!s:>7}  {status}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
