"""Hidden-state injection, HSI (paper §2.1 "Hidden State Injection", Fig. 5c).

Encoder layer ``n``'s hidden state is added to DiT layer ``n``'s residual stream on the
conditioning positions: ``x_n^D' = x_n^D + x_n^E``. The paper requires ``N_E = N_D`` and
equal hidden sizes (heads may differ); we add an optional per-layer linear projection so
the widths may differ too, and an optional learned per-layer gate.

Pairing convention (``N = DiT depth``, the ``k``-th selected tap ``e_k``, ``k = 0..N-1``):

* ``e_0`` is the DiT's input state on the prefix positions -> ``Conditioning.tokens``;
* ``e_k`` (``k >= 1``) is added after DiT block ``k-1``, i.e. to the input of block ``k``
  -> ``Conditioning.residuals[k-1]``;
* ``residuals[N-1]`` is None: after the last block the prefix positions are discarded,
  so an injection there could not reach the image tokens.

So HSI needs exactly ``N`` taps — one per DiT block input. With every layer of an
``L``-block VLM tapped (``L+1`` taps: embeddings, block outputs) and an ``L``-block DiT,
pick ``layers: [0, ..., L-1]``, or make the DiT ``L+1`` blocks deep.
"""

from __future__ import annotations

import torch
from torch import nn

from unifusion.conditioners.base import BackboneSpec, Conditioner, Conditioning
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import PerLayerRMSNorm, resolve_layer_ids, take_layers

__all__ = ["HiddenStateInjection"]


class HiddenStateInjection(Conditioner):
    """Tap 0 -> prefix tokens; tap ``k`` -> residual added after DiT block ``k-1``.

    Args:
        encoder: the encoder's spec.
        backbone: the DiT's spec.
        layers: absolute encoder layer ids, exactly one per DiT block (None = every tap).
        project: per-layer Linear(H, D); None = only when H != D. False needs H == D.
        norm: per-layer RMSNorm of the taps before projection (VLM layers differ in scale).
        gate: learned per-layer scalar gate on the residuals.
        gate_init: initial gate value (0 makes the DiT start unconditioned by the injections,
            but then the projections receive no gradient until the gates move).
    """

    def __init__(
        self,
        encoder: EncoderSpec,
        backbone: BackboneSpec,
        layers: list[int] | None = None,
        project: bool | None = None,
        norm: bool = True,
        gate: bool = False,
        gate_init: float = 1.0,
    ) -> None:
        self.layer_ids = resolve_layer_ids(encoder.layer_ids, layers, "HiddenStateInjection")
        self.project = (encoder.hidden_size != backbone.width) if project is None else bool(project)
        super().__init__(encoder, backbone)
        n, h, d = len(self.layer_ids), encoder.hidden_size, backbone.width
        self.norm = PerLayerRMSNorm(n, h) if norm else None
        self.proj = nn.ModuleList(nn.Linear(h, d) for _ in range(n)) if self.project else None
        self.gates = nn.Parameter(torch.full((max(n - 1, 0),), float(gate_init))) if gate else None

    def check_compatible(self, encoder: EncoderSpec, backbone: BackboneSpec) -> None:
        super().check_compatible(encoder, backbone)
        n = len(self.layer_ids)
        if n != backbone.depth:
            raise ValueError(
                f"HSI needs one encoder layer per DiT layer: encoder taps {n} layers, DiT has {backbone.depth} "
                f"(encoder {encoder.name!r} layer ids {list(self.layer_ids)}; tap 0 becomes the prefix tokens, "
                f"tap k is added after DiT block k-1); choose {backbone.depth} ids with `layers` or set the "
                f"DiT depth to {n}"
            )
        if not self.project and encoder.hidden_size != backbone.width:
            raise ValueError(
                f"HSI without projection adds hidden states directly, so widths must match: encoder "
                f"{encoder.name!r} hidden size {encoder.hidden_size}, DiT width {backbone.width}; "
                f"set project: true (or leave it unset)"
            )

    def condition(self, features: EncoderFeatures) -> Conditioning:
        x = take_layers(features.hidden, features.layer_ids, self.layer_ids)
        if self.norm is not None:
            x = self.norm(x)
        keep = features.mask[..., None].to(x.dtype)
        states = []
        for k in range(x.shape[2]):
            y = self.proj[k](x[:, :, k]) if self.proj is not None else x[:, :, k]
            if k >= 1 and self.gates is not None:
                y = y * self.gates[k - 1]
            states.append(y * keep)
        residuals: list[torch.Tensor | None] = [*states[1:], None]
        return Conditioning(tokens=states[0], mask=features.mask, residuals=residuals)
