"""Shared transformer building blocks for conditioners, refiners and the DiT.

Every numeric hot spot goes through the :mod:`unifusion.kernels` op API
(``rms_norm``, ``swiglu``, ``layerwise_attention``, ``layer_pool``). Each module that
calls an op carries its own ``kernel_impl`` (:class:`KernelImplMixin`; None = the
process default :func:`unifusion.kernels.get_impl`) and passes it as ``impl=``:
:func:`set_kernel_impl` / :func:`use_kernel_impl` switch a whole model part, so two
models (or a model's training and sampling) can use different implementations in one
process.

Two attention flavours:

* :class:`SequenceAttention` attends over the *token* axis ``(B, S, D)`` with
  PyTorch SDPA and a boolean key-padding mask (refiner, ParaUni, DiT).
* :class:`LayerwiseAttention` attends over the *layer* axis ``(T, n, H)`` of one token's
  stacked encoder states (LAP, paper §2.1 and App. A.1); every layer is valid, so it
  needs no mask and calls :func:`unifusion.kernels.layerwise_attention`.

Block defaults follow paper App. A.1: RMSNorm before *and* after self-attention
("sandwich" norm), then a SiLU-gated feed-forward with a 1.3x expansion. Options
(``post_norm=False``, ``gated_attn=True``, ``num_kv_heads``) reproduce the Krea-2
text-fusion block exactly (see :mod:`unifusion.conditioners.krea2`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unifusion import kernels

__all__ = [
    "FeedForward",
    "KernelImplMixin",
    "LayerwiseAttention",
    "LayerwiseAttentionBlock",
    "PerLayerRMSNorm",
    "RMSNorm",
    "SequenceAttention",
    "TransformerBlock",
    "apply_rope",
    "ffn_hidden_size",
    "gather_tokens",
    "key_padding_mask",
    "pack_tokens",
    "resolve_layer_ids",
    "scatter_tokens",
    "set_kernel_impl",
    "take_layers",
    "unpack_tokens",
    "use_kernel_impl",
]


def ffn_hidden_size(dim: int, mult: float, multiple_of: int = 1) -> int:
    """Hidden width of a feed-forward layer: ``round(dim * mult)`` rounded up to ``multiple_of``."""
    hidden = max(1, int(round(dim * mult)))
    return multiple_of * math.ceil(hidden / multiple_of)


class KernelImplMixin:
    """Marks a module that calls :mod:`unifusion.kernels` ops with ``impl=self.kernel_impl``.

    ``kernel_impl``: ``"torch" | "triton" | "auto"``, or None for the process default
    (:func:`unifusion.kernels.get_impl`). Set it for a whole model part with
    :func:`set_kernel_impl`; torch.compile guards on it (a change recompiles).
    """

    kernel_impl: str | None = None


def _kernel_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, KernelImplMixin)]


def _check_impl(impl: str | None) -> str | None:
    if impl is not None and impl not in kernels.IMPLS:
        raise ValueError(f"kernel_impl must be one of {kernels.IMPLS} or None, got {impl!r}")
    return impl


def set_kernel_impl(module: nn.Module, impl: str | None) -> None:
    """Use kernel implementation ``impl`` in every submodule of ``module`` that calls a kernel op.

    ``impl``: ``"torch" | "triton" | "auto"``, or None to follow the process default
    (:func:`unifusion.kernels.get_impl`). Only ``module``'s own submodules change, so
    another model in the same process keeps its choice.
    """
    _check_impl(impl)
    for m in _kernel_modules(module):
        m.kernel_impl = impl


@contextlib.contextmanager
def use_kernel_impl(module: nn.Module, impl: str | None) -> Iterator[nn.Module]:
    """Temporarily :func:`set_kernel_impl` ``(module, impl)``; each submodule's own choice is restored on exit.

    E.g. training with ``triton`` under the CPU interpreter but sampling previews with ``torch``.
    """
    _check_impl(impl)
    mods = _kernel_modules(module)
    saved = [m.kernel_impl for m in mods]
    try:
        for m in mods:
            m.kernel_impl = impl
        yield module
    finally:
        for m, old in zip(mods, saved):
            m.kernel_impl = old


class RMSNorm(KernelImplMixin, nn.Module):
    """RMSNorm over the last dim through :func:`unifusion.kernels.rms_norm` (fp32 statistics).

    ``elementwise_affine=False`` gives the parameter-free norm the DiT's adaLN modulates.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, impl=self.kernel_impl)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"


