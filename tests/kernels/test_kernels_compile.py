"""Every kernel compiles to a cubin for sm_90 (H100) and sm_80 (A100) -- no GPU needed (triton ships ptxas)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.kernels, pytest.mark.slow]

compile_check = pytest.importorskip("unifusion.kernels.compile_check")


def _can_compile_for_cuda() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="triton without the NVIDIA backend / ptxas")
@pytest.mark.parametrize("arch", [90, 80])
def test_bf16_kernels_compile_without_spills(arch):
    specs = compile_check.attention_specs(12, 128, "bf16")
    if arch == 90:
        specs += compile_check.rms_norm_specs(4096, "bf16")
        specs += compile_check.swiglu_specs("bf16")
        specs += compile_check.layer_pool_specs(65536, 12, 4096, "bf16")
    for spec, r in zip(specs, compile_check.compile_specs(specs, arch)):
        assert r.ok, f"{spec.name} sm_{arch}: {r.error}"
        assert r.spill_bytes in (0, None), f"{spec.name} sm_{arch} spills {r.spill_bytes} bytes"
        assert r.shared is not None and r.shared <= 160 * 1024, f"{spec.name} needs {r.shared} B shared memory"


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="triton without the NVIDIA backend / ptxas")
def test_fp16_fp32_attention_compile():
    for dtype in ("fp16", "fp32"):
        specs = compile_check.attention_specs(17, 64, dtype)
        for spec, r in zip(specs, compile_check.compile_specs(specs, 90)):
            assert r.ok, f"{spec.name} {dtype}: {r.error}"


def test_compiles_after_an_interpreted_launch(monkeypatch):
    # the interpreter leaves triton.language patched; compile_specs then compiles in a fresh process
    import torch

    from unifusion.kernels import layer_pool

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 2, 16)
    torch.testing.assert_close(layer_pool(x, torch.ones(2), impl="triton"), x.sum(1))
    specs = compile_check.layer_pool_specs(1024, 4, 256, "bf16")
    assert all(r.ok for r in compile_check.compile_specs(specs, 90))
