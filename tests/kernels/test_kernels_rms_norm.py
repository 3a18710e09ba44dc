"""rms_norm: Triton (interpreter on CPU) vs the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import ALL_DTYPES, CPU_DTYPES

from unifusion.kernels import rms_norm, rms_norm_reference

pytestmark = pytest.mark.kernels


def _grads(fn, x, w, dy):
    y = fn(x, w)
    inputs = (x,) if w is None else (x, w)
    return y, torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 48), (17, 100)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_matches_reference(shape, with_weight, dtype, device, check):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, dtype).requires_grad_() if with_weight else None
    dy = torch.randn(shape, generator=g).to(device, dtype)
    y, grads = _grads(lambda a, b: rms_norm(a, b, 1e-6, impl="triton"), x, w, dy)
    y_ref, grads_ref = _grads(lambda a, b: rms_norm_reference(a, b, 1e-6), x, w, dy)
    check(y, y_ref, dtype, "out")
    check(grads[0], grads_ref[0], dtype, "dx")
    if with_weight:
        # dweight sums over all rows: compare with a tolerance scaled by the row count
        atol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(grads[1].float(), grads_ref[1].float(), atol=atol, rtol=1e-2)
        assert grads[1].dtype == w.dtype


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_non_contiguous_and_many_rows(dtype, device, check):
    # rows spread over several reduction programs; x is a transposed view
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 9, generator=g).to(device, dtype).t().requires_grad_()  # (9, 32), stride (1, 9)
    w = torch.randn(32, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(32, 9, generator=g).to(device, dtype).t()
    y, (dx, dw) = _grads(lambda a, b: rms_norm(a, b, 1e-5, impl="triton"), x, w, dy)
    y_ref, (dx_ref, dw_ref) = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w, dy)
    check(y, y_ref, dtype, "out")
    check(dx, dx_ref, dtype, "dx")
    torch.testing.assert_close(dw.float(), dw_ref.float(), atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=1e-2)


def test_zero_rows(device):
    x = torch.zeros(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    y = rms_norm(x, w, impl="triton")
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16, device=device))


def test_weight_shape_error():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.zeros(2, 8), torch.ones(4), impl="torch")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("weight_shape", [(48,), (4, 48), None])
def test_torch_path_and_per_layer_weights_match_reference(impl, weight_shape, dtype, device, check):
    # impl="torch" has its own backward; a trailing-shape weight (n, H) scales each layer separately
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, 48, generator=g) * 3).to(device, dtype)
    x = x.transpose(0, 1).requires_grad_()  # non-contiguous rows
    w = None
    if weight_shape is not None:
        w = (1 + 0.5 * torch.randn(weight_shape, generator=g)).to(device, dtype).requires_grad_()
    if w is not None and w.dim() == 2:
        x = x.transpose(0, 1).detach().requires_grad_()  # (3, 4, 48): the (4, 48) weight matches the last dims
    dy = torch.randn(x.shape, generator=g).to(device, dtype)

    def ref(a, b):
        if b is not None and b.dim() == 2:
            return rms_norm_reference(a, None, 1e-6) * b
        return rms_norm_reference(a, b, 1e-6)

    y, grads = _grads(lambda a, b: rms_norm(a, b, 1e-6, impl=impl), x, w, dy)
    y_ref, grads_ref = _grads(ref, x, w, dy)
    check(y, y_ref, dtype, "out")
    for name, a, b in zip(("dx", "dweight"), grads, grads_ref):
        check(a, b, dtype, name)


def test_trailing_weight_shape_error():
    with pytest.raises(ValueError, match="trailing shape"):
        rms_norm(torch.zeros(2, 3, 8), torch.ones(2, 8), impl="torch")
