"""The frozen-encoder interface.

An :class:`Encoder` knows its :class:`~unifusion.features.EncoderSpec` from its config
alone (no weights loaded), so a model trained from cached features never loads the VLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from unifusion.features import EncoderFeatures, EncoderSpec, RolesSpec, TokenRole, resolve_roles, roles_names

#: One sample's reference images: float tensors (3, h, w) in [0, 1] or PIL images.
ImageList = Sequence[Any]


class Encoder(nn.Module):
    """Frozen encoder: prompts (+ images) -> :class:`EncoderFeatures`.

    Subclasses implement :attr:`spec`, :meth:`encode` and :meth:`cache_metadata`.
    The module never trains: ``train(True)`` is ignored and no parameter requires grad.

    **Token roles have one owner, the encoder.** ``roles`` (set once, in the config) says
    which tokens :meth:`encode` returns: ``None``/``"default"`` = the paper's default
    (user text + image tiles + thumbnail; with VERIFI the generated tokens + image
    tokens), ``"all"`` = every real token (system prompt and chat template included), or
    a list of role names. Training (live), the feature cache, sampling and REPA targets
    all call :meth:`encode`, so they all see the same tokens; conditioners take what they
    are given.
    """

    #: the configured ``roles`` option (see the class docstring); subclasses set it in ``__init__``
    roles: RolesSpec = None

    @property
    def spec(self) -> EncoderSpec:
        raise NotImplementedError

    def encode(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageList] | None = None,
        *,
        task: str = "t2i",
    ) -> EncoderFeatures:
        """Encode a batch. ``images[i]`` is the (possibly empty) list of sample i's images."""
        raise NotImplementedError

    def kept_roles(self, verifi: bool = False) -> tuple[TokenRole, ...] | None:
        """The roles :meth:`encode` keeps (``None``: every real token); ``verifi`` picks the
        VERIFI default when ``roles`` is the default."""
        return resolve_roles(self.roles, verifi)

    def select_kept(self, features: EncoderFeatures, verifi: bool = False) -> EncoderFeatures:
        """Restrict all-token features to :meth:`kept_roles` (left-aligned, re-padded)."""
        roles = self.kept_roles(verifi)
        return features if roles is None else features.select_roles(roles)

    def cache_metadata(self) -> dict[str, Any]:
        """What a feature cache must match to be reused (model id, layers, dtype, roles, ...)."""
        return {
            "layer_ids": list(self.spec.layer_ids),
            "hidden_size": self.spec.hidden_size,
            "name": self.spec.name,
            "roles": roles_names(self.kept_roles(bool(getattr(self, "verifi", False)))),
        }

    def train(self, mode: bool = True) -> Encoder:  # frozen: always eval
        return super().train(False)

    def forward(
        self, prompts: Sequence[str], images: Sequence[ImageList] | None = None, *, task: str = "t2i"
    ) -> EncoderFeatures:
        return self.encode(prompts, images, task=task)


def images_to_list(images: Tensor | Sequence[ImageList] | None, batch_size: int) -> list[list[Any]]:
    """Normalise the ``images`` field of a batch into one list per sample."""
    if images is None:
        return [[] for _ in range(batch_size)]
    if isinstance(images, Tensor):
        if images.dim() == 4:
            return [[img] for img in images]
        if images.dim() == 5:
            return [list(group) for group in images]
        raise ValueError(f"images tensor must be (B, 3, H, W) or (B, R, 3, H, W), got {tuple(images.shape)}")
    return [list(group) for group in images]
