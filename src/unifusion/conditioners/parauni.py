"""ParaUni's Layer Integration Module as a conditioner (ParaUni paper, "Layer Integration Module", Eq. 4-6).

ParaUni feeds every VLM layer's (learnable-query) states in parallel through a
transformer module ``f_θ`` and a LayerNorm, then averages over layers:
``c_i = LN(f_θ(q_i))``, ``c = mean_i c_i`` (Eq. 4, 5). Unlike LAP (UniFusion §2.1),
the layers never attend to each other: each layer's *sequence* is refined on its own
and the layers are mixed by a plain average.

Here ``q_i`` are the selected taps of the token sequence (UniFusion keeps all tokens
instead of MetaQuery-style learnable queries); each is projected to the DiT width,
``f_θ`` is ``num_blocks`` padding-aware bidirectional blocks over the sequence, shared
across layers (``shared=True``, ParaUni's single θ) or one per layer.

The RL-stage perturbation of ParaUni's LDAM, ``c_i <- c_i (1 + γ ε)`` (Eq. 6), is
available in training mode for the layers in ``perturb_layers``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unifusion.conditioners.base import BackboneSpec, Conditioner, Conditioning
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import PerLayerRMSNorm, TransformerBlock, resolve_layer_ids, take_layers

__all__ = ["ParaUniFusion"]


class ParaUniFusion(Conditioner):
    """Per-layer sequence transformer + LayerNorm, averaged over layers (ParaUni LIM).

    Args:
        encoder: the encoder's spec.
        backbone: the DiT's spec.
        num_blocks: transformer blocks in ``f_θ``.
        num_heads: heads of ``f_θ``; must divide the DiT width.
        mlp_ratio: FFN expansion of ``f_θ``.
        shared: one ``f_θ`` and LayerNorm for all layers (ParaUni) or one per layer.
        layer_norm: per-layer RMSNorm of the raw taps before the input projection.
        layers: absolute encoder layer ids (None = every tap).
        perturb_layers: absolute layer ids perturbed as ``c_i (1 + γ ε)`` in training (LDAM).
        perturb_gamma: γ of the perturbation (0 = off).
    """

    def __init__(
        self,
        encoder: EncoderSpec,
        backbone: BackboneSpec,
        num_blocks: int = 1,
        num_heads: int = 4,
        mlp_ratio: float = 1.3,
        shared: bool = True,
        layer_norm: bool = True,
        layers: list[int] | None = None,
        perturb_layers: list[int] | None = None,
        perturb_gamma: float = 0.0,
    ) -> None:
        self.layer_ids = resolve_layer_ids(encoder.layer_ids, layers, "ParaUniFusion")
        self.num_heads = num_heads
        super().__init__(encoder, backbone)
        n, h, d = len(self.layer_ids), encoder.hidden_size, backbone.width
        self.shared = shared
        copies = 1 if shared else n
        self.input_norm = PerLayerRMSNorm(n, h) if layer_norm else None
        self.proj = nn.ModuleList(nn.Linear(h, d) for _ in range(copies))
        self.blocks = nn.ModuleList(
            nn.ModuleList(TransformerBlock(d, num_heads, mlp_ratio=mlp_ratio) for _ in range(num_blocks))
            for _ in range(copies)
        )
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(copies))
        self.perturb_layers = (
            resolve_layer_ids(self.layer_ids, perturb_layers, "ParaUniFusion.perturb_layers") if perturb_layers else ()
        )
        self.perturb_gamma = float(perturb_gamma)

    def check_compatible(self, encoder: EncoderSpec, backbone: BackboneSpec) -> None:
        super().check_compatible(encoder, backbone)
        if self.num_heads <= 0 or backbone.width % self.num_heads != 0:
            raise ValueError(
                f"ParaUniFusion num_heads={self.num_heads} must divide the DiT width {backbone.width} "
                f"(encoder {encoder.name!r} hidden size {encoder.hidden_size} is projected to it first)"
            )

    def _f(self, i: int, x: Tensor, mask: Tensor) -> Tensor:
        j = 0 if self.shared else i
        y = self.proj[j](x)
        for block in self.blocks[j]:
            y = block(y, mask)
        return self.out_norms[j](y)

    def condition(self, features: EncoderFeatures) -> Conditioning:
        x = take_layers(features.hidden, features.layer_ids, self.layer_ids)
        if self.input_norm is not None:
            x = self.input_norm(x)
        mask = features.mask
        b, s, n, h = x.shape
        if self.shared:
            # one f_θ: run all layers as one batch of B·n sequences
            flat = x.permute(0, 2, 1, 3).reshape(b * n, s, h)
            c = self._f(0, flat, mask.repeat_interleave(n, dim=0)).view(b, n, s, -1)
        else:
            c = torch.stack([self._f(i, x[:, :, i], mask) for i in range(n)], dim=1)
        if self.training and self.perturb_gamma > 0 and self.perturb_layers:
            idx = torch.tensor([self.layer_ids.index(i) for i in self.perturb_layers], device=c.device)
            chosen = torch.zeros(n, device=c.device, dtype=c.dtype).index_fill(0, idx, 1.0)[None, :, None, None]
            # c_i (1 + γ ε) on the chosen layers only (ParaUni Eq. 6)
            c = c * (1 + self.perturb_gamma * torch.randn_like(c) * chosen)
        tokens = c.mean(dim=1) * mask[..., None].to(c.dtype)
        return Conditioning(tokens=tokens, mask=mask)
