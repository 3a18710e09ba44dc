"""The ``torch | triton | auto`` switch and how the interpreter is picked up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from unifusion import kernels
from unifusion.kernels import get_impl, layerwise_attention, resolve_impl, rms_norm, set_impl, swiglu, use_impl

pytestmark = pytest.mark.kernels


def _env_without_interpreter() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("UNIFUSION_KERNEL_IMPL", None)
    return env


def test_auto_picks_torch_on_cpu():
    x = torch.zeros(2, 3)
    assert resolve_impl("auto", x) == "torch"
    assert resolve_impl("torch", x) == "torch"
    q = torch.randn(2, 1, 3, 16, requires_grad=True)
    out = layerwise_attention(q, q, q, impl="auto")
    assert "unifusion" not in type(out.grad_fn).__name__  # not the Triton custom op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_auto_picks_triton_on_cuda():
    assert resolve_impl("auto", torch.zeros(2, device="cuda", dtype=torch.bfloat16)) == "triton"


def test_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.zeros(2, 8), torch.ones(8), impl="triton")
    with pytest.raises(RuntimeError, match="impl='torch'"):
        swiglu(torch.zeros(4), torch.zeros(4), impl="triton")


def test_triton_on_cpu_without_interpreter_errors_in_fresh_process():
    code = textwrap.dedent(
        """
        import torch
        from unifusion.kernels import layerwise_attention
        q = torch.zeros(2, 1, 3, 16)
        assert layerwise_attention(q, q, q, impl="auto").shape == q.shape  # auto -> torch
        try:
            layerwise_attention(q, q, q, impl="triton")
        except RuntimeError as e:
            print("ERR:", e)
        else:
            print("NO ERROR")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env_without_interpreter(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "ERR:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout


def test_interpreter_can_be_enabled_after_triton_was_imported():
    # lightning imports triton (compiled mode); setting TRITON_INTERPRET afterwards still works
    code = textwrap.dedent(
        """
        import os, sys
        import lightning  # noqa: F401  (imports triton without the interpreter)
        assert "triton" in sys.modules
        import torch
        from unifusion.kernels import layerwise_attention, layerwise_attention_reference
        os.environ["TRITON_INTERPRET"] = "1"
        q = torch.randn(3, 2, 5, 16)
        out = layerwise_attention(q, q, q, impl="triton")
        torch.testing.assert_close(out, layerwise_attention_reference(q, q, q), atol=1e-5, rtol=1e-5)
        import triton.language as tl
        from triton.runtime.jit import JITFunction
        assert isinstance(tl.max, JITFunction), "triton.language must be restored after the launch"
        print("OK")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env_without_interpreter(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_set_get_use_impl_and_bad_values():
    old = get_impl()
    try:
        set_impl("torch")
        assert get_impl() == "torch"
        with use_impl("triton"):
            assert get_impl() == "triton"
        assert get_impl() == "torch"
        with pytest.raises(ValueError, match="kernel impl must be one of"):
            set_impl("cuda")
        with pytest.raises(ValueError, match="kernel impl must be one of"):
            resolve_impl("fast", torch.zeros(1))
    finally:
        set_impl(old)


def test_public_api():
    for name in [
        "layerwise_attention",
        "layerwise_attention_reference",
        "rms_norm",
        "rms_norm_reference",
        "swiglu",
        "swiglu_reference",
        "layer_pool",
        "layer_pool_reference",
        "set_impl",
        "get_impl",
        "use_impl",
        "resolve_impl",
    ]:
        assert hasattr(kernels, name), name


def test_auto_keeps_spilling_attention_shapes_on_torch():
    from importlib import import_module

    lwa = import_module("unifusion.kernels.layerwise_attention")
    assert lwa.auto_supported(12, 128, torch.bfloat16)
    assert lwa.auto_supported(48, 120, torch.bfloat16)
    assert lwa.auto_supported(12, 128, torch.float32)
    assert lwa.auto_supported(17, 120, torch.float32) is False  # fp32 32x128 tile spills: auto keeps torch
    assert lwa.auto_supported(128, 256, torch.bfloat16) is False
