"""Layerwise attention pooling, LAP (paper §2.1 "LAP", §2.2, §3.1, App. A.1, A.2; Fig. 5d, 19).

For every token, the hidden states of the ``n`` selected encoder layers are stacked,
``(B·S, n, H)``; ``num_blocks`` (paper: 2) transformer blocks attend across the *layer*
axis (paper: 32 heads, RMSNorm before and after attention, SiLU FFN with 1.3x
expansion); a fully connected layer pools ``n -> 1``; a linear projection maps ``H -> D``.

The pooled tokens are prepended to the image tokens (the paper's final design). With
``per_layer=True`` a dedicated LAP per DiT block is learned and injected like HSI
(App. A.2; the paper found this worse, but it is the ablation): LAP 0 gives the prefix
tokens, LAP ``k`` is added after DiT block ``k-1`` (same convention as
:mod:`unifusion.conditioners.hsi`).

Only real tokens are computed: the mask's True tokens are gathered to ``(T, n, H)``,
pooled, and scattered back, so padding neither costs work nor changes any output
(under torch.compile every token is computed, padding zeroed, for static shapes; see
:func:`unifusion.layers.pack_tokens`).

Analysis hooks: :meth:`LayerwiseAttentionPooling.pooling_weights` returns the pooling
layer's weights for layer-weight maps (Fig. 8, 11); :attr:`layer_dropout` zeroes chosen
layers' pooling weights at inference (Fig. 12).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from unifusion import kernels
from unifusion.conditioners.base import BackboneSpec, Conditioner, Conditioning
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import (
    KernelImplMixin,
    LayerwiseAttentionBlock,
    PerLayerRMSNorm,
    RMSNorm,
    pack_tokens,
    resolve_layer_ids,
    take_layers,
    unpack_tokens,
)

__all__ = ["LayerwiseAttentionPooling", "LayerwisePool"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class LayerwisePool(KernelImplMixin, nn.Module):
    """One LAP: optional per-layer norm -> layerwise blocks -> Linear(n -> 1) -> optional out norm -> Linear(H -> D).

    Operates on gathered real tokens ``(T, n, H)`` and returns ``(T, D)``.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        out_dim: int,
        num_blocks: int = 2,
        num_heads: int = 32,
        mlp_ratio: float = 1.3,
        qk_norm: bool = True,
        post_norm: bool = True,
        layer_norm: bool = True,
        output_norm: bool = True,
        project: bool = True,
    ) -> None:
        super().__init__()
        self.input_norm = PerLayerRMSNorm(num_layers, hidden_size) if layer_norm else None
        self.blocks = nn.ModuleList(
            LayerwiseAttentionBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, post_norm=post_norm)
            for _ in range(num_blocks)
        )
        self.pool = nn.Linear(num_layers, 1, bias=False)
        # start as the mean over layers: every layer contributes and gets gradient from step 0
        nn.init.constant_(self.pool.weight, 1.0 / num_layers)
        # the residual stream grows with depth; normalise the pooled token before projecting
        self.output_norm = RMSNorm(hidden_size) if output_norm else None
        self.proj = nn.Linear(hidden_size, out_dim) if project else None

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """``x (T, n, H)``; ``keep (n,)`` multiplies the pooling weights (layer dropout) -> ``(T, D)``."""
        if self.input_norm is not None:
            x = self.input_norm(x)
        for block in self.blocks:
            x = block(x)
        w = self.pool.weight[0]  # (n,)
        if keep is not None:
            w = w * keep.to(w.dtype)
        # fused weighted sum over the layer axis (no permuted copy of the stack)
        y = kernels.layer_pool(x, w.to(x.dtype), impl=self.kernel_impl)
        if self.output_norm is not None:
            y = self.output_norm(y)
        return self.proj(y) if self.proj is not None else y


