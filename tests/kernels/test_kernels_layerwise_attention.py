"""layerwise_attention: Triton (interpreter on CPU) vs the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import ALL_DTYPES, CPU_DTYPES

from unifusion.kernels import layerwise_attention, layerwise_attention_reference, use_impl

pytestmark = pytest.mark.kernels


def _inputs(shape, dtype, device, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    T, H, n, d = shape
    out = []
    for _ in range(3):
        if layout == "contiguous":
            base = torch.randn(T, H, n, d, generator=g)
            t = base
        elif layout == "thnd_from_tnhd":  # the natural layout after a (T, n, H*d) projection
            base = torch.randn(T, n, H, d, generator=g)
            t = base.transpose(1, 2)
        else:  # strided slices of a wider tensor
            base = torch.randn(T, H, n, 2 * d, generator=g)
            t = base[..., ::2]
        out.append(t.to(device=device, dtype=dtype).detach().requires_grad_())
    return out


def _run_both(q, k, v, seed=1):
    o = layerwise_attention(q, k, v, impl="triton")
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g).to(o)
    grads = torch.autograd.grad(o, (q, k, v), do) if o.numel() else (None, None, None)
    o_ref = layerwise_attention_reference(q, k, v)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do) if o.numel() else (None, None, None)
    return o, grads, o_ref, grads_ref


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("n", [1, 3, 12, 16, 17])
def test_forward_backward_match_reference(n, d, dtype, device, check):
    q, k, v = _inputs((5, 2, n, d), dtype, device)
    o, grads, o_ref, grads_ref = _run_both(q, k, v)
    check(o, o_ref, dtype, "out")
    for name, a, b in zip("qkv", grads, grads_ref):
        check(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 12, 64), (33, 2, 12, 16), (6, 3, 5, 40)],  # T=33 crosses program blocks; d=40 is not a power of two
)
def test_more_shapes(shape, dtype, device, check):
    q, k, v = _inputs(shape, dtype, device, seed=3)
    o, grads, o_ref, grads_ref = _run_both(q, k, v)
    check(o, o_ref, dtype, "out")
    for name, a, b in zip("qkv", grads, grads_ref):
        check(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("layout", ["thnd_from_tnhd", "strided"])
def test_non_contiguous_inputs(layout, device, check):
    q, k, v = _inputs((5, 3, 12, 16), torch.float32, device, seed=4, layout=layout)
    assert not q.is_contiguous()
    o, grads, o_ref, grads_ref = _run_both(q, k, v)
    check(o, o_ref, torch.float32, "out")
    for name, a, b in zip("qkv", grads, grads_ref):
        check(a, b, torch.float32, f"d{name}")


@pytest.mark.parametrize("kind", ["transposed", "expanded"])
def test_non_contiguous_grad_output(kind, device, check):
    q, k, v = _inputs((4, 2, 3, 16), torch.float32, device, seed=5)
    if kind == "transposed":
        do = torch.randn(4, 3, 2, 16).to(device).transpose(1, 2)
    else:  # what out.sum().backward() sends: a stride-0 expanded tensor
        do = torch.ones(1, 1, 1, 1, device=device).expand(4, 2, 3, 16)
    assert not do.is_contiguous()
    o = layerwise_attention(q, k, v, impl="triton")
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(layerwise_attention_reference(q, k, v), (q, k, v), do)
    for name, a, b in zip("qkv", grads, grads_ref):
        check(a, b, torch.float32, f"d{name}")


def test_zero_tokens(device):
    q, k, v = _inputs((0, 2, 12, 16), torch.float32, device)
    o = layerwise_attention(q, k, v, impl="triton")
    assert o.shape == (0, 2, 12, 16)
    (o.sum() * 1.0).backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_softmax_is_over_layers_only(device):
    # tokens are independent: perturbing token 1 must leave token 0's output untouched
    q, k, v = (t.detach() for t in _inputs((2, 1, 12, 16), torch.float32, device, seed=6))
    o1 = layerwise_attention(q, k, v, impl="triton")
    k2 = k.clone()
    k2[1] += 5.0
    o2 = layerwise_attention(q, k2, v, impl="triton")
    assert torch.equal(o1[0], o2[0])
    assert not torch.allclose(o1[1], o2[1])


def test_default_impl_switch_routes_to_triton(device):
    q, k, v = _inputs((2, 1, 3, 16), torch.float32, device)
    with use_impl("triton"):
        o = layerwise_attention(q, k, v)
    assert "unifusion_layerwise_attention_fwd" in type(o.grad_fn).__name__
    with use_impl("torch"):
        o = layerwise_attention(q, k, v)
    assert "unifusion" not in type(o.grad_fn).__name__


def test_shape_errors():
    q = torch.zeros(2, 1, 3, 16)
    with pytest.raises(ValueError, match=r"\(T, H, n, d\)"):
        layerwise_attention(q, q[:, :, :2], q, impl="torch")
    with pytest.raises(ValueError, match="dtype"):
        layerwise_attention(q, q.half(), q, impl="torch")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "thnd_from_tnhd"])
def test_torch_path_matches_reference(dtype, layout, check):
    # impl="torch" is its own implementation (SDPA on CUDA, transposed-score matmuls on CPU)
    q, k, v = _inputs((6, 2, 7, 16), dtype, "cuda" if torch.cuda.is_available() else "cpu", seed=4, layout=layout)
    o = layerwise_attention(q, k, v, impl="torch")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = layerwise_attention_reference(q, k, v)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    check(o, o_ref, dtype, "out")
    for name, a, b in zip("qkv", grads, grads_ref):
        check(a, b, dtype, f"d{name}")
