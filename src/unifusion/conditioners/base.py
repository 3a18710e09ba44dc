"""The contract between conditioners and the DiT: :class:`Conditioning` and :class:`Conditioner`.

A conditioner turns :class:`~unifusion.features.EncoderFeatures` into a
:class:`Conditioning`; the DiT consumes a ``Conditioning`` without knowing which
conditioner made it (paper §2.1, Fig. 5).

Conditioners are built from YAML as *callables* that receive the sizes of both sides::

    conditioner:
      class_path: unifusion.conditioners.LayerwiseAttentionPooling
      init_args: {num_blocks: 2, num_heads: 4}

The model calls ``conditioner(encoder_spec, backbone_spec)``; every conditioner's
``__init__`` therefore starts with ``(encoder: EncoderSpec, backbone: BackboneSpec, ...)``
and checks there, once, that the two sides fit, with an error naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from unifusion.features import EncoderFeatures, EncoderSpec


@dataclass(frozen=True)
class BackboneSpec:
    """What a conditioner may rely on about the DiT."""

    width: int
    depth: int
    num_heads: int

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass
class Conditioning:
    """What the DiT consumes.

    Attributes:
        tokens: ``(B, S, D)`` prefix tokens placed before the image tokens in the
            single-stream sequence, or None (KV-fusion may condition through ``kv`` only).
        mask: ``(B, S)`` bool, True for real prefix tokens. Also the key mask for ``kv``.
        kv: optional per-DiT-layer ``(K, V)``, each ``(B, heads, S, head_dim)``, appended
            to that layer's keys and values (None entries: that layer gets none).
        residuals: optional per-DiT-layer ``(B, S, D)`` tensors added to the prefix-token
            positions of the residual stream *after* that block (HSI).
    """

    tokens: Tensor | None
    mask: Tensor
    kv: list[tuple[Tensor, Tensor] | None] | None = None
    residuals: list[Tensor | None] | None = None
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.mask.shape[1]


class Conditioner(nn.Module):
    """Base class: ``EncoderFeatures -> Conditioning``.

    Subclasses call ``super().__init__(encoder, backbone)``, declare their needs by
    overriding :meth:`check_compatible` (raise ``ValueError`` naming both sides), and
    implement :meth:`condition`.

    A conditioner consumes every real token it is given: which tokens those are (the
    paper's default: user content + image tokens) is the encoder's ``roles`` option, so
    training, the feature cache and sampling condition on the same tokens.
    """

    def __init__(self, encoder: EncoderSpec, backbone: BackboneSpec) -> None:
        super().__init__()
        self.encoder_spec = encoder
        self.backbone_spec = backbone
        self.check_compatible(encoder, backbone)

    def check_compatible(self, encoder: EncoderSpec, backbone: BackboneSpec) -> None:
        if encoder.num_taps == 0:
            raise ValueError(f"{type(self).__name__} needs at least one tapped encoder layer; the encoder taps none")

    def condition(self, features: EncoderFeatures) -> Conditioning:
        raise NotImplementedError

    def forward(self, features: EncoderFeatures) -> Conditioning:
        if features.hidden_size != self.encoder_spec.hidden_size:
            raise ValueError(
                f"{type(self).__name__} was built for encoder hidden size {self.encoder_spec.hidden_size}, "
                f"got features with hidden size {features.hidden_size}"
            )
        return self.condition(features)
