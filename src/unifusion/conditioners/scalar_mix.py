"""Scalar mix over layers: the simplest multi-layer baseline for LAP (paper §2.1, §3.1).

ELMo-style ``c = γ Σ_i softmax(w)_i · x_i`` with one learned scalar per layer (shared by
all tokens), then a Linear(H, D). It isolates the question "does mixing several layers
help" from LAP's per-token attention across layers; its softmax weights give the same
kind of layer-weight map as LAP's pooling layer (Fig. 8, 11).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unifusion.conditioners.base import BackboneSpec, Conditioner, Conditioning
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import PerLayerRMSNorm, RMSNorm, resolve_layer_ids, take_layers

__all__ = ["ScalarMix"]


class ScalarMix(Conditioner):
    """Softmax-weighted sum of the taps times γ, then Linear(H, D).

    Args:
        encoder: the encoder's spec.
        backbone: the DiT's spec.
        layer_norm: per-layer RMSNorm of the taps before mixing.
        output_norm: RMSNorm of the mix before the projection (replaces γ, which a
            scale-invariant norm would cancel).
        layers: absolute encoder layer ids (None = every tap).
        layer_dropout: absolute layer ids whose weights are zeroed (no renormalisation).
    """

    def __init__(
        self,
        encoder: EncoderSpec,
        backbone: BackboneSpec,
        layer_norm: bool = True,
        output_norm: bool = False,
        layers: list[int] | None = None,
        layer_dropout: list[int] | None = None,
    ) -> None:
        self.layer_ids = resolve_layer_ids(encoder.layer_ids, layers, "ScalarMix")
        super().__init__(encoder, backbone)
        n, h = len(self.layer_ids), encoder.hidden_size
        self.logits = nn.Parameter(torch.zeros(n))  # uniform mix at init
        # γ is redundant after a scale-invariant output norm, so it only exists without one
        self.gamma = None if output_norm else nn.Parameter(torch.ones(()))
        self.input_norm = PerLayerRMSNorm(n, h) if layer_norm else None
        self.output_norm = RMSNorm(h) if output_norm else None
        self.proj = nn.Linear(h, backbone.width)
        self.layer_dropout = list(layer_dropout or [])
        resolve_layer_ids(self.layer_ids, self.layer_dropout or None, "ScalarMix.layer_dropout")

    def pooling_weights(self) -> Tensor:
        """Softmax layer weights ``(n,)``; column ``j`` is absolute layer ``self.layer_ids[j]``."""
        return torch.softmax(self.logits.detach(), dim=0)

    def condition(self, features: EncoderFeatures) -> Conditioning:
        x = take_layers(features.hidden, features.layer_ids, self.layer_ids)
        if self.input_norm is not None:
            x = self.input_norm(x)
        w = torch.softmax(self.logits, dim=0)
        if self.layer_dropout:
            keep = torch.tensor([i not in self.layer_dropout for i in self.layer_ids], device=w.device)
            w = w * keep.to(w.dtype)
        y = torch.einsum("bsnh,n->bsh", x, w.to(x.dtype))
        if self.gamma is not None:
            y = self.gamma * y
        if self.output_norm is not None:
            y = self.output_norm(y)
        tokens = self.proj(y) * features.mask[..., None].to(y.dtype)
        return Conditioning(tokens=tokens, mask=features.mask)
