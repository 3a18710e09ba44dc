"""Layerwise key-value fusion (paper §2.1 "Layerwise Key-Value Fusion", Fig. 5b; Liu et al. [26]).

Encoder layer ``i`` is paired with DiT layer ``i``; the DiT layer's attention attends
to its own keys/values concatenated with the encoder layer's:
``Attn = softmax(Q_D (K_D ⊕ K_E)^T) (V_D ⊕ V_E)``. The paper requires ``N_E = N_D`` and
matching hidden size, heads and head dim.

We only have the encoder's hidden states (the cache stores those, not the VLM's K/V),
so ``K_E, V_E`` are derived from the hidden state ``x_i``:

* ``project=False`` (the paper's naive variant): ``x_i`` split into the DiT's heads is
  both key and value; only a per-layer key RMSNorm (the DiT normalises its own keys,
  QK-norm) is learned. Needs ``H == D`` and matching heads.
* ``project=True``: dedicated per-layer key and value projections H -> heads·head_dim,
  which the paper names as the likely fix for the feature misalignment of the naive
  variant (§2.2). Any sizes.

Pairing: the ``i``-th selected tap feeds DiT block ``i``. With ``layers`` one can pick
which taps, e.g. ``[0, 1, 2, 3]`` for a 4-block DiT reading a 4-layer VLM: tap ``i`` is
the *input* of VLM block ``i``, from which the VLM computes its own K/V at that block.
"""

from __future__ import annotations

import torch
from torch import nn

from unifusion.conditioners.base import BackboneSpec, Conditioner, Conditioning
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import RMSNorm, resolve_layer_ids, take_layers

__all__ = ["KVFusion"]


class KVFusion(Conditioner):
    """Per-DiT-layer ``(K, V)`` from the paired encoder layer; ``Conditioning.tokens`` is None.

    Args:
        encoder: the encoder's spec.
        backbone: the DiT's spec.
        project: learn per-layer K/V projections (any sizes) instead of reusing the hidden
            state as K and V (needs H == D and matching heads).
        layers: absolute encoder layer ids, one per DiT layer (None = every tap).
        key_norm: per-layer RMSNorm on the encoder keys (per head), matching the DiT's QK-norm.
    """

    def __init__(
        self,
        encoder: EncoderSpec,
        backbone: BackboneSpec,
        project: bool = False,
        layers: list[int] | None = None,
        key_norm: bool = True,
    ) -> None:
        self.project = project
        self.layer_ids = resolve_layer_ids(encoder.layer_ids, layers, "KVFusion")
        super().__init__(encoder, backbone)
        heads, head_dim = backbone.num_heads, backbone.head_dim
        self.num_heads, self.head_dim = heads, head_dim
        depth = backbone.depth
        if project:
            self.to_k = nn.ModuleList(nn.Linear(encoder.hidden_size, heads * head_dim) for _ in range(depth))
            self.to_v = nn.ModuleList(nn.Linear(encoder.hidden_size, heads * head_dim) for _ in range(depth))
        else:
            self.to_k = self.to_v = None
        self.key_norms = nn.ModuleList(RMSNorm(head_dim) for _ in range(depth)) if key_norm else None

    def check_compatible(self, encoder: EncoderSpec, backbone: BackboneSpec) -> None:
        super().check_compatible(encoder, backbone)
        n = len(self.layer_ids)
        if n != backbone.depth:
            raise ValueError(
                f"KV-fusion needs one encoder layer per DiT layer: encoder taps {n} layers, DiT has {backbone.depth} "
                f"(encoder {encoder.name!r} layer ids {list(self.layer_ids)}); choose {backbone.depth} ids with "
                f"`layers` or set the DiT depth to {n}"
            )
        if self.project:
            return
        if encoder.hidden_size != backbone.width:
            raise ValueError(
                f"KV-fusion without projection needs equal widths: encoder {encoder.name!r} hidden size "
                f"{encoder.hidden_size}, DiT width {backbone.width}; set project: true"
            )
        if encoder.num_heads and (encoder.num_heads, encoder.head_dim) != (backbone.num_heads, backbone.head_dim):
            raise ValueError(
                f"KV-fusion without projection needs matching attention heads: encoder {encoder.name!r} has "
                f"{encoder.num_heads} heads x {encoder.head_dim}, DiT has {backbone.num_heads} heads x "
                f"{backbone.head_dim}; set project: true"
            )

    def condition(self, features: EncoderFeatures) -> Conditioning:
        hidden = take_layers(features.hidden, features.layer_ids, self.layer_ids)
        b, s = hidden.shape[:2]
        keep = features.mask[:, None, :, None].to(hidden.dtype)  # (B, 1, S, 1)
        kv: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for i in range(hidden.shape[2]):
            x = hidden[:, :, i]
            k_in = self.to_k[i](x) if self.to_k is not None else x
            v_in = self.to_v[i](x) if self.to_v is not None else x
            k = k_in.view(b, s, self.num_heads, self.head_dim)
            v = v_in.view(b, s, self.num_heads, self.head_dim)
            if self.key_norms is not None:
                k = self.key_norms[i](k)
            # (B, heads, S, head_dim); padding zeroed (the DiT masks it as keys anyway)
            kv.append((k.transpose(1, 2) * keep, v.transpose(1, 2) * keep))
        return Conditioning(tokens=None, mask=features.mask, kv=kv)
