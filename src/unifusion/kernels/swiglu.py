"""SiLU-gated product ``silu(gate) * up``.

Elementwise Triton kernels over the flattened tensors; math in fp32, the backward
recomputes ``sigmoid(gate)`` instead of saving the activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton_utils import lazy_jit
from .dispatch import resolve_impl

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

BLOCK = 1024


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


# --------------------------------------------------------------------------- kernels


def _swiglu_fwd_kernel(G, U, Y, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _swiglu_bwd_kernel(DY, G, U, DG, DU, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)


_fwd = lazy_jit(_swiglu_fwd_kernel)
_bwd = lazy_jit(_swiglu_bwd_kernel)


# Triton forward/backward as torch.library custom ops (opaque to torch.compile).


@torch.library.custom_op("unifusion::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: Tensor, up: Tensor) -> Tensor:
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    if g.numel() > 0:
        _fwd[(triton.cdiv(g.numel(), BLOCK),)](g, u, y, g.numel(), BLOCK=BLOCK, num_warps=4)
    return y


@_swiglu_fwd_op.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("unifusion::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    g, u, dy = gate.contiguous(), up.contiguous(), dy.contiguous()
    dg = torch.empty_like(g)
    du = torch.empty_like(u)
    if g.numel() > 0:
        _bwd[(triton.cdiv(g.numel(), BLOCK),)](dy, g, u, dg, du, g.numel(), BLOCK=BLOCK, num_warps=4)
    return dg, du


@_swiglu_bwd_op.register_fake
def _(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    like = dict(memory_format=torch.contiguous_format)
    return torch.empty_like(gate, **like), torch.empty_like(up, **like)


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy: Tensor):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(dy, gate, up)


_swiglu_fwd_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor, *, impl: str | None = None) -> Tensor:
    """``silu(gate) * up`` computed in fp32, returned in ``gate.dtype``."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu expects gate and up of equal shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu expects gate and up of one dtype, got {gate.dtype} and {up.dtype}")
    if resolve_impl(impl, gate, up) == "torch":
        return swiglu_reference(gate, up)
    return _swiglu_fwd_op(gate, up)
