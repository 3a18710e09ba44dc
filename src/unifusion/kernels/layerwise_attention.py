"""Attention over the *layer* axis: ``q, k, v`` of shape ``(T, H, n, d)``.

Every token ``t`` and head ``h`` is an independent ``n x n`` softmax attention (n = number
of tapped encoder layers, 1..~64). SDPA on ``(T, H, n, d)`` launches one block per
``(t, h)`` on grid axes that are limited to 65535, and an eager implementation writes
the ``n x n`` probabilities to memory. The Triton kernel here:

* grid ``(cdiv(T, BLOCK_T), H)`` -- tokens on axis 0 (limit 2**31 - 1), heads on axis 1;
* each program walks its ``BLOCK_T`` tokens, loads one ``(n, d)`` tile of q, k, v per
  token (the layer axis padded to the next power of two >= 16, ``tl.dot``'s minimum, and
  masked), computes the softmax in fp32 and writes o;
* backward recomputes the probabilities from q, k (nothing but q, k, v is saved) and
  writes dq, dk, dv of its own tokens -- attention is within a token, so no atomics;
* strides are passed explicitly (non-contiguous inputs are read in place) and token
  offsets are computed in int64 (T * H * n * d exceeds 2**31 at production sizes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton_utils import dot_precision, lazy_jit, next_pow2
from .dispatch import get_impl, resolve_impl

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


def layerwise_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full softmax attention over n with scale 1/sqrt(d), fp32 accumulation."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.float()).to(q.dtype)


# --------------------------------------------------------------------------- kernels


def _lwa_fwd_kernel(
    Q,
    K,
    V,
    Out,
    T,
    n,
    d,
    sqt,
    sqh,
    sqn,
    sqd,
    skt,
    skh,
    skn,
    skd,
    svt,
    svh,
    svn,
    svd,
    sot,
    soh,
    son,
    sod,
    scale,
    BLOCK_T: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, N_PAD)
    cols = tl.arange(0, D_PAD)
    keys = tl.arange(0, N_PAD)
    tile_mask = (rows[:, None] < n) & (cols[None, :] < d)
    key_valid = keys[None, :] < n
    for i in tl.static_range(BLOCK_T):  # unrolled: the tokens' loads are independent
        t = (pid_t * BLOCK_T + i).to(tl.int64)
        # (broadcast t first: the interpreter mis-types `tensor & scalar_bool` masks)
        m = tile_mask & ((rows[:, None] * 0 + t) < T)
        q = tl.load(Q + t * sqt + h * sqh + rows[:, None] * sqn + cols[None, :] * sqd, mask=m, other=0.0)
        k = tl.load(K + t * skt + h * skh + rows[:, None] * skn + cols[None, :] * skd, mask=m, other=0.0)
        v = tl.load(V + t * svt + h * svh + rows[:, None] * svn + cols[None, :] * svd, mask=m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(key_valid, s, float("-inf"))
        s_max = tl.max(s, axis=1)
        p = tl.exp(s - s_max[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        o = tl.dot(p.to(v.dtype), v, input_precision=PREC)
        tl.store(
            Out + t * sot + h * soh + rows[:, None] * son + cols[None, :] * sod,
            o.to(Out.dtype.element_ty),
            mask=m,
        )


def _lwa_bwd_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    DK,
    DV,
    T,
    n,
    d,
    sqt,
    sqh,
    sqn,
    sqd,
    skt,
    skh,
    skn,
    skd,
    svt,
    svh,
    svn,
    svd,
    sdot,
    sdoh,
    sdon,
    sdod,
    sgt,
    sgh,
    sgn,
    sgd,
    scale,
    BLOCK_T: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    # dq, dk, dv are fresh contiguous tensors of equal shape: one stride set (sg*).
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, N_PAD)
    cols = tl.arange(0, D_PAD)
    keys = tl.arange(0, N_PAD)
    tile_mask = (rows[:, None] < n) & (cols[None, :] < d)
    key_valid = keys[None, :] < n
    for i in tl.static_range(BLOCK_T):  # unrolled: the tokens' loads are independent
        t = (pid_t * BLOCK_T + i).to(tl.int64)
        # (broadcast t first: the interpreter mis-types `tensor & scalar_bool` masks)
        m = tile_mask & ((rows[:, None] * 0 + t) < T)
        q = tl.load(Q + t * sqt + h * sqh + rows[:, None] * sqn + cols[None, :] * sqd, mask=m, other=0.0)
        k = tl.load(K + t * skt + h * skh + rows[:, None] * skn + cols[None, :] * skd, mask=m, other=0.0)
        v = tl.load(V + t * svt + h * svh + rows[:, None] * svn + cols[None, :] * svd, mask=m, other=0.0)
        do = tl.load(DO + t * sdot + h * sdoh + rows[:, None] * sdon + cols[None, :] * sdod, mask=m, other=0.0)
        # recompute the probabilities (padded query rows give finite garbage, never stored)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(key_valid, s, float("-inf"))
        s_max = tl.max(s, axis=1)
        p = tl.exp(s - s_max[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        # dv = p^T do ; dp = do v^T ; ds = p * (dp - rowsum(p * dp))
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        delta = tl.sum(p * dp, axis=1)
        ds = p * (dp - delta[:, None]) * scale
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        off = t * sgt + h * sgh + rows[:, None] * sgn + cols[None, :] * sgd
        tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=m)
        tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=m)
        tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=m)


_fwd = lazy_jit(_lwa_fwd_kernel)
_bwd = lazy_jit(_lwa_bwd_kernel)


def _config(n: int, d: int, backward: bool, elem_bytes: int = 2) -> tuple[int, int, int, int]:
    """(N_PAD, D_PAD, BLOCK_T, num_warps) -- untuned heuristic.

    Register use on sm_90 at n=12, d=128 (``python -m unifusion.kernels.compile_check``):
    bf16 forward 118, backward 166, no spills; fp32 gets half the tokens per program.
    """
    n_pad = next_pow2(n, 16)
    d_pad = next_pow2(d, 16)
    tile = n_pad * d_pad
    block_t = 4 if tile <= 2048 else 2 if tile <= 4096 else 1
    if backward:
        block_t = max(1, block_t // 2)
    if elem_bytes >= 4:
        block_t = max(1, block_t // 2)
    num_warps = 2 if tile < 2048 else 4 if tile <= 4096 else 8 if tile <= 8192 else 16
    return n_pad, d_pad, block_t, num_warps


def auto_supported(n: int, d: int, dtype: torch.dtype) -> bool:
    """Shapes for which ``impl='auto'`` picks the kernel: sm_90 builds without big register spills.

    Larger padded tiles (fp32 above 16x128, e.g. n > 16 with d > 64; 16-bit above 64x256) run with
    ``impl='triton'`` but spill; ``auto`` keeps them on the PyTorch path.
    """
    tile = next_pow2(n, 16) * next_pow2(d, 16)
    return tile <= (2048 if dtype == torch.float32 else 16384)


def _forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    T, H, n, d = q.shape
    o = torch.empty((T, H, n, d), dtype=q.dtype, device=q.device)
    if T == 0 or H == 0 or n == 0 or d == 0:
        return o
    n_pad, d_pad, block_t, num_warps = _config(n, d, backward=False, elem_bytes=q.element_size())
    grid = (triton.cdiv(T, block_t), H)
    _fwd[grid](
        q,
        k,
        v,
        o,
        T,
        n,
        d,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        1.0 / math.sqrt(d),
        BLOCK_T=block_t,
        N_PAD=n_pad,
        D_PAD=d_pad,
        PREC=dot_precision(q.dtype),
        num_warps=num_warps,
    )
    return o


def _backward(q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    T, H, n, d = q.shape
    dq = torch.empty((T, H, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if T == 0 or H == 0 or n == 0 or d == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    n_pad, d_pad, block_t, num_warps = _config(n, d, backward=True, elem_bytes=q.element_size())
    grid = (triton.cdiv(T, block_t), H)
    _bwd[grid](
        q,
        k,
        v,
        do,
        dq,
        dk,
        dv,
        T,
        n,
        d,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        *dq.stride(),
        1.0 / math.sqrt(d),
        BLOCK_T=block_t,
        N_PAD=n_pad,
        D_PAD=d_pad,
        PREC=dot_precision(q.dtype),
        num_warps=num_warps,
    )
    return dq, dk, dv


# Triton forward/backward as torch.library custom ops (opaque to torch.compile, so a compiled
# model keeps the kernels without a graph break); only q, k, v are saved for the backward
# (the probabilities are recomputed).


@torch.library.custom_op("unifusion::layerwise_attention_fwd", mutates_args=())
def _lwa_fwd_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _forward(q, k, v)


@_lwa_fwd_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("unifusion::layerwise_attention_bwd", mutates_args=())
def _lwa_bwd_op(q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(q, k, v, do)


@_lwa_bwd_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _lwa_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _lwa_backward(ctx, do: Tensor):
    q, k, v = ctx.saved_tensors
    return _lwa_bwd_op(q, k, v, do)


_lwa_fwd_op.register_autograd(_lwa_backward, setup_context=_lwa_setup)

# SDPA's CUDA kernels put the batch on a grid axis limited to 65535 blocks
_CUDA_SDPA_CHUNK = 32768


def _layerwise_attention_torch(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The PyTorch path.

    CUDA: fused SDPA with batch = tokens (no materialised probabilities), the token axis
    chunked under the grid limit. CPU: batched matmuls + softmax in fp32, which for n x n
    tiles of a few layers beat SDPA's flash kernel (its backward especially; diffusers'
    Krea-2 uses it). The scores are built transposed, keys on dim -2: a softmax over the
    innermost dim of a handful of layers barely vectorises, one over dim -2 vectorises
    across the queries (~3x faster at n = 7), and ``p^T`` feeds the second matmul as a view.
    """
    if not q.is_cuda:
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores_t = torch.matmul(k.float(), q.float().transpose(-1, -2)).mul_(scale)  # (T, H, n_keys, n_queries)
        probs = torch.softmax(scores_t, dim=-2).transpose(-1, -2)
        return torch.matmul(probs, v.float()).to(q.dtype)
    if q.shape[0] <= _CUDA_SDPA_CHUNK:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                q[i : i + _CUDA_SDPA_CHUNK], k[i : i + _CUDA_SDPA_CHUNK], v[i : i + _CUDA_SDPA_CHUNK]
            )
            for i in range(0, q.shape[0], _CUDA_SDPA_CHUNK)
        ]
    )


def layerwise_attention(q: Tensor, k: Tensor, v: Tensor, *, impl: str | None = None) -> Tensor:
    """Softmax attention over the layer axis of ``(T, H, n, d)`` tensors, scale ``1/sqrt(d)``.

    ``impl``: ``"torch"`` (SDPA on CUDA, batched matmuls on CPU), ``"triton"`` (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), ``"auto"`` (Triton on CUDA, else torch) or None for the
    process default (:func:`unifusion.kernels.get_impl`). :func:`layerwise_attention_reference`
    is the fp32 oracle the tests compare both paths with.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"layerwise_attention expects q, k, v of equal shape (T, H, n, d); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"layerwise_attention expects one dtype for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    choice = resolve_impl(impl, q, k, v)
    if choice == "triton" and (impl or get_impl()) == "auto" and not auto_supported(q.shape[2], q.shape[3], q.dtype):
        choice = "torch"
    if choice == "torch":
        return _layerwise_attention_torch(q, k, v)
    return _lwa_fwd_op(q, k, v)
