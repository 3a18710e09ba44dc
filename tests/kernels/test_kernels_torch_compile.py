"""The Triton ops are torch.library custom ops: a model using them compiles as one graph.

Runs the kernels under the CPU interpreter (conftest); the ``aot_eager`` backend keeps it
fast (dynamo + AOT autograd trace the custom ops and their registered backward).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from unifusion.conditioners import BackboneSpec, LayerwiseAttentionPooling
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import set_kernel_impl

pytestmark = pytest.mark.kernels


def test_lap_with_triton_kernels_compiles_fullgraph_and_matches_torch():
    dynamo.reset()
    torch.manual_seed(0)
    lap = LayerwiseAttentionPooling(EncoderSpec(32, (0, 1, 2), 2, name="e"), BackboneSpec(32, 2, 2), 1, 2)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    feats = EncoderFeatures(
        hidden=torch.randn(2, 4, 3, 32, generator=g), mask=mask, roles=mask.to(torch.int8) * 2, layer_ids=(0, 1, 2)
    )
    params = list(lap.parameters())

    def run(module):
        out = module(feats).tokens
        return out.detach(), torch.autograd.grad(out.square().mean(), params)

    set_kernel_impl(lap, "torch")
    out_t, g_t = run(lap)
    set_kernel_impl(lap, "triton")
    compiled = torch.compile(lap, fullgraph=True, backend="aot_eager")  # raises on any graph break
    out_c, g_c = run(compiled)
    torch.testing.assert_close(out_c, out_t, atol=2e-5, rtol=2e-5)
    for a, b in zip(g_c, g_t):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the compiled graph called the Triton custom ops, not the torch path
    graph_ops = set()

    def backend(gm, example_inputs):
        graph_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    dynamo.reset()
    torch.compile(lap, fullgraph=True, backend=backend)(feats)
    assert any("unifusion.layerwise_attention_fwd" in op for op in graph_ops), graph_ops
    assert any("unifusion.rms_norm_fwd" in op for op in graph_ops), graph_ops
    dynamo.reset()
