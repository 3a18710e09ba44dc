"""layer_pool: Triton (interpreter on CPU) vs the PyTorch reference and nn.Linear(n, 1)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import ALL_DTYPES

from unifusion.kernels import layer_pool, layer_pool_reference

pytestmark = pytest.mark.kernels


def _run(fn, x, w, b, dy):
    y = fn(x, w, b)
    inputs = (x, w) if b is None else (x, w, b)
    return y, torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", [1, 3, 12, 17])
@pytest.mark.parametrize("H,T", [(16, 5), (40, 33)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(n, H, T, with_bias, dtype, device, check):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(T, n, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(n, generator=g) / n).to(device, dtype).requires_grad_()
    b = torch.randn((), generator=g).to(device, dtype).requires_grad_() if with_bias else None
    dy = torch.randn(T, H, generator=g).to(device, dtype)
    y, grads = _run(lambda *a: layer_pool(*a, impl="triton"), x, w, b, dy)
    y_ref, grads_ref = _run(layer_pool_reference, x, w, b, dy)
    check(y, y_ref, dtype, "out")
    check(grads[0], grads_ref[0], dtype, "dx")
    # dw and db reduce over T * H products
    red_atol = 1e-4 if dtype == torch.float32 else 0.1
    for name, a, r in zip(("dw", "db"), grads[1:], grads_ref[1:]):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        torch.testing.assert_close(a.float(), r.float(), atol=red_atol, rtol=1e-2)


def test_non_contiguous_matches_linear(device, check):
    # x as it comes out of a (B*S, H, n)-major buffer; equals nn.Linear(n, 1) over x.transpose(1, 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 24, 12, generator=g).to(device).transpose(1, 2).requires_grad_()  # (6, 12, 24)
    linear = torch.nn.Linear(12, 1).to(device)
    y = layer_pool(x, linear.weight[0], linear.bias, impl="triton")
    y_lin = linear(x.transpose(1, 2)).squeeze(-1)
    check(y, y_lin, torch.float32, "out")
    y.sum().backward()
    gx, gw, gb = x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()
    x.grad = None
    linear.zero_grad()
    y_lin.sum().backward()
    check(gx, x.grad, torch.float32, "dx")
    torch.testing.assert_close(gw, linear.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb, linear.bias.grad, atol=1e-4, rtol=1e-4)


def test_zero_tokens(device):
    x = torch.zeros(0, 3, 16, device=device, requires_grad=True)
    w = torch.ones(3, device=device, requires_grad=True)
    y = layer_pool(x, w, impl="triton")
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3, device=device))


def test_errors():
    with pytest.raises(ValueError, match=r"\(T, n, H\)"):
        layer_pool(torch.zeros(2, 3), torch.zeros(3), impl="torch")
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_pool(torch.zeros(2, 3, 4), torch.zeros(4), impl="torch")
    with pytest.raises(ValueError, match="scalar"):
        layer_pool(torch.zeros(2, 3, 4), torch.zeros(3), torch.zeros(2), impl="torch")