class LayerwiseAttentionPooling(Conditioner):
    """LAP conditioner: pooled multi-layer tokens as the prefix (or per DiT layer, like HSI).

    Args:
        encoder: the encoder's spec.
        backbone: the DiT's spec.
        num_blocks: layerwise transformer blocks (paper: 2).
        num_heads: heads of the layerwise attention (paper: 32); must divide the encoder
            hidden size.
        mlp_ratio: FFN expansion (paper: 1.3).
        qk_norm: RMSNorm on queries/keys.
        post_norm: RMSNorm after attention as well as before (paper App. A.1).
        layer_norm: per-layer RMSNorm of the stacked taps before the blocks (tiny random
            VLM taps differ in scale by orders of magnitude; see the quickstart note).
        output_norm: RMSNorm of the pooled token before the projection.
        project: Linear(H, D); False needs H == D.
        per_layer: a dedicated LAP per DiT block, injected like HSI (App. A.2).
        layers: absolute encoder layer ids to pool (None = every tap; paper: every 3rd).
        layer_dropout: absolute layer ids whose pooling weights are zeroed (Fig. 12);
            a runtime knob, also settable as the ``layer_dropout`` attribute.
    """

    def __init__(
        self,
        encoder: EncoderSpec,
        backbone: BackboneSpec,
        num_blocks: int = 2,
        num_heads: int = 32,
        mlp_ratio: float = 1.3,
        qk_norm: bool = True,
        post_norm: bool = True,
        layer_norm: bool = True,
        output_norm: bool = True,
        project: bool = True,
        per_layer: bool = False,
        layers: list[int] | None = None,
        layer_dropout: list[int] | None = None,
    ) -> None:
        self.layer_ids = resolve_layer_ids(encoder.layer_ids, layers, "LayerwiseAttentionPooling")
        self.num_heads = num_heads
        self.project = project
        super().__init__(encoder, backbone)
        self.per_layer = per_layer
        n_pools = backbone.depth if per_layer else 1
        self.pools = nn.ModuleList(
            LayerwisePool(
                len(self.layer_ids),
                encoder.hidden_size,
                backbone.width,
                num_blocks=num_blocks,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qk_norm=qk_norm,
                post_norm=post_norm,
                layer_norm=layer_norm,
                output_norm=output_norm,
                project=project,
            )
            for _ in range(n_pools)
        )
        self.register_buffer("_keep", torch.ones(len(self.layer_ids)), persistent=False)
        self._layer_dropout: list[int] = []
        self.layer_dropout = layer_dropout or []

    def check_compatible(self, encoder: EncoderSpec, backbone: BackboneSpec) -> None:
        super().check_compatible(encoder, backbone)
        h = encoder.hidden_size
        if self.num_heads <= 0 or h % self.num_heads != 0:
            raise ValueError(
                f"LayerwiseAttentionPooling num_heads={self.num_heads} must divide the encoder hidden size {h} "
                f"(encoder {encoder.name!r}); valid choices: {_divisors(h)}"
            )
        if not self.project and h != backbone.width:
            raise ValueError(
                f"LayerwiseAttentionPooling(project=False) needs the encoder hidden size to equal the DiT width: "
                f"encoder {encoder.name!r} has {h}, DiT has {backbone.width}; set project: true"
            )

    # --- analysis hooks ---------------------------------------------------------------
    @property
    def layer_dropout(self) -> list[int]:
        """Absolute layer ids whose pooling weights are zeroed (paper Fig. 12)."""
        return list(self._layer_dropout)

    @layer_dropout.setter
    def layer_dropout(self, layer_ids: Sequence[int] | None) -> None:
        layer_ids = [int(i) for i in (layer_ids or [])]
        unknown = [i for i in layer_ids if i not in self.layer_ids]
        if unknown:
            raise ValueError(
                f"layer_dropout names layers {unknown} that LAP does not pool; it pools {list(self.layer_ids)}"
            )
        keep = torch.ones(len(self.layer_ids), device=self._keep.device)
        for i in layer_ids:
            keep[self.layer_ids.index(i)] = 0.0
        self._keep.copy_(keep)
        self._layer_dropout = layer_ids

    def set_layer_dropout(self, layer_ids: Sequence[int] | None) -> LayerwiseAttentionPooling:
        """Zero the pooling weights of ``layer_ids`` (absolute ids) from now on; ``None`` restores all."""
        self.layer_dropout = layer_ids
        return self

    def pooling_weights(self) -> Tensor:
        """Learned ``n -> 1`` pooling weights: ``(n,)``, or ``(depth, n)`` with ``per_layer``.

        Column ``j`` belongs to absolute encoder layer ``self.layer_ids[j]``; the raw
        weights are returned (layer dropout not applied).
        """
        w = torch.stack([p.pool.weight[0] for p in self.pools]).detach()
        return w if self.per_layer else w[0]

    # --- forward ----------------------------------------------------------------------
    def condition(self, features: EncoderFeatures) -> Conditioning:
        hidden = take_layers(features.hidden, features.layer_ids, self.layer_ids)
        mask = features.mask
        x = pack_tokens(hidden, mask)  # (T, n, H): real tokens only (all, padding zeroed, under compile)
        keep = self._keep if self._layer_dropout else None
        outs = [unpack_tokens(pool(x, keep), mask) for pool in self.pools]
        if not self.per_layer:
            return Conditioning(tokens=outs[0], mask=mask)
        residuals: list[Tensor | None] = [*outs[1:], None]
        return Conditioning(tokens=outs[0], mask=mask, residuals=residuals)
