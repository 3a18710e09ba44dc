"""Each model part keeps its own kernel implementation (``kernel_impl`` per module, not a process global)."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch

from unifusion import kernels
from unifusion.conditioners import BackboneSpec, Krea2LayerwisePooling, LayerwiseAttentionPooling
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import KernelImplMixin, set_kernel_impl, use_kernel_impl

pytestmark = pytest.mark.kernels

N, H = 3, 32
ENC = EncoderSpec(hidden_size=H, layer_ids=tuple(range(N)), depth=N - 1, name="e")
DIT = BackboneSpec(width=32, depth=2, num_heads=2)

# (module, torch-path function, triton-path function): the dispatchers call these by module global
PATHS = [
    ("rms_norm", "_rms_norm_torch", "_rms_norm_triton"),
    ("swiglu", "swiglu_reference", "_swiglu_fwd_op"),
    ("layerwise_attention", "_layerwise_attention_torch", "_lwa_fwd_op"),
    ("layer_pool", "layer_pool_reference", "_pool_fwd_op"),
]


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Counts calls of every op's torch and triton path: keys ``(op, "torch" | "triton")``."""
    counter: Counter = Counter()
    for op, torch_fn, triton_fn in PATHS:
        mod = importlib.import_module(f"unifusion.kernels.{op}")
        for impl, name in (("torch", torch_fn), ("triton", triton_fn)):
            original = getattr(mod, name)

            def spy(*args, _orig=original, _key=(op, impl), **kwargs):
                counter[_key] += 1
                return _orig(*args, **kwargs)

            monkeypatch.setattr(mod, name, spy)
    return counter


def features() -> EncoderFeatures:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return EncoderFeatures(
        hidden=torch.randn(2, 4, N, H, generator=g), mask=mask, roles=mask.to(torch.int8) * 2, layer_ids=tuple(range(N))
    )


def lap() -> LayerwiseAttentionPooling:
    torch.manual_seed(0)
    return LayerwiseAttentionPooling(ENC, DIT, num_blocks=1, num_heads=2)


def used(counter: Counter) -> set[str]:
    return {impl for (_, impl), n in counter.items() if n}


def test_two_conditioners_keep_their_own_impl(calls):
    a, b = lap(), lap()
    set_kernel_impl(a, "torch")
    set_kernel_impl(b, "triton")
    feats = features()
    old = kernels.get_impl()
    try:
        for process_default in ("triton", "torch"):  # the process default must not matter
            kernels.set_impl(process_default)
            calls.clear()
            out_a = a(feats).tokens
            assert used(calls) == {"torch"}, calls
            calls.clear()
            out_b = b(feats).tokens
            out_b.square().mean().backward()
            assert used(calls) == {"triton"}, calls
            # every op of the LAP ran on the module's path
            assert {op for op, _ in calls} == {"rms_norm", "swiglu", "layerwise_attention", "layer_pool"}
            torch.testing.assert_close(out_b, out_a, atol=2e-5, rtol=2e-5)
    finally:
        kernels.set_impl(old)


def test_none_follows_the_process_default(calls):
    m = lap()
    assert all(mod.kernel_impl is None for mod in m.modules() if isinstance(mod, KernelImplMixin))
    with kernels.use_impl("triton"):
        m(features())
    assert used(calls) == {"triton"}
    calls.clear()
    with kernels.use_impl("torch"):
        m(features())
    assert used(calls) == {"torch"}


def test_use_kernel_impl_switches_temporarily_and_restores(calls):
    m = Krea2LayerwisePooling(ENC, BackboneSpec(width=H, depth=2, num_heads=2), num_heads=2, intermediate_size=40)
    set_kernel_impl(m, "triton")
    m.refiner.blocks[0].ff.kernel_impl = "auto"  # a submodule's own choice survives the context
    with use_kernel_impl(m, "torch") as same:
        assert same is m
        m(features())
        assert used(calls) == {"torch"}
    impls = {mod.kernel_impl for mod in m.modules() if isinstance(mod, KernelImplMixin)}
    assert impls == {"triton", "auto"} and m.refiner.blocks[0].ff.kernel_impl == "auto"
    calls.clear()
    m.refiner.blocks[0].ff.kernel_impl = "triton"
    m(features())
    assert used(calls) == {"triton"}


def test_bad_impl_is_one_clear_error():
    with pytest.raises(ValueError, match="kernel_impl must be one of"):
        set_kernel_impl(lap(), "cuda")
    with pytest.raises(ValueError, match="kernel_impl must be one of"):
        with use_kernel_impl(lap(), "fast"):
            pass


def test_two_dits_keep_their_own_impl(calls):
    from unifusion.backbones import DiT
    from unifusion.conditioners import Conditioning

    torch.manual_seed(0)
    a = DiT(in_channels=3, input_size=4, patch_size=2, width=32, depth=1, num_heads=2)
    b = DiT(in_channels=3, input_size=4, patch_size=2, width=32, depth=1, num_heads=2)
    b.load_state_dict(a.state_dict())
    set_kernel_impl(a, "triton")
    set_kernel_impl(b, "torch")
    x, t = torch.randn(2, 3, 4, 4), torch.rand(2)
    cond = Conditioning(tokens=torch.randn(2, 3, 32), mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    out_a = a(x, t, cond)
    assert used(calls) == {"triton"} and {op for op, _ in calls} == {"rms_norm", "swiglu"}
    calls.clear()
    out_b = b(x, t, cond)
    assert used(calls) == {"torch"}
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