class PerLayerRMSNorm(KernelImplMixin, nn.Module):
    """A separate RMSNorm (own scale) for each of ``n`` stacked encoder layers, input ``(..., n, H)``.

    Hidden states of different VLM depths have very different scales (and random tiny
    VLMs even more so; see the quickstart feasibility note), so multi-layer conditioners
    normalise each tap before mixing them.
    """

    def __init__(self, num_layers: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_layers, dim))

    def forward(self, x: Tensor) -> Tensor:
        # the (n, H) per-layer scale is a trailing-shape weight: one fused op, no extra scaling pass
        return kernels.rms_norm(x, self.weight, self.eps, impl=self.kernel_impl)


class FeedForward(KernelImplMixin, nn.Module):
    """SiLU feed-forward (paper App. A.1: SiLU, expand and contract by 1.3x).

    ``gated=True`` (default) is SwiGLU, ``down(silu(gate(x)) * up(x))`` through
    :func:`unifusion.kernels.swiglu`; ``gated=False`` is the plain ``down(silu(up(x)))``.
    ``hidden_dim`` overrides ``mult`` (Krea-2 gives an explicit intermediate size);
    ``multiple_of`` rounds the width from ``mult`` up (LLaMA's ``multiple_of``).
    """

    def __init__(
        self,
        dim: int,
        mult: float = 1.3,
        hidden_dim: int | None = None,
        gated: bool = True,
        bias: bool = False,
        multiple_of: int = 1,
    ) -> None:
        super().__init__()
        hidden = hidden_dim if hidden_dim is not None else ffn_hidden_size(dim, mult, multiple_of)
        self.gated = gated
        self.hidden_dim = hidden
        self.gate = nn.Linear(dim, hidden, bias=bias) if gated else None
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(kernels.swiglu(self.gate(x), self.up(x), impl=self.kernel_impl))
        return self.down(F.silu(self.up(x)))


def key_padding_mask(mask: Tensor | None) -> Tensor | None:
    """``(B, S)`` True=real -> SDPA boolean mask ``(B, 1, 1, S)`` True=attend.

    A sample with no real token would give an all-False row and NaN from the softmax;
    such rows attend to everything instead (their outputs are padding and get zeroed
    by the caller), which keeps every other sample and the gradients finite.
    """
    if mask is None:
        return None
    mask = mask.bool()
    safe = mask | ~mask.any(dim=1, keepdim=True)
    return safe[:, None, None, :]


