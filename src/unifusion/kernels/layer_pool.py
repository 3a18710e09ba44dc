"""Learned weighted pooling over the layer axis: ``y[t, h] = sum_i w[i] * x[t, i, h] + b``.

This is the last step of LAP (paper: "a linear layer pools n -> 1"). diffusers'
``Krea2TextFusion`` does it as ``x.permute(0, 1, 3, 2) @ Linear(n, 1)``, which
materialises a permuted copy of the whole ``(B, S, H, n)`` stack (and its gradient).
The kernel reads ``x`` in its natural ``(T, n, H)`` layout (any strides), accumulates in
fp32 and writes ``(T, H)``; the backward writes ``dx = w[i] * dy`` and per-program fp32
partials of ``dw`` that torch sums (no atomics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_utils import lazy_jit, next_pow2
from .dispatch import resolve_impl

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


def layer_pool_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(T, n, H), (n,), () | (1,) | None -> (T, H)`` in fp32, returned in ``x.dtype``."""
    y = torch.einsum("tnh,n->th", x.float(), weight.float())
    if bias is not None:
        y = y + bias.float().reshape(())
    return y.to(x.dtype)


# --------------------------------------------------------------------------- kernels


def _pool_fwd_kernel(
    X,
    W,
    B,
    Y,
    T,
    n,
    H,
    sxt,
    sxn,
    sxh,
    HAS_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    hid = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tok[:, None] < T) & (hid[None, :] < H)
    ptrs = X + tok[:, None] * sxt + hid[None, :] * sxh
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for i in range(n):
        w = tl.load(W + i).to(tl.float32)
        acc += w * tl.load(ptrs + i * sxn, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        acc += tl.load(B).to(tl.float32)
    tl.store(Y + tok[:, None] * H + hid[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def _pool_bwd_kernel(
    X,
    W,
    DY,
    DX,
    DW_PARTIAL,
    T,
    n,
    H,
    sxt,
    sxn,
    sxh,
    sdyt,
    sdyh,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    N_PAD: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    tok = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    hid = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tok[:, None] < T) & (hid[None, :] < H)
    dy = tl.load(DY + tok[:, None] * sdyt + hid[None, :] * sdyh, mask=mask, other=0.0).to(tl.float32)
    x_ptrs = X + tok[:, None] * sxt + hid[None, :] * sxh
    # dx is a fresh contiguous (T, n, H) tensor
    dx_ptrs = DX + tok[:, None] * (n * H) + hid[None, :]
    part = (pid_t * tl.num_programs(1) + pid_h).to(tl.int64) * N_PAD
    for i in range(n):
        w = tl.load(W + i).to(tl.float32)
        tl.store(dx_ptrs + i * H, (w * dy).to(DX.dtype.element_ty), mask=mask)
        x = tl.load(x_ptrs + i * sxn, mask=mask, other=0.0).to(tl.float32)
        tl.store(DW_PARTIAL + part + i, tl.sum(tl.sum(x * dy, axis=1), axis=0))


_fwd = lazy_jit(_pool_fwd_kernel)
_bwd = lazy_jit(_pool_bwd_kernel)


def _blocks(T: int, H: int) -> tuple[int, int]:
    block_h = min(256, next_pow2(H, 16))
    block_t = max(1, min(16, 2048 // block_h, next_pow2(T)))
    return block_t, block_h


# Triton forward/backward as torch.library custom ops (opaque to torch.compile).


@torch.library.custom_op("unifusion::layer_pool_fwd", mutates_args=())
def _pool_fwd_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    T, n, H = x.shape
    y = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T > 0 and H > 0:
        block_t, block_h = _blocks(T, H)
        grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
        _fwd[grid](
            x,
            weight,
            bias if bias is not None else weight,
            y,
            T,
            n,
            H,
            *x.stride(),
            HAS_B=bias is not None,
            BLOCK_T=block_t,
            BLOCK_H=block_h,
        )
    return y


@_pool_fwd_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[2]))


@torch.library.custom_op("unifusion::layer_pool_bwd", mutates_args=())
def _pool_bwd_op(x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """-> ``dx (T, n, H)``, ``dweight (n,)``."""
    T, n, H = x.shape
    dx = torch.empty((T, n, H), dtype=x.dtype, device=x.device)
    dw = torch.zeros_like(weight)
    if T > 0 and H > 0 and n > 0:
        block_t, block_h = _blocks(T, H)
        grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
        n_pad = next_pow2(n)
        partial = torch.empty((grid[0] * grid[1], n_pad), dtype=torch.float32, device=x.device)
        _bwd[grid](
            x,
            weight,
            dy,
            dx,
            partial,
            T,
            n,
            H,
            *x.stride(),
            *dy.stride(),
            BLOCK_T=block_t,
            BLOCK_H=block_h,
            N_PAD=n_pad,
        )
        dw = partial[:, :n].sum(0).to(weight.dtype)
    elif n > 0:
        dx.zero_()
    return dx, dw


@_pool_bwd_op.register_fake
def _(x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _pool_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.bias_shape = bias.shape if bias is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight)


def _pool_backward(ctx, dy: Tensor):
    x, weight = ctx.saved_tensors
    dx, dw = _pool_bwd_op(x, weight, dy)
    db = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.float().sum().reshape(ctx.bias_shape).to(ctx.bias_dtype)
    return dx, dw, db


_pool_fwd_op.register_autograd(_pool_backward, setup_context=_pool_setup)


def layer_pool(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, impl: str | None = None) -> Tensor:
    """Pool the layer axis of ``x (T, n, H)`` with weights ``(n,)`` (+ scalar bias) -> ``(T, H)``.

    Equivalent to ``nn.Linear(n, 1)`` applied over ``x.transpose(1, 2)`` without the copy.
    """
    if x.dim() != 3:
        raise ValueError(f"layer_pool expects x of shape (T, n, H), got {tuple(x.shape)}")
    if weight.shape != (x.shape[1],):
        raise ValueError(
            f"layer_pool weight must have shape ({x.shape[1]},) for n={x.shape[1]}, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.numel() != 1:
        raise ValueError(f"layer_pool bias must be a scalar (shape () or (1,)), got {tuple(bias.shape)}")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if resolve_impl(impl, *tensors) == "torch":
        return layer_pool_reference(x, weight, bias)
    return _pool_fwd_op(x, weight, bias)
