"""RMSNorm over the last dimension with fp32 statistics.

Triton forward: one program per row, fp32 mean of squares, stores ``rstd`` (fp32, one
per row) for the backward. Triton backward: a fixed number of programs each walks a
contiguous chunk of rows, writes ``dx`` and accumulates its own fp32 partial of
``dweight``; the partials are summed by torch afterwards (no atomics, deterministic).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_utils import lazy_jit, next_pow2, num_programs_for_reduction
from .dispatch import resolve_impl

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------- kernels


def _rms_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    y = x * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


def _rms_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_N,), 1.0, tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, M)
    # advance row pointers (int64 via the pointer arithmetic) instead of casting the loop index
    first = start.to(tl.int64)
    x_row = X + first * stride_x
    dy_row = DY + first * stride_dy
    dx_row = DX + first * stride_dx
    rstd_row = RSTD + first
    for _ in range(start, end):
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_row)
        xhat = x * rstd
        dyw = dy * w
        dx = rstd * (dyw - xhat * (tl.sum(dyw * xhat, axis=0) / N))
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
        x_row += stride_x
        dy_row += stride_dy
        dx_row += stride_dx
        rstd_row += 1
        dw += dy * xhat
    if HAS_W:
        tl.store(DW_PARTIAL + pid * BLOCK_N + cols, dw, mask=mask)


_fwd = lazy_jit(_rms_fwd_kernel)
_bwd = lazy_jit(_rms_bwd_kernel)


def _num_warps(block_n: int) -> int:
    return 8 if block_n >= 4096 else 4 if block_n >= 1024 else 2


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --------------------------------------------------------------------------- triton ops
# Registered as torch.library custom ops (opaque to torch.compile: no graph break, the
# compiled graph calls them like any aten op); autograd via register_autograd.


@torch.library.custom_op("unifusion::rms_norm_fwd", mutates_args=())
def _rms_fwd_op(x2: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x2.device)
    block_n = next_pow2(N)
    if M > 0 and N > 0:
        _fwd[(M,)](
            x2,
            weight if weight is not None else x2,
            y,
            rstd,
            x2.stride(0),
            y.stride(0),
            N,
            eps,
            HAS_W=weight is not None,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_n),
        )
    return y, rstd


@_rms_fwd_op.register_fake
def _(x2: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return x2.new_empty(x2.shape), x2.new_empty(x2.shape[:1], dtype=torch.float32)


@torch.library.custom_op("unifusion::rms_norm_bwd", mutates_args=())
def _rms_bwd_op(dy2: Tensor, x2: Tensor, weight: Tensor | None, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """-> ``dx (M, N)`` and ``dweight (N,)`` (an empty tensor without weight)."""
    M, N = x2.shape
    dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    block_n = next_pow2(N)
    programs = num_programs_for_reduction(x2.device, M)
    has_w = weight is not None
    dw_partial = torch.zeros((programs, block_n) if has_w else (1,), dtype=torch.float32, device=x2.device)
    if M > 0 and N > 0:
        _bwd[(programs,)](
            dy2,
            x2,
            weight if has_w else x2,
            rstd,
            dx,
            dw_partial,
            dy2.stride(0),
            x2.stride(0),
            dx.stride(0),
            M,
            N,
            triton.cdiv(M, programs),
            HAS_W=has_w,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_n),
        )
    dw = dw_partial.sum(0)[:N].to(weight.dtype) if has_w else x2.new_empty((0,))
    return dx, dw


@_rms_bwd_op.register_fake
def _(dy2: Tensor, x2: Tensor, weight: Tensor | None, rstd: Tensor) -> tuple[Tensor, Tensor]:
    dw = weight.new_empty(weight.shape) if weight is not None else x2.new_empty((0,))
    return x2.new_empty(x2.shape), dw


def _rms_setup(ctx, inputs, output) -> None:
    x2, weight, _ = inputs
    ctx.save_for_backward(x2, weight, output[1])


def _rms_backward(ctx, dy: Tensor, _drstd: Tensor):
    x2, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_bwd_op(_rows(dy), x2, weight, rstd)
    return dx, (dw if weight is not None else None), None


_rms_fwd_op.register_autograd(_rms_backward, setup_context=_rms_setup)


def _rms_norm_triton(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    y, _ = _rms_fwd_op(_rows(x), weight, float(eps))
    return y.view(x.shape)


# --------------------------------------------------------------------------- torch path


class RMSNormTorchFunction(torch.autograd.Function):
    """The PyTorch path, with a hand-written backward.

    Autograd through the composite ``x * rsqrt(mean(x**2)) * w`` (``F.rms_norm`` is composite
    on CPU too) records ~10 elementwise ops and replays them backwards; here the forward
    is one norm reduction and one scaling pass, the backward one ``addcmul`` for ``dx``
    and a matrix-vector product for ``dweight``. ``weight`` may be ``(N,)`` or any trailing
    shape of ``x`` (``(n, N)``: per-layer scales). Math in fp32, output in ``x.dtype``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        xf = x.float()
        # ||x|| in one pass (no x**2 temporary); rstd = 1 / sqrt(||x||^2 / N + eps) per row
        rstd = torch.linalg.vector_norm(xf, 2, -1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        y = xf * rstd
        if weight is not None:
            y.mul_(weight.float())
        ctx.save_for_backward(x, weight, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf, dyf = x.float(), dy.float()
        n = x.shape[-1]
        g = dyf * weight.float() if weight is not None else dyf
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dx = rstd * (g - xhat * mean(g * xhat)) = rstd * g - x * (rstd^3 * <g, x> / N)
            coef = torch.linalg.vecdot(g, xf, dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(-n)
            dx = torch.addcmul(g * rstd, xf, coef).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            # dweight = sum over the leading dims of dy * x * rstd
            if weight.dim() == 1:
                dw = torch.mv((dyf * xf).reshape(-1, n).t(), rstd.reshape(-1))
            else:
                lead = tuple(range(x.dim() - weight.dim()))
                dw = (dyf * xf).mul_(rstd).sum(dim=lead) if lead else (dyf * xf).mul_(rstd)
            dw = dw.to(weight.dtype)
        return dx, dw, None


def _rms_norm_torch(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return RMSNormTorchFunction.apply(x, weight, eps)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6, *, impl: str | None = None) -> Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` with fp32 statistics; output in ``x.dtype``.

    ``weight``: ``(N,)``, a trailing shape of ``x`` such as ``(n, N)`` (one scale per layer of a
    ``(T, n, N)`` stack), or None.
    """
    if weight is not None and (weight.dim() == 0 or weight.shape != x.shape[x.dim() - weight.dim() :]):
        raise ValueError(
            f"rms_norm weight must have shape ({x.shape[-1]},) or a trailing shape of x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    tensors = (x,) if weight is None else (x, weight)
    if resolve_impl(impl, *tensors) == "torch":
        return _rms_norm_torch(x, weight, eps)
    if weight is not None and weight.dim() > 1:
        # the kernel takes a 1-D scale; apply a per-layer scale by broadcast
        return _rms_norm_triton(x, None, eps) * weight.to(x.dtype)
    return _rms_norm_triton(x, weight, eps)
