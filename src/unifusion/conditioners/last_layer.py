"""Last-layer hidden-state conditioning (paper §2.1 "Last-Layer Hidden State Encoding", Fig. 5a).

The conditioning is one encoder layer's hidden state ``c = x_N`` (or the penultimate
layer, as in Lumina/Playground), passed through an optional adapter ``A(c)``: an RMSNorm
(as in Sana) and a linear map to the DiT width. The result is prepended to the noisy
image tokens; the DiT itself is unchanged.
"""

from __future__ import annotations

from torch import nn

from unifusion.conditioners.base import BackboneSpec, Conditioner, Conditioning
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import RMSNorm, take_layers

__all__ = ["LastLayer"]


def _pick_layer(encoder: EncoderSpec, layer: str | int) -> int:
    ids = sorted(encoder.layer_ids)
    if isinstance(layer, str) and not layer.lstrip("-").isdigit():
        key = layer.strip().lower()
        if key in ("last", "final"):
            return ids[-1]
        if key == "penultimate":
            if len(ids) < 2:
                raise ValueError(
                    f"LastLayer(layer='penultimate') needs at least two tapped encoder layers; "
                    f"encoder {encoder.name!r} taps {list(encoder.layer_ids)}"
                )
            return ids[-2]
        raise ValueError(f"LastLayer `layer` must be 'last', 'penultimate' or a tapped layer id, got {layer!r}")
    layer = int(layer)
    if layer not in ids:
        raise ValueError(
            f"LastLayer reads encoder layer {layer}, which the encoder {encoder.name!r} does not tap; "
            f"tapped layer ids: {list(encoder.layer_ids)}"
        )
    return layer


class LastLayer(Conditioner):
    """One tapped encoder layer -> optional RMSNorm -> optional Linear(H, D) -> prefix tokens.

    Args:
        encoder: the encoder's spec (sizes, tapped layer ids).
        backbone: the DiT's spec.
        layer: ``"last"`` = the deepest tapped layer, ``"penultimate"`` = the tapped layer
            before it (with every layer tapped these are the final and penultimate hidden
            states), or an absolute layer id that must be tapped.
        norm: RMSNorm on the hidden state before the adapter.
        adapter: Linear(H, D) to the DiT width; required when H != D.
    """

    def __init__(
        self,
        encoder: EncoderSpec,
        backbone: BackboneSpec,
        layer: str | int = "last",
        norm: bool = True,
        adapter: bool = True,
    ) -> None:
        self._want_adapter = adapter
        super().__init__(encoder, backbone)
        self.layer_id = _pick_layer(encoder, layer)
        self.norm = RMSNorm(encoder.hidden_size) if norm else None
        self.adapter = nn.Linear(encoder.hidden_size, backbone.width) if adapter else None

    def check_compatible(self, encoder: EncoderSpec, backbone: BackboneSpec) -> None:
        super().check_compatible(encoder, backbone)
        if not self._want_adapter and encoder.hidden_size != backbone.width:
            raise ValueError(
                f"LastLayer(adapter=False) passes hidden states through unchanged, but encoder "
                f"{encoder.name!r} has hidden size {encoder.hidden_size} and the DiT width is {backbone.width}; "
                f"set adapter: true"
            )

    def condition(self, features: EncoderFeatures) -> Conditioning:
        x = take_layers(features.hidden, features.layer_ids, (self.layer_id,))[:, :, 0]
        if self.norm is not None:
            x = self.norm(x)
        if self.adapter is not None:
            x = self.adapter(x)
        # zero the padding so it carries nothing even where a consumer ignores the mask
        x = x * features.mask[..., None].to(x.dtype)
        return Conditioning(tokens=x, mask=features.mask)