class _RoPE(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` in three passes, backward in three.

    ``rotate_half(x) = cat(-x2, x1)`` equals ``roll(x, d/2) * [-1 ... +1]``, so with the sign
    folded into ``sin`` the rotation is one ``roll`` (its own inverse for a half-split) and
    one ``addcmul``; autograd through the composite records ~5 ops and replays ~7.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        xf = x.float()
        out = torch.addcmul(xf * cos, xf.roll(half, dims=-1), sin_signed)
        ctx.save_for_backward(cos, sin_signed)
        ctx.half = half
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin_signed = ctx.saved_tensors
        g = grad.float()
        dx = torch.addcmul((g * sin_signed).roll(ctx.half, dims=-1), g, cos)
        return dx.to(grad.dtype), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (B, heads, L, d)`` by angles given as ``cos, sin (L, d)`` (half-split pairs).

    Dims ``j`` and ``j + d/2`` form a rotation pair; rows with ``cos=1, sin=0`` pass
    unchanged (the DiT uses that for its conditioning prefix). Math in fp32. Gradients flow
    to ``x`` only (the angles are constants).
    """
    half = x.shape[-1] // 2
    sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).float()
    return _RoPE.apply(x, cos.float(), sin_signed)


def _expand_kv_heads(t: Tensor, groups: int) -> Tensor:
    # repeat K/V heads for grouped-query attention (heads dim 1); SDPA's enable_gqa does not
    # combine with a mask on every backend, so repeat explicitly like diffusers' Krea-2
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


class _AttentionProjections(nn.Module):
    """Q/K/V(/gate)/out projections with optional QK-norm and grouped-query heads."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        qk_norm: bool = True,
        gated: bool = False,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.to_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.to_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        # sigmoid output gate (Krea-2 / gated attention); off for the paper's plain blocks
        self.to_gate = nn.Linear(dim, dim, bias=bias) if gated else None
        self.norm_q = RMSNorm(self.head_dim, eps=eps) if qk_norm else None
        self.norm_k = RMSNorm(self.head_dim, eps=eps) if qk_norm else None
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Heads-first ``(..., heads, L, head_dim)`` Q, K, V for ``x (..., L, dim)``; K/V heads expanded."""
        lead = x.shape[:-1]
        q = self.to_q(x).view(*lead, self.num_heads, self.head_dim)
        k = self.to_k(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.to_v(x).view(*lead, self.num_kv_heads, self.head_dim)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))
        groups = self.num_heads // self.num_kv_heads
        return q, _expand_kv_heads(k, groups), _expand_kv_heads(v, groups)

    def output(self, attn: Tensor, x: Tensor) -> Tensor:
        """``attn (..., heads, L, head_dim)`` -> ``(..., L, dim)``, gated and projected."""
        out = attn.transpose(-2, -3).flatten(-2)
        if self.to_gate is not None:
            out = out * torch.sigmoid(self.to_gate(x))
        return self.to_out(out)


class SequenceAttention(_AttentionProjections):
    """Self-attention over the sequence of ``(B, L, dim)`` with a boolean key-padding mask.

    Optional ``rope=(cos, sin)`` rotates Q and K (DiT image tokens), and ``extra_kv``
    ``(K, V)`` of shape ``(B, heads, S, head_dim)`` is appended to the keys/values with
    its own key mask (KV-fusion, paper §2.1).
    """

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        extra_kv: tuple[Tensor, Tensor] | None = None,
        extra_mask: Tensor | None = None,
    ) -> Tensor:
        q, k, v = self.qkv(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        b, length = x.shape[0], x.shape[1]
        if extra_kv is not None:
            ek, ev = extra_kv
            if ek.shape[1] != self.num_heads or ek.shape[-1] != self.head_dim:
                raise ValueError(
                    f"extra K/V must be (B, {self.num_heads}, S, {self.head_dim}) for this attention, "
                    f"got {tuple(ek.shape)}"
                )
            k = torch.cat([k, ek.to(k.dtype)], dim=2)
            v = torch.cat([v, ev.to(v.dtype)], dim=2)
            own = mask if mask is not None else x.new_ones(b, length, dtype=torch.bool)
            other = extra_mask if extra_mask is not None else x.new_ones(b, ek.shape[2], dtype=torch.bool)
            mask = torch.cat([own.bool(), other.bool()], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask(mask))
        return self.output(out, x)


class LayerwiseAttention(KernelImplMixin, _AttentionProjections):
    """Self-attention across the *layer* axis of ``(T, n, H)`` (one row per token; paper §2.1 LAP).

    Calls :func:`unifusion.kernels.layerwise_attention` on ``(T, heads, n, head_dim)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x)
        # the kernel takes strided (T, heads, n, d) views, so no copy is made here
        return self.output(kernels.layerwise_attention(q, k, v, impl=self.kernel_impl), x)


class _Block(nn.Module):
    """Pre-norm residual block; optional RMSNorm after attention (paper App. A.1)."""

    def __init__(
        self,
        attn: nn.Module,
        dim: int,
        mlp_ratio: float,
        ffn_hidden_dim: int | None,
        post_norm: bool,
        gated_ffn: bool,
        bias: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=eps)
        self.attn = attn
        # "RMS normalization before and after self-attention" (App. A.1): sandwich norm on the branch
        self.post_attn_norm = RMSNorm(dim, eps=eps) if post_norm else None
        self.norm2 = RMSNorm(dim, eps=eps)
        self.ff = FeedForward(dim, mult=mlp_ratio, hidden_dim=ffn_hidden_dim, gated=gated_ffn, bias=bias)

    def _attn_branch(self, h: Tensor) -> Tensor:
        return self.post_attn_norm(h) if self.post_attn_norm is not None else h


class TransformerBlock(_Block):
    """Bidirectional transformer block over the sequence ``(B, L, dim)``, padding-aware.

    Used by the refiner (paper §3.2, App. A.3) and ParaUni's layer-integration module.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        mlp_ratio: float = 1.3,
        ffn_hidden_dim: int | None = None,
        qk_norm: bool = True,
        post_norm: bool = True,
        gated_attn: bool = False,
        gated_ffn: bool = True,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        attn = SequenceAttention(dim, num_heads, num_kv_heads, qk_norm=qk_norm, gated=gated_attn, bias=bias, eps=eps)
        super().__init__(attn, dim, mlp_ratio, ffn_hidden_dim, post_norm, gated_ffn, bias, eps)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self._attn_branch(self.attn(self.norm1(x), mask=mask))
        return x + self.ff(self.norm2(x))


class LayerwiseAttentionBlock(_Block):
    """Transformer block attending across the layer axis of ``(T, n, H)`` (paper §2.1, App. A.1).

    Defaults are the paper's: 32 heads, RMSNorm before and after self-attention, SiLU
    (SwiGLU) feed-forward with 1.3x expansion. ``T`` is the number of *real* tokens:
    callers gather unpadded tokens first (:func:`gather_tokens`), so no mask is needed.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        mlp_ratio: float = 1.3,
        ffn_hidden_dim: int | None = None,
        qk_norm: bool = True,
        post_norm: bool = True,
        gated_attn: bool = False,
        gated_ffn: bool = True,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        attn = LayerwiseAttention(dim, num_heads, num_kv_heads, qk_norm=qk_norm, gated=gated_attn, bias=bias, eps=eps)
        super().__init__(attn, dim, mlp_ratio, ffn_hidden_dim, post_norm, gated_ffn, bias, eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._attn_branch(self.attn(self.norm1(x)))
        return x + self.ff(self.norm2(x))


def gather_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """``x (B, S, ...)`` -> ``(T, ...)`` of the tokens where ``mask (B, S)`` is True.

    ``T`` depends on the data (a boolean index): under torch.compile use :func:`pack_tokens`.
    """
    return x[mask.bool()]


def scatter_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """Inverse of :func:`gather_tokens`: ``(T, ...)`` -> ``(B, S, ...)`` with zeros on padding.

    Written without a boolean index (``nonzero``): real token ``j`` in row-major order is
    ``values[j]``, so every position reads ``values[cumsum(mask) - 1]`` and padding is
    zeroed. Static shapes (torch.compile traces it without a graph break) and no
    host-device sync on CUDA; the backward is an ``index_add`` into ``values``.
    """
    mask = mask.bool()
    flat = mask.reshape(-1)
    idx = (flat.cumsum(0) - 1).clamp_(min=0)
    if values.shape[0] == 0:  # no real token anywhere: nothing to read
        return values.new_zeros(*mask.shape, *values.shape[1:])
    out = values.index_select(0, idx)
    keep = flat.reshape(-1, *([1] * (values.dim() - 1)))
    return torch.where(keep, out, out.new_zeros(())).reshape(*mask.shape, *values.shape[1:])


def pack_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """Rows for per-token work: ``x (B, S, ...)`` -> ``(T, ...)``; undo with :func:`unpack_tokens`.

    Eager: the real tokens only (:func:`gather_tokens`), so padding costs no work. Under
    torch.compile: all ``B·S`` tokens with padding zeroed (static shapes, no
    data-dependent ``nonzero``); the real tokens' results are the same either way, as long
    as the work between pack and unpack treats each row on its own.
    """
    mask = mask.bool()
    if torch.compiler.is_compiling():
        keep = mask.reshape(*mask.shape, *([1] * (x.dim() - mask.dim())))
        return torch.where(keep, x, x.new_zeros(())).flatten(0, mask.dim() - 1)
    return gather_tokens(x, mask)


def unpack_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """Inverse of :func:`pack_tokens`: ``(T, ...)`` -> ``(B, S, ...)`` with zeros on padding."""
    mask = mask.bool()
    if torch.compiler.is_compiling():
        keep = mask.reshape(-1, *([1] * (values.dim() - 1)))
        return torch.where(keep, values, values.new_zeros(())).reshape(*mask.shape, *values.shape[1:])
    return scatter_tokens(values, mask)


# --------------------------------------------------------------------------------------
# helpers shared by the conditioners: which encoder taps a conditioner reads
# --------------------------------------------------------------------------------------


def resolve_layer_ids(encoder_layer_ids: tuple[int, ...], layers: list[int] | None, owner: str) -> tuple[int, ...]:
    """Absolute layer ids a conditioner reads: ``layers`` (validated) or every tap.

    Raises ``ValueError`` naming the owner and the encoder's taps when an id is not tapped.
    """
    if layers is None:
        return tuple(encoder_layer_ids)
    layers = [int(i) for i in layers]
    missing = [i for i in layers if i not in encoder_layer_ids]
    if missing:
        raise ValueError(
            f"{owner} reads encoder layers {missing}, which the encoder does not tap; "
            f"encoder taps layer ids {list(encoder_layer_ids)}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{owner}: `layers` has duplicates: {layers}")
    if not layers:
        raise ValueError(f"{owner}: `layers` is empty; give at least one of {list(encoder_layer_ids)}")
    return tuple(layers)


def take_layers(hidden: Tensor, have: tuple[int, ...], want: tuple[int, ...]) -> Tensor:
    """``hidden (B, S, n, H)`` with taps ``have`` -> ``(B, S, len(want), H)`` with taps ``want``."""
    if tuple(have) == tuple(want):
        return hidden
    missing = [i for i in want if i not in have]
    if missing:
        raise ValueError(f"features lack encoder layers {missing}; they carry layer ids {list(have)}")
    idx = torch.tensor([have.index(i) for i in want], device=hidden.device)
    return hidden.index_select(2, idx)
