"""Krea-2's text fusion as a LAP preset (compare UniFusion §2.1 LAP, §3.2 refiner, App. A.1).

diffusers' ``Krea2TextFusion`` (``diffusers/models/transformers/transformer_krea2.py``)
is the public layerwise pooling closest to the paper's LAP + refiner adapter:

1. hidden states ``(B, S, n, H)`` -> ``(B·S, n, H)``; ``layerwise_blocks`` attend across
   the layer axis (pre-norm RMSNorm, QK-norm, grouped-query attention with a sigmoid
   output gate, SwiGLU FFN; no post-attention norm, no biases);
2. ``projector = Linear(n, 1, bias=False)`` pools the layer axis;
3. ``refiner_blocks`` (same block design) attend across the sequence with the padding
   mask;
4. in the full transformer, ``txt_in`` (RMSNorm, Linear, GELU-tanh, Linear) maps to the
   DiT width.

:class:`Krea2LayerwisePooling` rebuilds exactly that from our shared blocks (so every op
goes through :mod:`unifusion.kernels`) and is a :class:`Conditioner`; it carries its own
refiner at the *encoder* width, as Krea-2 does, so use it with the model's refiner off.
:func:`convert_krea2_state_dict` maps diffusers weights onto it. Differences that do not
change results: Krea-2's RMSNorm stores a zero-centred scale (effective ``1 + w``; the
converter adds the 1), and we compute the layerwise stage only on real tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unifusion import kernels
from unifusion.conditioners.base import BackboneSpec, Conditioner, Conditioning
from unifusion.features import EncoderFeatures, EncoderSpec
from unifusion.layers import (
    KernelImplMixin,
    LayerwiseAttentionBlock,
    RMSNorm,
    ffn_hidden_size,
    pack_tokens,
    resolve_layer_ids,
    take_layers,
    unpack_tokens,
)
from unifusion.refiners import Refiner

__all__ = ["Krea2LayerwisePooling", "Krea2TextProjection", "convert_krea2_state_dict", "load_krea2_weights"]

#: Krea-2's FFN expansion (intermediate 6912 for text width 2560).
KREA2_FFN_RATIO = 2.7


class Krea2TextProjection(nn.Module):
    """Krea-2 ``txt_in``: RMSNorm -> Linear(H, D) -> GELU(tanh) -> Linear(D, D)."""

    def __init__(self, text_dim: int, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = RMSNorm(text_dim, eps=eps)
        self.linear_1 = nn.Linear(text_dim, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.norm(x)), approximate="tanh"))


class Krea2LayerwisePooling(KernelImplMixin, Conditioner):
    """Krea-2 text fusion (layerwise blocks, Linear(n, 1), sequence refiner) + ``txt_in``.

    Args:
        encoder: the encoder's spec (``H`` = its hidden size, ``n`` = its taps or ``layers``).
        backbone: the DiT's spec (``D`` = its width).
        num_heads: attention heads of both stages (Krea-2: 20 at H=2560); must divide H.
        num_kv_heads: grouped K/V heads (None = ``num_heads``).
        intermediate_size: SwiGLU width (None = 2.7 H, Krea-2's ratio).
        num_layerwise_blocks: blocks across the layer axis (Krea-2: 2).
        num_refiner_blocks: blocks across the sequence (Krea-2: 2).
        eps: RMSNorm epsilon (Krea-2: 1e-5).
        text_projection: apply Krea-2's ``txt_in`` to reach the DiT width; False needs H == D.
        layers: absolute encoder layer ids (None = every tap).
    """

    def __init__(
        self,
        encoder: EncoderSpec,
        backbone: BackboneSpec,
        num_heads: int = 20,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        num_layerwise_blocks: int = 2,
        num_refiner_blocks: int = 2,
        eps: float = 1e-5,
        text_projection: bool = True,
        layers: list[int] | None = None,
    ) -> None:
        self.layer_ids = resolve_layer_ids(encoder.layer_ids, layers, "Krea2LayerwisePooling")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        self.text_projection = text_projection
        super().__init__(encoder, backbone)
        h, n = encoder.hidden_size, len(self.layer_ids)
        ffn = intermediate_size or ffn_hidden_size(h, KREA2_FFN_RATIO)
        block_kw = dict(
            num_kv_heads=self.num_kv_heads,
            ffn_hidden_dim=ffn,
            qk_norm=True,
            post_norm=False,
            gated_attn=True,
            bias=False,
            eps=eps,
        )
        self.layerwise_blocks = nn.ModuleList(
            LayerwiseAttentionBlock(h, num_heads, **block_kw) for _ in range(num_layerwise_blocks)
        )
        self.projector = nn.Linear(n, 1, bias=False)
        self.refiner = Refiner(h, num_refiner_blocks, num_heads, **block_kw)
        self.txt_in = Krea2TextProjection(h, backbone.width, eps=eps) if text_projection else None

    def check_compatible(self, encoder: EncoderSpec, backbone: BackboneSpec) -> None:
        super().check_compatible(encoder, backbone)
        h = encoder.hidden_size
        if h % self.num_heads != 0 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"Krea2LayerwisePooling num_heads={self.num_heads} must divide the encoder hidden size {h} "
                f"(encoder {encoder.name!r}) and be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not self.text_projection and h != backbone.width:
            raise ValueError(
                f"Krea2LayerwisePooling(text_projection=False) needs the encoder hidden size to equal the DiT "
                f"width: encoder {encoder.name!r} has {h}, DiT has {backbone.width}; set text_projection: true"
            )

    def pooling_weights(self) -> Tensor:
        """The ``Linear(n, 1)`` projector's weights ``(n,)`` (column j = layer ``self.layer_ids[j]``)."""
        return self.projector.weight[0].detach()

    def fuse(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Krea-2 ``text_fusion``: ``(B, S, n, H)`` -> ``(B, S, H)``, zeros on padding."""
        x = pack_tokens(hidden, mask)  # real tokens only; the layer axis needs no mask
        for block in self.layerwise_blocks:
            x = block(x)
        # Linear(n, 1) over the layer axis, as the fused kernel (no permuted copy)
        pooled = kernels.layer_pool(x, self.projector.weight[0].to(x.dtype), impl=self.kernel_impl)  # (T, H)
        return self.refiner(unpack_tokens(pooled, mask), mask)

    def condition(self, features: EncoderFeatures) -> Conditioning:
        hidden = take_layers(features.hidden, features.layer_ids, self.layer_ids)
        y = self.fuse(hidden, features.mask)
        if self.txt_in is not None:
            y = self.txt_in(y) * features.mask[..., None].to(y.dtype)
        return Conditioning(tokens=y, mask=features.mask)


_RMS_SUFFIXES = (".norm1.weight", ".norm2.weight", ".norm_q.weight", ".norm_k.weight", "txt_in.norm.weight")


def convert_krea2_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers Krea-2 weights -> a :class:`Krea2LayerwisePooling` state dict.

    Accepts the state dict of a ``Krea2TextFusion`` (keys ``layerwise_blocks.*``,
    ``projector.*``, ``refiner_blocks.*``), optionally with ``txt_in.*`` of a
    ``Krea2TextProjection`` beside it, or a whole ``Krea2Transformer2DModel`` (then
    ``text_fusion.*`` and ``txt_in.*`` are taken and everything else is ignored).
    Zero-centred RMSNorm scales become ordinary ones (``w + 1``); ``to_out.0`` becomes
    ``to_out`` and ``refiner_blocks.i`` becomes ``refiner.blocks.i``.
    """
    out: dict[str, Tensor] = {}
    full_model = any(k.startswith("text_fusion.") for k in state_dict)
    for key, value in state_dict.items():
        if full_model:
            if key.startswith("text_fusion."):
                key = key[len("text_fusion.") :]
            elif not key.startswith("txt_in."):
                continue
        new = key.replace(".attn.to_out.0.", ".attn.to_out.")
        new = re.sub(r"^refiner_blocks\.", "refiner.blocks.", new)
        if not new.startswith(("layerwise_blocks.", "projector.", "refiner.blocks.", "txt_in.")):
            raise KeyError(f"unexpected key {key!r} in a Krea-2 text-fusion state dict")
        if new.endswith(_RMS_SUFFIXES):
            value = (value.float() + 1.0).to(value.dtype)
        out[new] = value
    return out


@torch.no_grad()
def load_krea2_weights(module: Krea2LayerwisePooling, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
    """Convert and load diffusers Krea-2 text-fusion weights into ``module``."""
    converted = convert_krea2_state_dict(state_dict)
    if module.txt_in is None:
        converted = {k: v for k, v in converted.items() if not k.startswith("txt_in.")}
    module.load_state_dict(converted, strict=strict)


def read_krea2_weights(src: str) -> dict[str, Tensor]:
    """Read diffusers Krea-2 weights from ``src`` without unpickling code: a ``.safetensors``
    file, a diffusers model folder (``diffusion_pytorch_model*.safetensors``, sharded or not) or a
    ``.bin``/``.pt`` file (``torch.load(weights_only=True)``)."""
    import glob
    import os

    from unifusion.checkpoints import load_checkpoint_file, load_safetensors_file
    from unifusion.errors import CheckpointError

    if os.path.isdir(src):
        files = sorted(glob.glob(os.path.join(src, "**", "*.safetensors"), recursive=True))
        if not files:
            raise CheckpointError(f"Krea-2 weights: no *.safetensors files under {src!r}")
    elif src.endswith(".safetensors"):
        files = [src]
    else:
        state = load_checkpoint_file(src, what="Krea-2 weights")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"Krea-2 weights {src!r} hold no state dict of tensors")
        return dict(state)
    out: dict[str, Tensor] = {}
    for f in files:
        out.update(load_safetensors_file(f, what="Krea-2 weights"))
    return out


def convert_krea2_file(src: str, out_dir: str, conditioner_config: dict | None = None) -> str:
    """Convert diffusers Krea-2 text-fusion weights into a pipeline-folder part
    (``OUT/conditioner/model.safetensors`` + ``config.json``) that loads through the same path as
    an exported pipeline: ``--model.init_from=OUT --model.init_prefixes=[conditioner]`` with the
    ``experiments/conditioners/krea2.yaml`` overlay."""
    import json
    import os

    from safetensors.torch import save_file

    converted = convert_krea2_state_dict(read_krea2_weights(src))
    part = os.path.join(out_dir, "conditioner")
    os.makedirs(part, exist_ok=True)
    save_file({k: v.contiguous() for k, v in converted.items()}, os.path.join(part, "model.safetensors"))
    config = conditioner_config or {"class_path": "unifusion.conditioners.Krea2LayerwisePooling", "init_args": {}}
    with open(os.path.join(part, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**config, "converted_from": os.path.abspath(src)}, f, indent=2)
    return out_dir
