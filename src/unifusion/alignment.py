"""UniAlignment-style auxiliary objectives (seeds/unialignment_paper.txt, "Semantic alignment").

UniAlignment adds two losses to diffusion training (its Eq. 5, with λ2 = 0.05, λ3 = 0.1):

- **cross-modal** (contrastive): InfoNCE between the output embeddings of the image and
  text branches of matched pairs;
- **intrinsic-modal** (REPA-style): an intermediate DiT hidden state, through an MLP head,
  is aligned with a frozen vision-language encoder's embedding of the target image.

Adapted to UniFusion's single image stream: the "text branch output" is the
conditioning sequence the DiT consumes (masked mean of ``Conditioning.tokens``), the image
branch output is the mean of the last DiT block's image tokens, and the frozen encoder is
UniFusion's own VLM (the target image encoded with an empty prompt; mean of its image
tokens). The VLM's image tokens and the DiT's patches do not correspond one to one, so
REPA is applied to pooled states rather than per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unifusion.conditioners.base import BackboneSpec
from unifusion.features import EncoderSpec


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE of matched rows of ``a`` and ``b`` (both (N, d), any scale)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, S, D) averaged over the True positions of ``mask`` (B, S); zeros where none."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class AlignmentLosses(nn.Module):
    """Projection heads and the two auxiliary losses.

    Built like a conditioner, from YAML ``class_path`` + weights, and called by the model with
    both sides' specs (``aux_losses(encoder.spec, backbone.spec)``)::

        aux_losses:
          class_path: unifusion.alignment.AlignmentLosses
          init_args: {contrastive: 0.05, repa: 0.1}   # the paper's λ2, λ3

    Args:
        encoder: the encoder's spec (its hidden size is the REPA target dimension).
        backbone: the DiT's spec (width; depth resolves ``repa_layer``).
        contrastive: weight of the cross-modal InfoNCE loss (0 = off).
        repa: weight of the REPA-style alignment loss (0 = off).
        repa_layer: DiT block whose output is aligned (default: the middle block).
        temperature: InfoNCE temperature.
        proj_dim: width of the contrastive projection heads.
    """

    def __init__(
        self,
        encoder: EncoderSpec,
        backbone: BackboneSpec,
        contrastive: float = 0.0,
        repa: float = 0.0,
        repa_layer: int | None = None,
        temperature: float = 0.07,
        proj_dim: int = 128,
    ) -> None:
        super().__init__()
        if contrastive < 0 or repa < 0:
            raise ValueError(f"aux loss weights must be >= 0, got contrastive={contrastive}, repa={repa}")
        if contrastive == 0 and repa == 0:
            raise ValueError(
                "AlignmentLosses with contrastive=0 and repa=0 does nothing; set a weight or drop aux_losses"
            )
        width, depth, encoder_hidden = backbone.width, backbone.depth, encoder.hidden_size
        self.contrastive_weight, self.repa_weight = contrastive, repa
        self.repa_layer = depth // 2 if repa_layer is None else repa_layer
        if not 0 <= self.repa_layer < depth:
            raise ValueError(f"aux repa_layer must index a DiT block (0..{depth - 1}), got {repa_layer}")
        self.temperature = temperature
        self.image_head = nn.Linear(width, proj_dim)
        self.text_head = nn.Linear(width, proj_dim)
        self.repa_head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, encoder_hidden))
        self._captured: dict[str, Tensor] = {}

    @contextlib.contextmanager
    def capture(self, backbone: nn.Module) -> Iterator[dict[str, Tensor]]:
        """Record the outputs of the REPA block and the last block during one DiT forward."""
        self._captured = {}
        blocks = backbone.blocks

        def hook(name: str):
            def fn(_mod, _args, out):
                self._captured[name] = out

            return fn

        handles = [
            blocks[self.repa_layer].register_forward_hook(hook("repa")),
            blocks[-1].register_forward_hook(hook("last")),
        ]
        try:
            yield self._captured
        finally:
            for h in handles:
                h.remove()

    def forward(
        self, num_image_tokens: int, cond_tokens: Tensor | None, cond_mask: Tensor, target_embedding: Tensor | None
    ) -> dict[str, Tensor]:
        """Losses from the captured states; ``target_embedding`` (B, H_E) for REPA."""
        out: dict[str, Tensor] = {}
        if self.contrastive_weight > 0:
            if cond_tokens is None:
                raise ValueError("the contrastive aux loss needs prefix conditioning tokens (not KV-fusion only)")
            valid = cond_mask.any(1)  # dropped (unconditional) samples have no text to match
            if int(valid.sum()) >= 2:
                img = self._captured["last"][:, -num_image_tokens:].mean(1)
                txt = masked_mean(cond_tokens, cond_mask)
                out["contrastive"] = info_nce(self.image_head(img[valid]), self.text_head(txt[valid]), self.temperature)
            else:
                out["contrastive"] = self.image_head.weight.sum() * 0.0
        if self.repa_weight > 0:
            if target_embedding is None:
                raise ValueError("the REPA aux loss needs the encoder's embedding of the target image")
            z = self.repa_head(self._captured["repa"][:, -num_image_tokens:].mean(1))
            out["repa"] = 1.0 - F.cosine_similarity(z.float(), target_embedding.float(), dim=-1).mean()
        return out

    def weighted(self, losses: dict[str, Tensor]) -> Tensor:
        total = 0.0
        if "contrastive" in losses:
            total = total + self.contrastive_weight * losses["contrastive"]
        if "repa" in losses:
            total = total + self.repa_weight * losses["repa"]
        return total
