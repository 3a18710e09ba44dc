"""torch.compile: the DiT, LAP, Krea-2 preset and refiner trace as one graph (no breaks) and match eager.

``fullgraph=True`` raises on any graph break (a data-dependent branch or ``nonzero``).
The numerics run with the ``aot_eager`` backend (dynamo + AOT autograd, no C++ codegen) to
stay fast on a 2-core CPU; ``benchmarks/bench_compile.py`` times the inductor build.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from unifusion.backbones import DiT
from unifusion.conditioners import BackboneSpec, Conditioning, Krea2LayerwisePooling, LayerwiseAttentionPooling
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.refiners import Refiner

N, H, W = 3, 32, 32


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def wake(model: torch.nn.Module) -> torch.nn.Module:
    """Small random values for the zero-initialised (adaLN-Zero) parameters, so outputs are non-trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def features() -> EncoderFeatures:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)  # padding + empty
    return EncoderFeatures(
        hidden=torch.randn(3, 5, N, H, generator=g), mask=mask, roles=mask.to(torch.int8) * 2, layer_ids=tuple(range(N))
    )


def grads(module: torch.nn.Module, out: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(out.square().mean(), [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, gs) if g is not None}


def assert_same(compiled: tuple, eager: tuple) -> None:
    (out_c, g_c), (out_e, g_e) = compiled, eager
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    assert g_e and set(g_e) <= set(g_c)
    for name in set(g_c) - set(g_e):  # used by the compiled graph only under a zero mask (the null token)
        assert g_c[name].abs().max() == 0, name
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def check_module(module: torch.nn.Module, run) -> None:
    """``run(module) -> output tensor``: compiles as one graph (``fullgraph``) and equals eager in place."""
    eager_out = run(module)
    eager = (eager_out.detach(), grads(module, eager_out))
    keys = list(module.state_dict())
    module.compile(fullgraph=True, backend="aot_eager")  # in place: the state_dict keys stay the same
    assert list(module.state_dict()) == keys
    compiled_out = run(module)
    assert_same((compiled_out.detach(), grads(module, compiled_out)), eager)


def test_dit_compiles_without_graph_breaks_and_matches_eager() -> None:
    torch.manual_seed(0)
    dit = wake(DiT(in_channels=3, input_size=8, patch_size=2, width=W, depth=1, num_heads=2))
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.rand(3, generator=g)
    mask = features().mask  # padded prefix and an all-padding sample (null token)
    cond = Conditioning(tokens=torch.randn(3, 5, W, generator=g) * mask[..., None], mask=mask)
    check_module(dit, lambda m: m(x, t, cond))


def test_dit_kv_only_conditioning_compiles() -> None:
    # KV-only conditioning: eager adds the null-token prefix only when a sample is empty;
    # compiled always adds it (static shapes), masked where unused -- same results
    torch.manual_seed(0)
    dit = wake(DiT(in_channels=3, input_size=8, patch_size=2, width=W, depth=1, num_heads=2))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    kv = [(torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g))]
    check_module(dit, lambda m: m(x, t, Conditioning(tokens=None, mask=mask, kv=kv)))


def test_lap_and_refiner_compile_without_graph_breaks_and_match_eager() -> None:
    torch.manual_seed(0)
    lap = LayerwiseAttentionPooling(EncoderSpec(H, tuple(range(N)), N - 1, name="e"), BackboneSpec(W, 2, 2), 1, 2)
    feats = features()
    check_module(lap, lambda m: m(feats).tokens)
    refiner = Refiner(W, num_blocks=1, num_heads=2)
    tokens = torch.randn(3, 5, W)
    check_module(refiner, lambda m: m(tokens, feats.mask))


def test_krea2_preset_compiles_without_graph_breaks_and_matches_eager() -> None:
    torch.manual_seed(0)
    enc = EncoderSpec(H, tuple(range(N)), N - 1, name="e")
    krea = Krea2LayerwisePooling(
        enc,
        BackboneSpec(W, 2, 2),
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=40,
        num_layerwise_blocks=1,
        num_refiner_blocks=1,
    )
    feats = features()
    check_module(krea, lambda m: m(feats).tokens)
