"""Single-stream diffusion transformer (paper §2.2 "Experimental Setup", §4.1; Fig. 5).

A latent DiT with 2x2 patchify and *full* self-attention over the concatenation
``[conditioning tokens; image tokens]`` (the paper's setup for every conditioner):

* **timestep**: adaLN-Zero modulation as in DiT (Peebles & Xie, ``models.py``): each
  block's shift/scale/gate for attention and FFN come from the timestep embedding,
  zero-initialised so every block starts as the identity; the final layer is
  zero-initialised too, so an untrained DiT predicts 0. ``adaln="shared"`` is the
  adaLN-single variant (PixArt-α, Krea-2): one modulation projection for all blocks plus
  a learned per-block table, which the billion-parameter presets use (a 6·D² projection
  per block would be ~3B parameters at D=4096, 32 blocks).
* **attention**: QK-norm (RMSNorm per head); 2D RoPE on image tokens (half the rotary
  pairs by patch row, half by column). Conditioning tokens are *not* rotated: their
  order is already encoded by the VLM and the bidirectional refiner (§3.2), and leaving
  them position-free keeps image-text attention independent of the prompt length.
  Keys/values from KV-fusion are likewise unrotated.
* **conditioning** (:class:`~unifusion.conditioners.base.Conditioning`): prefix tokens
  with their padding mask as an SDPA key mask; per-layer ``kv`` appended to that
  block's keys/values under the same mask (KV-fusion, §2.1); per-layer ``residuals``
  added to the prefix positions after each block (HSI, §2.1; per-layer LAP, App. A.2).
* **CFG**: a learned null token; :meth:`DiT.null_conditioning`. A sample whose
  conditioning has no real token gets the null token automatically.
* **FFN**: SwiGLU through :mod:`unifusion.kernels`; ``mlp_ratio`` is the SwiGLU hidden
  width over ``width`` (8/3 has the parameter count of DiT's GELU MLP with ratio 4).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unifusion.autoencoders import LatentSpec
from unifusion.conditioners.base import BackboneSpec, Conditioning
from unifusion.layers import FeedForward, RMSNorm, SequenceAttention

__all__ = ["DIT_PRESETS", "DiT", "DiTBlock", "TimestepEmbedder", "rope_2d"]

#: Named sizes for :meth:`DiT.from_preset`. ``5b``: the paper's ablation DiT (32 layers,
#: 32 heads, width 4096). ``8b``: the paper's final size; we keep width and heads and
#: go deeper (51 blocks, ~8.1B parameters), since the paper does not state its final configuration.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(width=128, depth=4, num_heads=4),
    "small": dict(width=384, depth=12, num_heads=6),
    "base": dict(width=768, depth=12, num_heads=12),
    "5b": dict(width=4096, depth=32, num_heads=32, mlp_ratio=1.75, adaln="shared", input_size=64),
    "8b": dict(width=4096, depth=51, num_heads=32, mlp_ratio=1.75, adaln="shared", input_size=64),
}


_DIT_DEFAULTS: dict[str, Any] = dict(width=128, depth=4, num_heads=4, mlp_ratio=8 / 3, adaln="block", input_size=16)


def _preset(name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    key = name.lower()
    if key not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {list(DIT_PRESETS)}")
    return DIT_PRESETS[key]


def _resolve_channels(latent: LatentSpec | None, in_channels: int | None) -> int:
    if latent is None:
        return 3 if in_channels is None else int(in_channels)
    if in_channels is not None and int(in_channels) != latent.channels:
        raise ValueError(
            f"DiT in_channels={in_channels} but the autoencoder's latents have {latent.channels} channels; "
            f"drop backbone.init_args.in_channels (the DiT follows the autoencoder)"
        )
    return latent.channels


def _resolve_input_size(latent: LatentSpec | None, input_size: int | None, image_size: int | None, default: int) -> int:
    compression = latent.compression if latent is not None else 1
    if image_size is not None:
        if image_size % compression:
            raise ValueError(
                f"DiT image_size={image_size} is not divisible by the autoencoder's compression {compression}"
            )
        side = image_size // compression
        if input_size is not None and int(input_size) != side:
            raise ValueError(
                f"DiT input_size={input_size} disagrees with image_size={image_size} / compression {compression} = "
                f"{side}; give only image_size"
            )
        return side
    return int(input_size) if input_size is not None else int(default)


def rope_2d(
    prefix_len: int, grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0, device: Any = None
) -> tuple[Tensor, Tensor]:
    """``cos, sin (prefix_len + grid_h*grid_w, head_dim)`` for :func:`unifusion.layers.apply_rope`.

    The first ``prefix_len`` rows are the identity rotation (conditioning tokens); image
    token ``(r, c)`` (row-major) rotates its first ``head_dim/4`` pairs by ``r`` and the
    next ``head_dim/4`` by ``c``.
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(grid_h, device=device, dtype=torch.float32).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device, dtype=torch.float32).repeat(grid_h)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (N, head_dim/2)
    angles = torch.cat([angles.new_zeros(prefix_len, angles.shape[1]), angles], dim=0)
    angles = torch.cat([angles, angles], dim=1)  # half-split pairs (j, j + d/2) share an angle
    return angles.cos(), angles.sin()


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of ``1000·t`` followed by a 2-layer SiLU MLP (DiT)."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero block: attention (QK-norm, RoPE, extra K/V) and SwiGLU FFN."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool = True,
        adaln: str = "block",
        ffn_multiple_of: int = 1,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(width, elementwise_affine=False)
        self.attn = SequenceAttention(width, num_heads, qk_norm=qk_norm, bias=True)
        self.norm2 = RMSNorm(width, elementwise_affine=False)
        self.ff = FeedForward(width, mult=mlp_ratio, bias=False, multiple_of=ffn_multiple_of)
        if adaln == "block":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
            self.scale_shift_table = None
        else:
            self.adaLN_modulation = None
            self.scale_shift_table = nn.Parameter(torch.zeros(6, width))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        mask: Tensor | None,
        rope: tuple[Tensor, Tensor] | None,
        kv: tuple[Tensor, Tensor] | None = None,
        kv_mask: Tensor | None = None,
    ) -> Tensor:
        """``c``: ``(B, D)`` timestep embedding, or ``(B, 6, D)`` shared modulation (adaLN-single)."""
        if self.adaLN_modulation is not None:
            mod = self.adaLN_modulation(c).unflatten(-1, (6, -1))
        else:
            mod = c + self.scale_shift_table
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(1)
        h = self.attn(_modulate(self.norm1(x), shift_a, scale_a), mask=mask, rope=rope, extra_kv=kv, extra_mask=kv_mask)
        x = x + gate_a[:, None] * h
        return x + gate_f[:, None] * self.ff(_modulate(self.norm2(x), shift_f, scale_f))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to patch pixels; zero-initialised (DiT)."""

    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(width, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Single-stream DiT: ``forward(x (B,C,H,W), t (B,) in [0,1], cond) -> velocity (B,C,H,W)``.

    In a model the DiT is built as ``DiT(autoencoder.spec, **init_args)`` (YAML: ``class_path``
    + hyper-parameters), so its input channels and size follow the autoencoder's latents the
    way a conditioner follows the encoder; sizes given by hand are checked against them.

    Args:
        latent: the autoencoder's :class:`~unifusion.autoencoders.LatentSpec` (channels,
            compression); None = pixel space with ``in_channels`` (default 3).
        preset: a named size from :data:`DIT_PRESETS` (``tiny`` ... ``8b``); explicit
            arguments override its values.
        in_channels: latent (or pixel) channels C; must equal ``latent.channels`` if both given.
        input_size: nominal latent side (sampling size); any multiple of ``patch_size`` works at
            forward. Prefer ``image_size``, which follows the autoencoder's compression.
        image_size: nominal image side in pixels; ``input_size = image_size / compression``.
        patch_size: patchify factor (paper: 2).
        width: hidden size D.
        depth: number of blocks.
        num_heads: attention heads; ``width / num_heads`` must be divisible by 4 (2D RoPE).
        mlp_ratio: SwiGLU hidden width / D.
        ffn_multiple_of: round the SwiGLU hidden width up to a multiple of this (LLaMA's
            ``multiple_of``). 1 keeps ``round(D * mlp_ratio)``; 8 or 16 lets the matmuls and the
            elementwise ops run on aligned rows (width 128: 341 -> 344; DiT forward+backward
            1.06-1.09x on a 2-core AVX2 CPU).
        qk_norm: RMSNorm on queries and keys.
        adaln: ``"block"`` (DiT adaLN-Zero, one projection per block) or ``"shared"``
            (adaLN-single: one projection for all blocks + per-block tables).
        rope_theta: RoPE base.
    """

    def __init__(
        self,
        latent: LatentSpec | None = None,
        preset: str | None = None,
        in_channels: int | None = None,
        input_size: int | None = None,
        image_size: int | None = None,
        patch_size: int = 2,
        width: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        qk_norm: bool = True,
        adaln: Literal["block", "shared"] | None = None,
        rope_theta: float = 10000.0,
        ffn_multiple_of: int = 1,
    ) -> None:
        super().__init__()
        if ffn_multiple_of < 1:
            raise ValueError(f"DiT ffn_multiple_of must be >= 1, got {ffn_multiple_of}")
        given = dict(width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, adaln=adaln)
        sizes = {**_DIT_DEFAULTS, **_preset(preset), **{k: v for k, v in given.items() if v is not None}}
        width, depth, num_heads = int(sizes["width"]), int(sizes["depth"]), int(sizes["num_heads"])
        mlp_ratio, adaln = float(sizes["mlp_ratio"]), sizes["adaln"]
        in_channels = _resolve_channels(latent, in_channels)
        input_size = _resolve_input_size(latent, input_size, image_size, sizes.get("input_size", 16))
        if width % num_heads != 0:
            raise ValueError(f"DiT width {width} is not divisible by num_heads={num_heads}")
        if (width // num_heads) % 4 != 0:
            raise ValueError(f"DiT head dim {width // num_heads} must be divisible by 4 for 2D RoPE")
        if input_size % patch_size != 0:
            raise ValueError(f"DiT input_size {input_size} is not divisible by patch_size {patch_size}")
        if adaln not in ("block", "shared"):
            raise ValueError(f"DiT adaln must be 'block' or 'shared', got {adaln!r}")
        self.in_channels, self.input_size, self.patch_size = in_channels, input_size, patch_size
        self.width, self.depth, self.num_heads = width, depth, num_heads
        self.rope_theta = rope_theta
        self.x_embedder = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(width)
        self.adaLN_shared = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)) if adaln == "shared" else None
        self.blocks = nn.ModuleList(
            DiTBlock(width, num_heads, mlp_ratio, qk_norm, adaln, ffn_multiple_of) for _ in range(depth)
        )
        self.final_layer = FinalLayer(width, patch_size, in_channels)
        # learned null conditioning for classifier-free guidance (condition dropout)
        self.null_token = nn.Parameter(torch.zeros(1, 1, width))
        self.initialize_weights()

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DiT:
        """Build a named size (:data:`DIT_PRESETS`: tiny, small, base, 5b, 8b) with overrides."""
        return cls(preset=name, **overrides)

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, zero biases; zero adaLN and output layer (adaLN-Zero)."""

        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_token, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.adaLN_shared is not None:
            zero.append(self.adaLN_shared[-1])
        for block in self.blocks:
            if block.adaLN_modulation is not None:
                zero.append(block.adaLN_modulation[-1])
            else:
                nn.init.zeros_(block.scale_shift_table)
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def spec(self) -> BackboneSpec:
        return BackboneSpec(width=self.width, depth=self.depth, num_heads=self.num_heads)

    # --- conditioning ---------------------------------------------------------------------
    def null_conditioning(self, batch_size: int | Conditioning, like: Conditioning | None = None) -> Conditioning:
        """Unconditional :class:`Conditioning` for classifier-free guidance.

        Call as ``null_conditioning(cond)`` or ``null_conditioning(batch_size, like=cond)``.
        The learned null token sits at prefix position 0 with a mask of one valid token
        (the DiT also substitutes it for any sample whose conditioning is all padding, so
        condition dropout by masking every token is equivalent);
        ``kv`` and ``residuals`` are None (no encoder information at all). When ``like``
        has prefix tokens, the prefix is padded to ``like``'s length (zeros, masked) so
        tokens and mask concatenate with ``like`` along the batch for a batched CFG pass;
        conditionings with ``kv``/``residuals`` need a separate unconditional pass.
        """
        if isinstance(batch_size, Conditioning):
            like, batch_size = batch_size, batch_size.batch_size
        seq = max(like.seq_len, 1) if like is not None and like.tokens is not None else 1
        device = like.mask.device if like is not None else self.null_token.device
        dtype = like.tokens.dtype if like is not None and like.tokens is not None else self.null_token.dtype
        tokens = torch.zeros(batch_size, seq, self.width, device=device, dtype=dtype)
        tokens = torch.cat([self.null_token.to(device=device, dtype=dtype).expand(batch_size, 1, -1), tokens[:, 1:]], 1)
        mask = torch.zeros(batch_size, seq, dtype=torch.bool, device=device)
        mask[:, 0] = True
        return Conditioning(tokens=tokens, mask=mask)

    def _prefix_with_null(
        self, cond: Conditioning, cond_mask: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor | None, Tensor]:
        """Prefix tokens and their mask, with the null token for samples that have no real token.

        A sample whose conditioning is all padding (condition dropout masks every token,
        an empty prompt) would otherwise see no prefix at all; it gets the learned null
        token at position 0 instead, so dropout and :meth:`null_conditioning` agree.
        Conditioner outputs (``kv``, ``residuals``) keep the original mask.
        """
        b = cond_mask.shape[0]
        empty = ~cond_mask.any(dim=1)  # (B,)
        null = self.null_token.to(dtype)
        if cond.tokens is not None and cond.tokens.shape[1] > 0:
            first = torch.zeros_like(cond_mask)
            first[:, 0] = True
            use_null = first & empty[:, None]
            tokens = torch.where(use_null[..., None], null, cond.tokens.to(dtype))
            return tokens, cond_mask | use_null
        # (torch.compile: no data-dependent prefix length; always the one-token prefix, masked where unused)
        if not torch.compiler.is_compiling() and not bool(empty.any()):
            return None, cond_mask.new_zeros(b, 0)
        # KV-only conditioning: a one-token prefix, real only for the empty samples
        return null.expand(b, 1, -1) * empty[:, None, None].to(dtype), empty[:, None]

    def _check_conditioning(self, cond: Conditioning, batch: int) -> None:
        if cond.mask.shape[0] != batch:
            raise ValueError(f"conditioning batch {cond.mask.shape[0]} != image batch {batch}")
        if cond.tokens is not None and tuple(cond.tokens.shape) != (batch, cond.seq_len, self.width):
            raise ValueError(
                f"conditioning tokens must be (B, S, D)=({batch}, {cond.seq_len}, {self.width}) for this DiT, "
                f"got {tuple(cond.tokens.shape)}"
            )
        for name, items in (("kv", cond.kv), ("residuals", cond.residuals)):
            if items is not None and len(items) != self.depth:
                raise ValueError(f"conditioning.{name} has {len(items)} entries but the DiT has {self.depth} layers")
        if cond.residuals is not None and cond.tokens is None:
            raise ValueError("conditioning.residuals are added to prefix tokens, but conditioning.tokens is None")

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` (or scalar) in [0, 1] -> velocity ``(B, C, H, W)``."""
        b, c, h, w = x.shape
        p = self.patch_size
        if c != self.in_channels or h % p or w % p:
            raise ValueError(
                f"DiT expects (B, {self.in_channels}, H, W) with H, W multiples of {p}, got {tuple(x.shape)}"
            )
        if cond is None:
            cond = self.null_conditioning(b)
        self._check_conditioning(cond, b)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)
        gh, gw = h // p, w // p
        img = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, N, D)
        temb = self.t_embedder(t).to(img.dtype)
        cmod = self.adaLN_shared(temb).unflatten(-1, (6, -1)) if self.adaLN_shared is not None else temb

        cond_mask = cond.mask.to(x.device).bool()  # mask of the conditioner's tokens / kv
        tokens, token_mask = self._prefix_with_null(cond, cond_mask, img.dtype)
        prefix_len = 0 if tokens is None else tokens.shape[1]
        if prefix_len:
            seq = torch.cat([tokens, img], dim=1)
            # the mask only matters when some prefix token is padding (skip it for SDPA's fast path);
            # under torch.compile always pass it: a data-dependent branch would break the graph
            if not torch.compiler.is_compiling() and bool(token_mask.all()):
                mask = None
            else:
                mask = torch.cat([token_mask, token_mask.new_ones(b, gh * gw)], dim=1)
        else:
            seq, mask = img, None
        rope = rope_2d(prefix_len, gh, gw, self.width // self.num_heads, self.rope_theta, device=x.device)
        keep = cond_mask[..., None].to(img.dtype)
        for i, block in enumerate(self.blocks):
            kv = cond.kv[i] if cond.kv is not None else None
            seq = block(seq, cmod, mask, rope, kv=kv, kv_mask=cond_mask if kv is not None else None)
            res = cond.residuals[i] if cond.residuals is not None else None
            if res is not None:
                seq = torch.cat([seq[:, :prefix_len] + res.to(seq.dtype) * keep, seq[:, prefix_len:]], dim=1)
        out = self.final_layer(seq[:, prefix_len:], temb)  # (B, N, p*p*C)
        out = out.view(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, h, w)
