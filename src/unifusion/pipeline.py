"""``UniFusionPipeline``: the inference object users keep — condition, generate, edit, save, load.

A pipeline holds the frozen encoder, the conditioner, the refiner, the DiT backbone, the
autoencoder, the flow and a :class:`SamplingConfig`. Training (:class:`unifusion.models.UniFusionModel`)
wraps one; ``generate``/``edit``/``eval``/``analyze``/``predict`` use one.

Saving and loading build on ``huggingface_hub``'s :class:`~huggingface_hub.ModelHubMixin`
(``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` and the model card) rather than on
diffusers' ``DiffusionPipeline``/``ModelMixin``: a diffusers pipeline loads every component by
library and class name with ``from_pretrained``, so every part would have to become a diffusers
``ModelMixin`` with a self-contained config, whereas our conditioner and backbone are built
*from the other parts' specs* (``conditioner(encoder.spec, backbone.spec)``,
``backbone(autoencoder.spec)``). The hub mixin leaves the folder layout to us: each part is
stored as the same ``class_path`` + ``init_args`` config that YAML and LightningCLI use, plus
safetensors weights, and is rebuilt through the same typed jsonargparse path as training.

Folder layout written by :meth:`UniFusionPipeline.save_pretrained` (no pickle anywhere)::

    config.json                 format, component configs, sampling, kernel_impl, encoder reference
    conditioner/config.json     {"class_path": ..., "init_args": ...}
    conditioner/model.safetensors
    refiner/..., backbone/...   (likewise; autoencoder/ only when it has trainable weights)
    encoder/                    only with ``include_encoder``: the VLM's own save_pretrained
    README.md                   model card (training config, steps, ShapesBench result if any)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from PIL import Image
from torch import Tensor, nn

from unifusion.autoencoders import Autoencoder, IdentityAutoencoder, LatentSpec
from unifusion.conditioners.base import BackboneSpec, Conditioner, Conditioning
from unifusion.encoders.base import Encoder, images_to_list
from unifusion.errors import CheckpointError, UserError, first_line
from unifusion.features import EncoderFeatures, EncoderSpec, TokenRole
from unifusion.flow import RectifiedFlow, combine_guidance, guided_velocity, sample

log = logging.getLogger(__name__)

IMAGE_ROLES = (TokenRole.IMAGE_TILE, TokenRole.THUMBNAIL)
FORMAT = "unifusion-pipeline"
FORMAT_VERSION = 1
#: the parts whose weights a pipeline folder stores (the encoder is a reference unless included)
WEIGHT_PARTS = ("conditioner", "refiner", "backbone", "autoencoder")
COMPONENTS = ("encoder", "conditioner", "refiner", "backbone", "autoencoder", "flow")
WEIGHTS_FILE = "model.safetensors"
PART_CONFIG = "config.json"


@dataclass
class SamplingConfig:
    """How a pipeline samples unless a call says otherwise.

    Attributes:
        steps: sampler steps.
        guidance: text classifier-free-guidance scale (1 = no guidance).
        image_guidance: image guidance scale for editing (three-way CFG, InstructPix2Pix form).
        sampler: ``euler`` or ``heun``.
        shift: timestep shift (> 1 spends more steps at high noise).
        spacing: ``flux`` (evenly spaced, Flux/Krea-2) or ``diffusers`` (equals diffusers'
            ``FlowMatchEulerDiscreteScheduler.set_timesteps`` step for step); see :mod:`unifusion.flow`.
        seed: default seed of the initial noise.
    """

    steps: int = 25
    guidance: float = 4.0
    image_guidance: float = 1.5
    sampler: Literal["euler", "heun"] = "euler"
    shift: float = 1.0
    spacing: Literal["flux", "diffusers"] = "flux"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampling.steps must be >= 1, got {self.steps}")
        if self.sampler not in ("euler", "heun"):
            raise ValueError(f"sampling.sampler must be 'euler' or 'heun', got {self.sampler!r}")
        if self.spacing not in ("flux", "diffusers"):
            raise ValueError(f"sampling.spacing must be 'flux' or 'diffusers', got {self.spacing!r}")
        if self.shift <= 0:
            raise ValueError(f"sampling.shift must be > 0, got {self.shift}")

    def resolve(self, **overrides: Any) -> SamplingConfig:
        """A copy with the ``overrides`` that are not None."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown sampling settings {sorted(unknown)}; valid: {sorted(names)}")
        return SamplingConfig(**{**asdict(self), **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class UniFusionPipelineOutput:
    """What :meth:`UniFusionPipeline.generate` returns (diffusers' convention).

    Attributes:
        images: PIL images (``output_type="pil"``) or a ``(B, 3, H, W)`` float tensor in [0, 1] (``"pt"``).
        texts: per-sample text the DiT was conditioned on when the encoder rewrote it (VERIFI), else None.
        settings: the sampling settings used.
    """

    images: list[Image.Image] | Tensor
    texts: list[str] | None
    settings: SamplingConfig


def mask_features(features: EncoderFeatures, keep: Tensor) -> EncoderFeatures:
    """AND the padding mask with ``keep`` ((B, 1) or (B, S)); masked tokens become padding.

    Used for classifier-free guidance: an all-False ``keep`` gives the unconditional input
    (the DiT substitutes its learned null token), the image-role mask the image-only input.
    """
    mask = features.mask & keep
    hidden = features.hidden * mask[:, :, None, None].to(features.hidden.dtype)
    roles = torch.where(mask, features.roles, torch.zeros_like(features.roles))
    return EncoderFeatures(hidden=hidden, mask=mask, roles=roles, layer_ids=features.layer_ids, texts=features.texts)


def _concat_features(items: Sequence[EncoderFeatures]) -> EncoderFeatures:
    return EncoderFeatures(
        hidden=torch.cat([f.hidden for f in items]),
        mask=torch.cat([f.mask for f in items]),
        roles=torch.cat([f.roles for f in items]),
        layer_ids=items[0].layer_ids,
        texts=items[0].texts,
    )


def to_pil(images: Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [0, 1] -> PIL RGB images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


class UniFusionPipeline(nn.Module, ModelHubMixin, library_name="unifusion", tags=["text-to-image", "unifusion"]):
    """Text/image -> image with a frozen VLM encoder (paper §2–4), for inference.

    Args:
        encoder: the frozen encoder (e.g. :class:`unifusion.encoders.hf.HFEncoder`); it owns
            which tokens condition the DiT (token roles).
        backbone: the DiT, built as ``backbone(autoencoder.spec)`` so its channels and size
            follow the latents (YAML: ``class_path`` + hyper-parameters); an ``nn.Module`` is used as is.
        conditioner: built as ``conditioner(encoder.spec, backbone.spec)``; a ``Conditioner`` is used as is.
        refiner: built as ``refiner(backbone.spec.width)``; bidirectional blocks over the
            conditioning sequence (paper §3.2); None disables it.
        autoencoder: image <-> latent map; None = pixel space.
        flow: the rectified-flow objective (training) and timestep convention.
        sampling: default sampling settings (:class:`SamplingConfig`).
        kernel_impl: ``torch | triton | auto`` for every kernel op in this pipeline's modules
            (per pipeline: two pipelines in one process keep their own).
    """

    def __init__(
        self,
        encoder: Encoder,
        backbone: Callable[[LatentSpec], nn.Module] | nn.Module,
        conditioner: Callable[[EncoderSpec, BackboneSpec], Conditioner] | Conditioner,
        refiner: Callable[[int], nn.Module] | nn.Module | None = None,
        autoencoder: Autoencoder | None = None,
        flow: RectifiedFlow | None = None,
        sampling: SamplingConfig | None = None,
        kernel_impl: Literal["torch", "triton", "auto"] = "torch",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.autoencoder = autoencoder if autoencoder is not None else IdentityAutoencoder()
        self.backbone = backbone if isinstance(backbone, nn.Module) else backbone(self.autoencoder.spec)
        if not hasattr(self.backbone, "spec"):
            raise TypeError(f"backbone {type(self.backbone).__name__} must expose .spec -> BackboneSpec")
        self._check_latents()
        self.conditioner = (
            conditioner if isinstance(conditioner, nn.Module) else conditioner(encoder.spec, self.backbone.spec)
        )
        if refiner is None or isinstance(refiner, nn.Module):
            self.refiner = refiner
        else:
            self.refiner = refiner(self.backbone.spec.width)
        self.flow = flow if flow is not None else RectifiedFlow()
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.kernel_impl = kernel_impl
        self.set_kernel_impl(kernel_impl)
        #: ``{"encoder": {"class_path":..., "init_args":...}, ...}`` when known (built from a config)
        self.component_config: dict[str, Any] | None = None
        #: training provenance for the model card (config, steps, eval results)
        self.provenance: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    def _check_latents(self) -> None:
        channels = getattr(self.backbone, "in_channels", None)
        if channels is not None and channels != self.autoencoder.latent_channels:
            raise ValueError(
                f"the DiT takes {channels} input channels but the autoencoder {type(self.autoencoder).__name__} "
                f"makes {self.autoencoder.latent_channels}-channel latents; drop in_channels from the backbone config "
                f"(it follows the autoencoder)"
            )

    @classmethod
    def from_config(cls, components: dict[str, Any], **overrides: Any) -> UniFusionPipeline:
        """Build from ``class_path``/``init_args`` configs (the YAML ``model:`` keys of a run).

        ``components`` holds ``encoder``, ``backbone``, ``conditioner`` and optionally
        ``refiner``, ``autoencoder``, ``flow``, ``sampling``, ``kernel_impl``; they go through
        the same typed parser as ``unifusion fit``, so the same configs are accepted and refused.
        """
        from jsonargparse import ArgumentParser

        known = {*COMPONENTS, "sampling", "kernel_impl"}
        cfg = {k: v for k, v in {**components, **overrides}.items() if k in known}
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "pipeline", fail_untyped=False)
        try:
            parsed = parser.parse_object({"pipeline": cfg})
            pipeline = parser.instantiate(parsed).pipeline
        except UserError:
            raise
        except Exception as e:  # jsonargparse reports bad class paths / values in its own types
            raise UserError(f"cannot build the pipeline from its config: {first_line(e)}") from e
        pipeline.component_config = {k: copy.deepcopy(cfg.get(k)) for k in COMPONENTS}
        return pipeline

    # ------------------------------------------------------------------ kernels
    def set_kernel_impl(self, impl: Literal["torch", "triton", "auto"] | None) -> None:
        """Use ``impl`` for every kernel op of this pipeline's modules (not process-wide)."""
        import unifusion.layers as layers

        layers.set_kernel_impl(self, impl)
        if impl is not None:
            self.kernel_impl = impl

    @contextlib.contextmanager
    def use_kernel_impl(self, impl: Literal["torch", "triton", "auto"]) -> Iterator[None]:
        """Temporarily switch this pipeline's kernel implementation (e.g. sample with ``torch``
        while training under the Triton interpreter)."""
        import unifusion.layers as layers

        with layers.use_kernel_impl(self, impl):
            yield

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def image_size(self) -> int:
        """The native image side in pixels (the DiT's nominal latent side x compression)."""
        return int(self.latent_shape()[-1] * getattr(self.autoencoder, "compression", 1))

    def latent_shape(self, size: int | None = None) -> tuple[int, int, int]:
        comp = getattr(self.autoencoder, "compression", 1)
        native = getattr(self.backbone, "input_size", None)
        side = (size // comp) if size else native
        if side is None:
            raise ValueError("pass size= to generate: the backbone does not declare input_size")
        return (self.autoencoder.latent_channels, side, side)

    # ------------------------------------------------------------------ conditioning
    def encode(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Any]] | Tensor | None = None,
        *,
        task: str | None = None,
        **encode_kwargs: Any,
    ) -> EncoderFeatures:
        """Encoder features (restricted to the encoder's token roles) in this pipeline's device/dtype."""
        imgs = images_to_list(images, len(prompts))
        if task is None:
            task = "edit" if any(imgs) and any(p for p in prompts) else ("recon" if any(imgs) else "t2i")
        feats = self.encoder.encode(list(prompts), imgs, task=task, **encode_kwargs)
        return feats.to(self.device, dtype=self.dtype)

    def condition(self, features: EncoderFeatures) -> Conditioning:
        """Conditioner (+ refiner): ``EncoderFeatures -> Conditioning`` for the DiT."""
        cond = self.conditioner(features)
        if self.refiner is not None and cond.tokens is not None:
            cond.tokens = self.refiner(cond.tokens, cond.mask)
        return cond

    def guidance_features(
        self, features: EncoderFeatures, settings: SamplingConfig
    ) -> tuple[list[EncoderFeatures], list[str]]:
        """The branches classifier-free guidance needs: conditional, unconditional (when the
        text scale is not 1 or images are guided) and images-only (editing, image scale != 1)."""
        b = features.batch_size
        only_images = features.role_mask(IMAGE_ROLES)
        use_image = bool(only_images.any()) and settings.image_guidance != 1.0
        branches, names = [features], ["cond"]
        if use_image or settings.guidance != 1.0:
            branches.append(mask_features(features, torch.zeros(b, 1, dtype=torch.bool, device=features.mask.device)))
            names.append("uncond")
        if use_image:
            branches.append(mask_features(features, only_images))
            names.append("image")
        return branches, names

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Any]] | Tensor | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        spacing: str | None = None,
        seed: int | Sequence[int] | None = None,
        size: int | None = None,
        features: EncoderFeatures | None = None,
        encode_kwargs: dict[str, Any] | None = None,
        output_type: Literal["pil", "pt"] = "pil",
        batched_cfg: bool = True,
    ) -> UniFusionPipelineOutput:
        """Sample images for prompts (and reference images, for editing / reconstruction).

        With reference images and ``image_guidance`` != 1, three-way guidance is used
        (unconditional / images only / images + text). With ``batched_cfg`` (default) all
        guidance branches go through the conditioner once and the DiT once per step, stacked
        along the batch; ``batched_cfg=False`` runs them one by one (same result).

        Args:
            seed: one seed for the whole batch, or one per prompt (sample i's noise then does
                not depend on the batch it is in).
            output_type: ``pil`` (list of PIL images) or ``pt`` ((B, 3, H, W) in [0, 1]).
        """
        settings = self.sampling.resolve(
            steps=steps,
            guidance=guidance,
            image_guidance=image_guidance,
            sampler=sampler,
            shift=shift,
            spacing=spacing,
            seed=seed if isinstance(seed, int) else None,
        )
        was_training = self.training
        self.eval()
        try:
            if features is None:
                features = self.encode(prompts, images, **(encode_kwargs or {}))
            else:
                features = features.to(self.device, dtype=self.dtype)
            b = features.batch_size
            branches, names = self.guidance_features(features, settings)
            velocity = (
                self._batched_velocity(branches, names, settings)
                if batched_cfg
                else self._unbatched_velocity(branches, names, settings)
            )
            noise = self._initial_noise(b, seed if seed is not None else settings.seed, size)
            latents = sample(
                velocity,
                noise,
                num_steps=settings.steps,
                sampler=settings.sampler,
                shift=settings.shift,
                spacing=settings.spacing,
            )
            out = ((self.autoencoder.decode(latents).float() + 1) / 2).clamp(0, 1)
        finally:
            self.train(was_training)
        result = out if output_type == "pt" else to_pil(out)
        return UniFusionPipelineOutput(images=result, texts=features.texts, settings=settings)

    def forward(self, prompts: Sequence[str], *args: Any, **kwargs: Any) -> UniFusionPipelineOutput:
        """``pipeline(prompts, ...)`` = :meth:`generate`."""
        return self.generate(prompts, *args, **kwargs)

    def edit(
        self, images: Sequence[Any] | Sequence[Sequence[Any]], instruction: str | Sequence[str], **kwargs: Any
    ) -> UniFusionPipelineOutput:
        """Edit reference image(s) with an instruction (three-way guidance).

        ``images``: one sample's references (PIL images or (3, h, w) tensors in [0, 1]), or one
        list per instruction when ``instruction`` is a list.
        """
        if isinstance(instruction, str):
            return self.generate([instruction], [list(images)], **kwargs)
        return self.generate(list(instruction), [list(group) for group in images], **kwargs)

    def _initial_noise(self, b: int, seed: int | Sequence[int], size: int | None) -> Tensor:
        c, h, w = self.latent_shape(size)
        if isinstance(seed, int):
            g = torch.Generator(device="cpu").manual_seed(seed)
            noise = torch.randn((b, c, h, w), generator=g)
        else:
            seeds = list(seed)
            if len(seeds) != b:
                raise ValueError(f"got {len(seeds)} seeds for {b} samples")
            noise = torch.cat(
                [torch.randn((1, c, h, w), generator=torch.Generator(device="cpu").manual_seed(int(s))) for s in seeds]
            )
        return noise.to(self.device)

    def _batched_velocity(
        self, branches: list[EncoderFeatures], names: list[str], settings: SamplingConfig
    ) -> Callable[[Tensor, Tensor], Tensor]:
        k = len(branches)
        cond = self.condition(_concat_features(branches))

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            b = x.shape[0]
            v = self.backbone(x.repeat(k, 1, 1, 1), t.repeat(k), cond)
            parts = dict(zip(names, v.split(b)))
            return combine_guidance(
                parts["cond"], parts.get("uncond"), settings.guidance, parts.get("image"), settings.image_guidance
            )

        return velocity

    def _unbatched_velocity(
        self, branches: list[EncoderFeatures], names: list[str], settings: SamplingConfig
    ) -> Callable[[Tensor, Tensor], Tensor]:
        conds = {name: self.condition(f) for name, f in zip(names, branches)}

        def fn(name: str) -> Callable[[Tensor, Tensor], Tensor] | None:
            c = conds.get(name)
            return (lambda x, t: self.backbone(x, t, c)) if c is not None else None

        return guided_velocity(
            fn("cond"),
            fn("uncond") or fn("cond"),
            settings.guidance if "uncond" in conds else 1.0,
            image_cond=fn("image"),
            image_scale=settings.image_guidance,
        )

    # ------------------------------------------------------------------ saving
    def part_state_dicts(self) -> dict[str, dict[str, Tensor]]:
        """Weights of each stored part (the frozen encoder's are never included)."""
        out = {}
        for name in WEIGHT_PARTS:
            module = getattr(self, name, None)
            if module is None:
                continue
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            if state:
                out[name] = state
        return out

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike,
        *,
        include_encoder: bool = False,
        **kwargs: Any,
    ) -> str | None:
        """Write the pipeline folder (see the module docstring); ``include_encoder`` also saves
        the VLM itself (its own ``save_pretrained``) so the folder is self-contained."""
        self._include_encoder = include_encoder
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._include_encoder = False

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        if self.component_config is None:
            raise UserError(
                "this pipeline was built from module instances, so its parts have no config to save; build it with "
                "UniFusionPipeline.from_config(...) or load it from a checkpoint / folder"
            )
        save_directory = Path(save_directory)
        components = copy.deepcopy(self.component_config)
        include_encoder = getattr(self, "_include_encoder", False)
        encoder_cfg = components.get("encoder") or {}
        init = dict(encoder_cfg.get("init_args") or {})
        reference = {"path": init.get("path"), "revision": init.get("revision")}
        if init.get("path") and os.path.isdir(str(init["path"])):
            reference["resolved_path"] = os.path.abspath(str(init["path"]))
        if include_encoder:
            self._save_encoder(save_directory / "encoder")
            init["path"] = "encoder"
            init.pop("build_tiny_if_missing", None)
            reference["included"] = True
        elif reference.get("resolved_path"):
            init["path"] = reference["resolved_path"]
        encoder_cfg = {**encoder_cfg, "init_args": init}
        components["encoder"] = encoder_cfg
        for name, state in self.part_state_dicts().items():
            part_dir = save_directory / name
            part_dir.mkdir(parents=True, exist_ok=True)
            save_file(state, str(part_dir / WEIGHTS_FILE), metadata={"format": "pt", "part": name})
            (part_dir / PART_CONFIG).write_text(json.dumps(components.get(name), indent=2, sort_keys=True))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "_class_name": type(self).__name__,
            "components": components,
            "sampling": asdict(self.sampling),
            "kernel_impl": self.kernel_impl,
            "encoder_reference": reference,
            "encoder_metadata": _plain(self.encoder.cache_metadata())
            if hasattr(self.encoder, "cache_metadata")
            else {},
            "weights": self.provenance.get("weights", "raw"),
            "training": _plain({k: v for k, v in self.provenance.items() if k != "weights"}),
        }
        (save_directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    def _save_encoder(self, target: Path) -> None:
        model = getattr(self.encoder, "hf_model", None)
        if model is None:
            raise UserError(f"include_encoder: {type(self.encoder).__name__} has no HF model to save")
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(target))
        for attr in ("processor", "tokenizer"):
            obj = getattr(self.encoder, attr, None)
            if obj is not None and hasattr(obj, "save_pretrained"):
                obj.save_pretrained(str(target))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        return ModelCard(model_card_text(self))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> UniFusionPipeline:
        """Load a pipeline folder, or a hub repo id (fetched once with ``snapshot_download``)."""
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            # hub's own loader would first try the id as a repo name and report its naming rules
            # for a mistyped local path; resolve it here so the error names the missing folder
            folder = _download_pipeline(
                folder,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        return super().from_pretrained(folder, local_files_only=True, **model_kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        config: dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
        **overrides: Any,
    ) -> UniFusionPipeline:
        # from_pretrained has already made ``model_id`` a local folder (downloading a hub repo)
        return load_pipeline_folder(model_id, map_location=map_location, **overrides)


# ---------------------------------------------------------------------- loading helpers
def _download_pipeline(model_id: str, **kwargs: Any) -> str:
    """The local snapshot of hub repo ``model_id``; a clear error where ``model_id`` is neither an
    existing folder nor a hub repo that can be fetched (a mistyped local path is the usual case)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise _missing_folder(model_id) from None  # a path, not a hub id: say so, not hub's id rules
    try:
        return snapshot_download(repo_id=model_id, **kwargs)
    except Exception as e:  # offline, unknown repo, gated: hub has many error types, one message suits all
        raise _missing_folder(model_id, f"nor could it be fetched as a hub repo: {first_line(e)}") from e


def _missing_folder(folder: str, more: str = "") -> CheckpointError:
    """The error for a pipeline folder that is not there (``more``: why no hub repo stood in)."""
    hint = "export one with `unifusion export`, or check the path" + (f"; {more}" if more else "")
    return CheckpointError(f"model folder {folder!r} does not exist ({hint})")


def _plain(obj: Any) -> Any:
    """JSON-safe copy (tuples -> lists, unknown objects -> str)."""
    return json.loads(json.dumps(obj, default=str))


def load_pipeline_folder(folder: str, map_location: str | torch.device = "cpu", **overrides: Any) -> UniFusionPipeline:
    """Load a folder written by :meth:`UniFusionPipeline.save_pretrained` (safetensors + JSON only)."""
    from unifusion.checkpoints import load_safetensors_file

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise _missing_folder(folder)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(
            f"{folder!r} is not a UniFusion pipeline folder: it has no config.json "
            f"(a training checkpoint goes to --ckpt; convert it with `unifusion export`)"
        )
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({first_line(e)})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a UniFusion pipeline config (format != {FORMAT!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder!r} was written by a newer UniFusion (format {config['format_version']} > {FORMAT_VERSION}); upgrade"
        )
    components = copy.deepcopy(config["components"])
    enc = components.get("encoder") or {}
    init = dict(enc.get("init_args") or {})
    ref = config.get("encoder_reference") or {}
    if ref.get("included"):
        init["path"] = os.path.join(folder, "encoder")
    elif init.get("path") and not os.path.exists(str(init["path"])) and ref.get("path") and os.path.exists(ref["path"]):
        init["path"] = ref["path"]
    components["encoder"] = {**enc, "init_args": init}
    sampling = asdict(SamplingConfig(**config.get("sampling", {})))
    overrides = {k: asdict(v) if isinstance(v, SamplingConfig) else v for k, v in overrides.items()}
    pipeline = UniFusionPipeline.from_config(
        {**components, "sampling": sampling, "kernel_impl": config.get("kernel_impl", "torch"), **overrides}
    )
    pipeline.component_config = components
    for name in WEIGHT_PARTS:
        path = os.path.join(folder, name, WEIGHTS_FILE)
        module = getattr(pipeline, name, None)
        if module is None or not os.path.exists(path):
            if module is not None and any(True for _ in module.state_dict()):
                raise CheckpointError(f"{folder!r}: {name}/{WEIGHTS_FILE} is missing")
            continue
        state = load_safetensors_file(path, what=f"{name} weights")
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{path}: weights do not fit the {name} built from its config "
                f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
    pipeline.provenance = {"weights": config.get("weights", "raw"), **(config.get("training") or {})}
    return pipeline.to(map_location).eval()


def pipeline_config_from_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's component configs from a training checkpoint's ``hyper_parameters``."""
    missing = [k for k in ("encoder", "backbone", "conditioner") if not hparams.get(k)]
    if missing:
        raise CheckpointError(
            f"the checkpoint's hyper-parameters lack {missing}; it was not written by `unifusion fit` "
            f"(UniFusionModel built through the CLI records its full config)"
        )
    cfg = {k: copy.deepcopy(hparams.get(k)) for k in COMPONENTS}
    sampling = hparams.get("sampling")
    if isinstance(sampling, SamplingConfig):
        sampling = asdict(sampling)
    if isinstance(sampling, dict):
        cfg["sampling"] = dict(SamplingConfig(**sampling).__dict__)
    cfg["kernel_impl"] = hparams.get("kernel_impl", "torch")
    return cfg


def load_pipeline_checkpoint(
    ckpt: str, use_ema: bool = True, map_location: str | torch.device = "cpu", **overrides: Any
) -> UniFusionPipeline:
    """Build a pipeline from a ``unifusion fit`` checkpoint (``torch.load(weights_only=True)``)."""
    from unifusion.checkpoints import load_checkpoint_file

    state = load_checkpoint_file(ckpt, what="checkpoint")
    hparams = state.get("hyper_parameters")
    if not isinstance(state.get("state_dict"), dict) or not isinstance(hparams, dict):
        raise CheckpointError(
            f"{ckpt!r} is not a UniFusion training checkpoint (no state_dict / hyper_parameters); "
            f"for an exported folder use --model"
        )
    pipeline = UniFusionPipeline.from_config({**pipeline_config_from_hparams(hparams), **overrides})
    weights = dict(state["state_dict"])
    ema = state.get("ema_state_dict")
    used_ema = bool(use_ema and isinstance(ema, dict) and ema.get("shadow"))
    if used_ema:
        for k, v in ema["shadow"].items():
            if k in weights:
                weights[k] = v.to(weights[k].dtype)
    own = pipeline.state_dict()
    pipeline_weights = {k: v for k, v in weights.items() if k in own}
    missing = [k for k in own if k not in pipeline_weights and not k.startswith("encoder.")]
    if missing:
        raise CheckpointError(f"{ckpt!r}: weights for {len(missing)} tensors are missing (e.g. {missing[:3]})")
    pipeline.load_state_dict(pipeline_weights, strict=False)
    pipeline.provenance = {
        "weights": "ema" if used_ema else "raw",
        "checkpoint": os.path.abspath(ckpt),
        "global_step": int(state.get("global_step", 0) or 0),
        "epoch": int(state.get("epoch", 0) or 0),
        "config": _plain({k: v for k, v in hparams.items() if not k.startswith("_")}),
    }
    from unifusion.eval.shapesbench import trained_on_edits_from_run

    trained_on_edits = trained_on_edits_from_run(ckpt)  # the run's config.yaml, when it is beside the checkpoint
    if trained_on_edits is not None:
        pipeline.provenance["trained_on_edits"] = trained_on_edits
    return pipeline.to(map_location).eval()


def load_pipeline(
    model: str | None = None, ckpt: str | None = None, device: str | None = None, use_ema: bool = True
) -> UniFusionPipeline:
    """What the tool commands call: an exported folder (``--model DIR``) or a training
    checkpoint (``--ckpt FILE``), exactly one of them."""
    if (model is None) == (ckpt is None):
        raise UserError("give exactly one of --model DIR (an exported pipeline) or --ckpt FILE (a training checkpoint)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is not None:
        if os.path.isfile(model):
            raise CheckpointError(
                f"--model {model!r} is a file; --model takes an exported folder (a training checkpoint goes to --ckpt)"
            )
        return UniFusionPipeline.from_pretrained(model, map_location=device)
    return load_pipeline_checkpoint(ckpt, use_ema=use_ema, map_location=device)


def export_checkpoint(
    ckpt: str, out: str, use_ema: bool = True, include_encoder: bool = False, eval_results: str | None = None
) -> str:
    """Convert a training checkpoint into a pipeline folder (``unifusion export``)."""
    pipeline = load_pipeline_checkpoint(ckpt, use_ema=use_ema, map_location="cpu")
    results = eval_results or find_shapesbench_result(ckpt)
    if results:
        pipeline.provenance["shapesbench"] = read_shapesbench_summary(results)
    pipeline.save_pretrained(out, include_encoder=include_encoder)
    return out


def find_shapesbench_result(ckpt: str) -> str | None:
    """The newest ShapesBench result in the run folder that wrote ``ckpt``: ``unifusion eval shapes
    --out <run>/...`` writes ``shapes.json``, ``unifusion study`` ``eval/shapesbench.json``."""
    import glob

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    hits = [
        p
        for pattern in ("shapesbench*.json", "shapes.json")
        for p in glob.glob(os.path.join(run_dir, "**", pattern), recursive=True)
    ]
    hits.sort(key=os.path.getmtime)
    return hits[-1] if hits else None


def read_shapesbench_summary(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"ShapesBench result {path!r} is not readable JSON ({first_line(e)})") from e
    scores = data.get("scores", data) if isinstance(data, dict) else {}
    summary: dict[str, Any] = {"source": path}
    for k in ("overall", "overall_ci_low", "overall_ci_high", "overall_all", "overall_no_editing"):
        if isinstance(scores.get(k), (int, float)) and not isinstance(scores.get(k), bool):
            summary[k] = scores[k]
    cats = scores.get("categories")
    if isinstance(cats, dict):
        for cat, v in cats.items():
            acc = v.get("accuracy") if isinstance(v, dict) else v
            if isinstance(acc, (int, float)):
                summary[cat] = acc
    if scores.get("overall_note"):
        summary["note"] = str(scores["overall_note"])
    return summary


def model_card_text(pipeline: UniFusionPipeline) -> str:
    """The exported folder's README.md: what it is, how it was trained, how to load it."""
    prov = pipeline.provenance
    comps = pipeline.component_config or {}

    def cls_name(part: str) -> str:
        c = comps.get(part) or {}
        return str(c.get("class_path", "—")) if isinstance(c, dict) else "—"

    n_params = {
        name: sum(p.numel() for p in m.parameters())
        for name in WEIGHT_PARTS
        if (m := getattr(pipeline, name, None)) is not None
    }
    lines = [
        "---",
        "library_name: unifusion",
        "tags: [text-to-image, image-editing, unifusion]",
        "---",
        "# UniFusion pipeline",
        "",
        "A frozen vision-language model encodes text and images; its layer features are pooled by the "
        "conditioner and condition a single-stream DiT trained with rectified flow "
        "(*UniFusion: Vision-Language Model as Unified Encoder in Image Generation*).",
        "",
        "| part | class | parameters |",
        "|---|---|---|",
    ]
    enc_init = (comps.get("encoder") or {}).get("init_args") or {}
    lines.append(f"| encoder (frozen) | `{cls_name('encoder')}` at `{enc_init.get('path')}` | not stored |")
    for name, n in n_params.items():
        lines.append(f"| {name} | `{cls_name(name)}` | {n:,} |")
    lines += [
        "",
        f"- weights: **{prov.get('weights', 'raw')}**",
        f"- training steps: {prov.get('global_step', 'unknown')}",
        f"- sampling defaults: `{json.dumps(asdict(pipeline.sampling))}`",
    ]
    bench = prov.get("shapesbench")
    if bench:
        lines += ["", "## ShapesBench", "", "| category | score |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in bench.items() if isinstance(v, (int, float))]
        note = f"; {bench['note']}" if bench.get("note") else ""
        lines.append(f"\n(from `{bench.get('source')}`{note})")
    lines += [
        "",
        "## Load and generate",
        "",
        "```python",
        "from unifusion.pipeline import UniFusionPipeline",
        "",
        'pipe = UniFusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER")',
        'image = pipe.generate(["a red circle"], seed=0).images[0]',
        'image.save("red_circle.png")',
        "```",
    ]
    if prov.get("config"):
        import yaml

        lines += [
            "",
            "## Training config",
            "",
            "```yaml",
            yaml.safe_dump(prov["config"], sort_keys=False).strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"
