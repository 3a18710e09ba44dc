"""swiglu: Triton (interpreter on CPU) vs the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import ALL_DTYPES

from unifusion.kernels import swiglu, swiglu_reference

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(0, 8), (7,), (3, 5, 130), (2, 1100)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(shape, contiguous, dtype, device, check):
    g = torch.Generator().manual_seed(0)
    if contiguous:
        gate = (torch.randn(shape, generator=g) * 4).to(device, dtype).requires_grad_()
        up = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    else:
        gate = (torch.randn(*shape, 2, generator=g) * 4).to(device, dtype)[..., 0].detach().requires_grad_()
        up = torch.randn(*reversed(shape), generator=g).to(device, dtype).permute(*reversed(range(len(shape))))
        up = up.detach().requires_grad_()
        assert gate.numel() == 0 or not gate.is_contiguous()
    dy = torch.randn(shape, generator=g).to(device, dtype)
    y = swiglu(gate, up, impl="triton")
    y_ref = swiglu_reference(gate, up)
    check(y, y_ref, dtype, "out")
    grads = torch.autograd.grad(y, (gate, up), dy)
    grads_ref = torch.autograd.grad(y_ref, (gate, up), dy)
    check(grads[0], grads_ref[0], dtype, "dgate")
    check(grads[1], grads_ref[1], dtype, "dup")


def test_errors():
    with pytest.raises(ValueError, match="equal shape"):
        swiglu(torch.zeros(2, 3), torch.zeros(3, 2), impl="torch")
    with pytest.raises(ValueError, match="one dtype"):
        swiglu(torch.zeros(2), torch.zeros(2, dtype=torch.float16), impl="torch")
