"""Frozen Hugging Face encoders (VLMs, causal LMs, T5) as :class:`~unifusion.encoders.base.Encoder`.

``HFEncoder`` renders each sample through the model's chat template (system prompt,
images, the user's words), tokenizes the whole batch in one processor call, runs the
language model **only up to the deepest tapped layer** and, for causal text, only up to the
last kept token (``truncate=True``), and returns
:class:`~unifusion.features.EncoderFeatures` restricted to the configured token
``roles`` (default: the paper's user content + image tokens; the template is part of the
forward but not of the output). Layer ids follow :mod:`unifusion.encoders.layers` (0 =
embedding output, ``i`` = raw output of block ``i``; the last is *before* the final norm).

Captions are text: special-token strings in them (``<image>``, ``<|image_pad|>``,
``<IMG_CONTEXT>``, ``<start_of_image>``, ``<|im_end|>``, ...) are broken up before the
processor sees them, so a scraped alt-text cannot add image slots or end a chat turn.

The HF model is frozen (eval, no grad) and deliberately kept **outside** the module tree:
it is not in ``state_dict()``, ``parameters()`` or checkpoints, and an optimizer never
sees it. It follows the Lightning module's device through a non-persistent anchor
buffer and is loaded lazily on the first :meth:`HFEncoder.encode` (``spec`` reads the
config only).

Example YAML::

    encoder:
      class_path: unifusion.encoders.hf.HFEncoder
      init_args:
        path: artifacts/tiny/llava        # real: llava-hf/llava-1.5-7b-hf
        layers: every:3
        build_tiny_if_missing: llava
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unifusion.encoders.base import Encoder, ImageList, images_to_list
from unifusion.encoders.layers import resolve_layers
from unifusion.encoders.tiling import tile_image, to_pil
from unifusion.errors import first_line
from unifusion.features import EncoderFeatures, EncoderSpec, TokenRole, parse_roles_spec, roles_names

#: The VERIFI system prompt used when ``verifi=True`` and no ``system_prompt`` is given.
DEFAULT_VERIFI_PROMPT = (
    "You are a prompt rewriter for an image generator. Rewrite the user's request into one detailed, "
    "self-contained description of the target image: every object with its shape, color, size and position, "
    "and the background. If an image is given, describe the image after the requested edit; if no instruction "
    "is given, describe the given image exactly. Answer with the description only."
)

VLM_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "internvl", "gemma3")
TEXT_FAMILIES = ("llama", "t5")
_MODEL_TYPE_TO_FAMILY = {
    "llava": "llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "internvl": "internvl",
    "gemma3": "gemma3",
    "t5": "t5",
    "mt5": "t5",
    "umt5": "t5",
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
_DTYPES.update({"bfloat16": torch.bfloat16, "bf16": torch.bfloat16})
_SENTINEL = "\ue000UNIFUSION_USER\ue001"


@dataclass
class PreparedBatch:
    """Model inputs of a rendered batch plus the per-token mask/roles (and VERIFI texts).

    Holds **every** token (template included): the forward needs them all; :meth:`HFEncoder.encode`
    keeps the configured roles afterwards.
    """

    inputs: dict[str, Any]
    mask: Tensor
    roles: Tensor
    texts: list[str] | None = None


class _StopForward(Exception):
    """Raised by the hook on the deepest tapped layer to end a truncated forward."""


class _Frozen:
    """Plain (non-``nn.Module``) holder for the HF model, so it stays out of the module tree.

    Deep copies share the frozen model (it never changes); pickling drops it (reloaded lazily).
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.tokenizer: Any = None
        #: matches the tokenizer's special-token strings inside user text (see ``neutralise``)
        self.special_re: re.Pattern[str] | None = None
        #: (n_images, system prompt) -> the rendered chat around the user text (prefix, suffix)
        self.templates: dict[tuple[int, str | None], tuple[str, str]] = {}
        self.image_ids: Tensor | None = None

    def __deepcopy__(self, memo: dict) -> _Frozen:
        return self

    def __getstate__(self) -> dict:
        return {
            "model": None,
            "processor": None,
            "tokenizer": None,
            "special_re": None,
            "templates": {},
            "image_ids": None,
        }


def detect_family(config: Any) -> str:
    """Map an HF config to one of the supported families (causal text LMs -> ``"llama"``)."""
    mt = getattr(config, "model_type", "")
    if mt in _MODEL_TYPE_TO_FAMILY:
        return _MODEL_TYPE_TO_FAMILY[mt]
    if getattr(config, "vision_config", None) is not None:
        raise ValueError(
            f"VLM model_type {mt!r} is not supported by HFEncoder; supported VLM families: {', '.join(VLM_FAMILIES)}"
        )
    return "llama"


def _check_path(path: str) -> None:
    """Fail early, naming the path and the fix, when ``path`` is not a usable model."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"Encoder path {path!r} exists but has no config.json. Point `path` at a save_pretrained "
                f"directory, or set `build_tiny_if_missing: <family>` to build a tiny model there."
            )
        return
    parts = path.split("/")
    hub_id = len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and not os.path.isabs(path)
    if not hub_id:
        raise FileNotFoundError(
            f"Encoder path {path!r} does not exist. Build a tiny model there with "
            f"`unifusion.encoders.tiny.build_tiny_vlm({path!r}, family)` (or set `build_tiny_if_missing: <family>`), "
            f"or give a Hugging Face repo id that is in the local cache."
        )


class HFEncoder(Encoder):
    """A frozen HF VLM / LM / T5 encoder tapping several layers.

    Args:
        path: ``save_pretrained`` directory or hub id (must be available offline).
        layers: which layers to tap: ``"all"``, ``"last"``, ``"penultimate"``, ``"every:K"``,
            an int, a list of ints (negative from the end) or ``{"every": K}``; see
            :mod:`unifusion.encoders.layers`.
        family: ``llava``, ``qwen2_vl``, ``qwen2_5_vl``, ``internvl``, ``gemma3``, ``llama``
            (any causal text LM) or ``t5``; ``None`` detects it from the config.
        dtype: weights/compute dtype (``float32``, ``bfloat16``, ``float16``).
        device: force a device; ``None`` follows the device the module is moved to.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``, ...).
        system_prompt: system message; with ``verifi`` it is the rewrite instruction
            (default :data:`DEFAULT_VERIFI_PROMPT`). Overridable per call.
        max_length: maximum tokens per sample; longer user text is cut to fit (images
            and template are kept); a sample that cannot fit raises ``ValueError``.
        max_tiles: tiles per reference image (1 = the image as one thumbnail; >1 adds
            a thumbnail after the tiles).
        tile_size: tile side in px; ``None`` uses the vision tower's input size.
        truncate: run the language model only up to the deepest tapped layer, and (causal
            models, text-only batches) only up to each sample's last kept token.
        use_chat_template: render prompts with the tokenizer's chat template (required
            for VLMs; ``t5`` never uses one).
        build_tiny_if_missing: a tiny family name: build a tiny random model at ``path``
            when it has no ``config.json`` (quickstart, tests).
        verifi: rewrite each input with the VLM first (VERIFI) and keep the features of
            the prompt + generated tokens; generated tokens get role ``GENERATED``.
        verifi_max_new_tokens / verifi_do_sample / verifi_temperature / verifi_top_p /
        verifi_seed: generation settings for VERIFI (greedy by default).
        verifi_batch: generate the whole batch at once (left-padded); ``False`` generates
            sample by sample.
        on_images: what a text-only encoder (``llama``, ``t5``) does with reference images:
            ``"error"`` (default) raises; ``"ignore"`` drops them (the text-only baselines
            of the paper train on text-to-image only; use this to run mixed-task data anyway).
        roles: which tokens :meth:`encode` returns — the single place token roles are
            chosen (training, the feature cache, sampling and REPA all see these):
            ``None``/``"default"`` = the paper's default (user text + image tiles +
            thumbnail; with VERIFI: generated tokens + image tokens), ``"all"`` = every
            real token (system prompt and chat template too), or a list of role names
            (``system``, ``user_text``, ``image_tile``, ``thumbnail``, ``generated``).
        revision: hub branch, tag or commit of ``path`` (``from_pretrained(revision=...)``);
            recorded in exported pipeline folders as the encoder reference.
    """

    def __init__(
        self,
        path: str,
        layers: str | int | list[int] | dict[str, int] = "every:3",
        family: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        attn_implementation: str = "sdpa",
        system_prompt: str | None = None,
        max_length: int = 512,
        max_tiles: int = 1,
        tile_size: int | None = None,
        truncate: bool = True,
        use_chat_template: bool = True,
        build_tiny_if_missing: str | None = None,
        verifi: bool = False,
        verifi_max_new_tokens: int = 64,
        verifi_do_sample: bool = False,
        verifi_temperature: float = 0.7,
        verifi_top_p: float = 0.9,
        verifi_seed: int = 0,
        verifi_batch: bool = True,
        on_images: str = "error",
        roles: str | list[str] | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        # a hub branch, tag or commit (pinned in exported pipeline folders); None for local folders
        self.revision = revision
        try:
            parse_roles_spec(roles)
        except ValueError as e:
            raise ValueError(f"HFEncoder roles={roles!r}: {e}") from e
        self.roles = roles
        from transformers import AutoConfig

        if build_tiny_if_missing:
            from unifusion.encoders.tiny import ensure_tiny_vlm

            ensure_tiny_vlm(path, build_tiny_if_missing)
        _check_path(path)
        if dtype not in _DTYPES:
            raise ValueError(f"HFEncoder dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        if max_tiles < 1:
            raise ValueError(f"HFEncoder max_tiles must be >= 1, got {max_tiles}")
        if max_length < 1:
            raise ValueError(f"HFEncoder max_length must be >= 1, got {max_length}")
        self.path = path
        try:
            self.config = AutoConfig.from_pretrained(path, revision=revision)
        except OSError as e:
            raise FileNotFoundError(
                f"Could not load the encoder config from {path!r} ({first_line(e, with_type=True)}). "
                f"Put the checkpoint in the local Hugging Face cache first (e.g. `huggingface-cli download {path}`), "
                f"point `path` at a local save_pretrained directory, or set `build_tiny_if_missing: <family>`."
            ) from e
        self.family = family or detect_family(self.config)
        if self.family == "text":
            self.family = "llama"
        if self.family not in VLM_FAMILIES + TEXT_FAMILIES:
            raise ValueError(
                f"HFEncoder family {self.family!r} is not one of {', '.join(VLM_FAMILIES + TEXT_FAMILIES)}"
            )
        if verifi and self.family == "t5":
            raise ValueError("VERIFI needs a generative model; the t5 family is an encoder only (set verifi: false)")
        if on_images not in ("error", "ignore"):
            raise ValueError(f"HFEncoder on_images must be 'error' or 'ignore', got {on_images!r}")
        self.on_images = on_images
        self.layers_spec = layers
        self.dtype_name = dtype
        self.device_override = device
        self.attn_implementation = attn_implementation
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.max_tiles = max_tiles
        self.tile_size_arg = tile_size
        self.truncate = truncate
        self.use_chat_template = use_chat_template and self.family != "t5"
        self.verifi = verifi
        self.verifi_max_new_tokens = verifi_max_new_tokens
        self.verifi_do_sample = verifi_do_sample
        self.verifi_temperature = verifi_temperature
        self.verifi_top_p = verifi_top_p
        self.verifi_seed = verifi_seed
        self.verifi_batch = verifi_batch
        self._spec = self._make_spec()
        self._hf = _Frozen()
        # moves with the Lightning module (not saved): tells the lazy HF model where to live
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    # ------------------------------------------------------------------ spec / metadata
    @property
    def is_vlm(self) -> bool:
        return self.family in VLM_FAMILIES

    def _text_config(self) -> Any:
        if self.family == "t5":
            return self.config
        return self.config.get_text_config()

    def _make_spec(self) -> EncoderSpec:
        tc = self._text_config()
        if self.family == "t5":
            hidden, depth, heads = tc.d_model, tc.num_layers, tc.num_heads
            head_dim = tc.d_kv
        else:
            hidden, depth, heads = tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads
            head_dim = getattr(tc, "head_dim", None) or hidden // heads
        try:
            ids = resolve_layers(self.layers_spec, depth)
        except ValueError as e:
            raise ValueError(f"HFEncoder(path={self.path!r}, layers={self.layers_spec!r}): {e}") from e
        name = os.path.basename(os.path.normpath(self.path)) if os.path.isdir(self.path) else self.path
        return EncoderSpec(
            hidden_size=int(hidden),
            layer_ids=ids,
            depth=int(depth),
            num_heads=int(heads),
            head_dim=int(head_dim),
            name=name,
        )

    @property
    def spec(self) -> EncoderSpec:
        return self._spec

    @property
    def effective_system_prompt(self) -> str | None:
        if self.system_prompt is None and self.verifi:
            return DEFAULT_VERIFI_PROMPT
        return self.system_prompt

    def cache_metadata(self) -> dict[str, Any]:
        meta = {
            "name": self.spec.name,
            "path": os.path.abspath(self.path) if os.path.isdir(self.path) else self.path,
            "family": self.family,
            "layer_ids": list(self.spec.layer_ids),
            "hidden_size": self.spec.hidden_size,
            "depth": self.spec.depth,
            "model_dtype": self.dtype_name,
            "verifi": self.verifi,
            "system_prompt": self.effective_system_prompt,
            "max_tiles": self.max_tiles,
            "tile_size": self.tile_size_arg,
            "max_length": self.max_length,
            "use_chat_template": self.use_chat_template,
            "roles": roles_names(self.kept_roles(self.verifi)),
        }
        if self.revision is not None:  # absent for local folders, so existing caches stay valid
            meta["revision"] = self.revision
        if self.verifi:
            meta.update(
                verifi_max_new_tokens=self.verifi_max_new_tokens,
                verifi_do_sample=self.verifi_do_sample,
                verifi_temperature=self.verifi_temperature,
                verifi_top_p=self.verifi_top_p,
                verifi_seed=self.verifi_seed,
            )
        return meta

    # ------------------------------------------------------------------ loading
    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    @property
    def target_device(self) -> torch.device:
        if self.device_override is not None:
            return torch.device(self.device_override)
        return self._device_anchor.device

    @property
    def loaded(self) -> bool:
        return self._hf.model is not None

    def _model_class(self) -> Any:
        import transformers as tf

        return {
            "llava": tf.LlavaForConditionalGeneration,
            "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
            "internvl": tf.InternVLForConditionalGeneration,
            "gemma3": tf.Gemma3ForConditionalGeneration,
            "llama": tf.AutoModelForCausalLM,
            "t5": tf.T5EncoderModel,
        }[self.family]

    def _load_processor(self) -> Any:
        import transformers as tf

        from unifusion.encoders.processors import InternVLProcessorNoVideo, Qwen2VLProcessorNoVideo

        if not self.is_vlm:
            return None
        cls = {
            "llava": tf.LlavaProcessor,
            "qwen2_vl": Qwen2VLProcessorNoVideo,
            "qwen2_5_vl": Qwen2VLProcessorNoVideo,
            "internvl": InternVLProcessorNoVideo,
            "gemma3": tf.Gemma3Processor,
        }[self.family]
        proc = cls.from_pretrained(self.path, revision=self.revision)
        if self.family == "internvl":
            ip = proc.image_processor
            ip.crop_to_patches = self.max_tiles > 1
            ip.min_patches = 1
            ip.max_patches = self.max_tiles
        return proc

    def load(self) -> HFEncoder:
        """Load weights, tokenizer and processor now (otherwise done on first encode)."""
        if self.loaded:
            self._move_to_target()
            return self
        # loading may draw from the global RNG (weight init before the checkpoint is read);
        # keep it untouched so a resumed run draws the same noise as an uninterrupted one
        with torch.random.fork_rng(devices=[]):
            return self._load()

    def _load(self) -> HFEncoder:
        from transformers import AutoTokenizer

        kwargs: dict[str, Any] = {"dtype": self.torch_dtype, "revision": self.revision}
        if self.family != "t5":
            kwargs["attn_implementation"] = self.attn_implementation
        model = self._model_class().from_pretrained(self.path, **kwargs)
        model.eval()
        model.requires_grad_(False)
        processor = self._load_processor()
        tokenizer = (
            processor.tokenizer
            if processor is not None
            else AutoTokenizer.from_pretrained(self.path, revision=self.revision)
        )
        proc_template = getattr(processor, "chat_template", None) if processor is not None else None
        if proc_template and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = proc_template  # some VLM checkpoints keep it with the processor only
        if self.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"The tokenizer at {self.path!r} has no chat template, which HFEncoder(family={self.family!r}) "
                f"needs to build prompts. Use an instruct/chat checkpoint, add `chat_template` to its "
                f"tokenizer_config.json, or set `use_chat_template: false` (text-only families)."
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._hf.model, self._hf.processor, self._hf.tokenizer = model, processor, tokenizer
        self._hf.special_re = _special_token_pattern(tokenizer, processor)
        self._hf.templates = {}
        self._hf.image_ids = None
        self._move_to_target()
        return self

    def _move_to_target(self) -> None:
        dev = self.target_device
        model = self._hf.model
        if next(model.parameters()).device != dev:
            self._hf.model = model.to(dev)

    @property
    def hf_model(self) -> Any:
        """The (lazily loaded) frozen HF model."""
        return self.load()._hf.model

    @property
    def tokenizer(self) -> Any:
        return self.load()._hf.tokenizer

    @property
    def processor(self) -> Any:
        return self.load()._hf.processor

    def blocks(self) -> Any:
        """The ``ModuleList`` of the language model's blocks (tapped by layer id ``1..depth``)."""
        model = self.hf_model
        if self.family == "t5":
            return model.encoder.block
        return model.get_decoder().layers

    @property
    def tile_size(self) -> int:
        if self.tile_size_arg is not None:
            return self.tile_size_arg
        vc = getattr(self.config, "vision_config", None)
        size = getattr(vc, "image_size", None) if vc is not None else None
        if isinstance(size, (list, tuple)):
            size = size[0]
        return int(size) if size else 448

    # ------------------------------------------------------------------ prompts
    def _image_placeholder_content(self, n_images: int, text: str) -> Any:
        if not self.is_vlm:
            return text
        return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]

    def _render(self, user: str, n_images: int, system_prompt: str | None) -> tuple[str, int, int]:
        """Render the chat for one sample; returns (text, user_start, user_end) char span."""
        if not self.use_chat_template:
            if self.is_vlm:
                raise ValueError(f"HFEncoder(family={self.family!r}) needs its chat template to place images")
            return user, 0, len(user)
        key = (n_images, system_prompt)
        parts = self._hf.templates.get(key)
        if parts is None:
            # the chat around the user's words depends only on (images, system prompt): render
            # it once with a sentinel in place of the words (the template is most of the cost)
            messages = []
            if system_prompt:
                # VLM templates (e.g. llava-hf's) read typed content parts and render plain strings as nothing
                content: Any = [{"type": "text", "text": system_prompt}] if self.is_vlm else system_prompt
                messages.append({"role": "system", "content": content})
            messages.append({"role": "user", "content": self._image_placeholder_content(n_images, _SENTINEL)})
            rendered = self._hf.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if rendered.count(_SENTINEL) != 1:
                raise ValueError(f"The chat template of {self.path!r} did not render the user content exactly once")
            prefix, suffix = rendered.split(_SENTINEL)
            parts = self._hf.templates[key] = (prefix, suffix)
        prefix, suffix = parts
        return prefix + user + suffix, len(prefix), len(prefix) + len(user)

    def _sample_images(self, images: list[Any]) -> tuple[list[Any], list[int]]:
        """Tile each reference image; returns the flat list and the count per source image."""
        flat: list[Any] = []
        counts: list[int] = []
        for img in images:
            if self.family == "internvl" or self.max_tiles == 1:
                flat.append(to_pil(img))  # InternVL's processor tiles itself (crop_to_patches)
                counts.append(1)
            else:
                tiles = tile_image(img, self.tile_size, self.max_tiles)
                flat.extend(tiles)
                counts.append(len(tiles))
        return flat, counts

    def _tokenize_kwargs(self) -> dict[str, Any]:
        return dict(add_special_tokens=not self.use_chat_template, return_offsets_mapping=True, return_tensors="pt")

    def _tokenize_sample(self, text: str, flat_images: list[Any]) -> dict[str, Any]:
        kw = self._tokenize_kwargs()
        if self.is_vlm:
            out = self._hf.processor(text=[text], images=flat_images or None, **kw)
        else:
            out = self._hf.tokenizer([text], **kw)
        return dict(out)

    def neutralise(self, text: str) -> str:
        """User text with every special-token string broken up (a space after its first
        character), so that the processor reads it as words: ``"<image>"`` -> ``"< image>"``.

        Captions are text; without this a scraped alt-text holding ``<image>`` (LLaVA),
        ``<|image_pad|>`` (Qwen2-VL), ``<IMG_CONTEXT>`` (InternVL), ``<start_of_image>``
        (Gemma 3) or a chat marker such as ``<|im_end|>`` would add image slots (and fail
        with "Found 1 <image> tokens in the text but no images were passed") or end the turn.
        """
        pattern = (self._hf if self.loaded else self.load()._hf).special_re
        if pattern is None or not text:
            return text
        for _ in range(8):  # breaking one string can expose another only in contrived cases
            new = pattern.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)
            if new == text:
                break
            text = new
        return text

    def _image_token_ids(self) -> set[int]:
        tok = self._hf.tokenizer
        cfg = self.config
        ids = set()
        for name in ("image_token_id", "image_token_index"):
            v = getattr(cfg, name, None)
            if isinstance(v, int):
                ids.add(v)
        if not ids:  # (Gemma 3's processor.image_token_id is the begin-of-image token: config first)
            v = getattr(self._hf.processor, "image_token_id", None)
            if isinstance(v, int):
                ids.add(v)
        if not ids and getattr(tok, "image_token_id", None) is not None:
            ids.add(tok.image_token_id)
        return ids

    def _roles_for(
        self, out: dict[str, Any], user_span: tuple[int, int], text_len_tail: int, counts: list[int]
    ) -> Tensor:
        """Per-token roles of one tokenized sample.

        The user's words are located from the end: the processor may expand image
        placeholders (before the user text) but never changes the text after them, so the
        user span is ``[E - tail - len(user), E - tail)`` with ``E`` the expanded length.
        """
        ids = out["input_ids"][0]
        roles = _text_roles(
            out["offset_mapping"], torch.ones_like(out["input_ids"], dtype=torch.bool), [user_span], [text_len_tail]
        )[0]
        if counts:
            self._image_roles(ids, roles, counts)
        return roles

    def _image_roles(self, ids: Tensor, roles: Tensor, counts: list[int]) -> None:
        """Tag the image tokens of one sample (``counts``: images per reference image) in place."""
        if counts:
            if self._hf.image_ids is None:
                self._hf.image_ids = torch.tensor(sorted(self._image_token_ids()))
            is_img = torch.isin(ids, self._hf.image_ids)
            pos = torch.nonzero(is_img).flatten().tolist()
            runs: list[list[int]] = []
            for p in pos:
                if runs and runs[-1][-1] == p - 1:
                    runs[-1].append(p)
                else:
                    runs.append([p])
            n_expected = sum(counts)
            if len(runs) != n_expected:  # adjacent images merged into one run: split evenly
                if not pos or len(pos) % n_expected:
                    raise RuntimeError(
                        f"found {len(runs)} runs of image tokens ({len(pos)} tokens) for {n_expected} images"
                    )
                k = len(pos) // n_expected
                runs = [pos[i * k : (i + 1) * k] for i in range(n_expected)]
            r = 0
            for c in counts:
                group = runs[r : r + c]
                r += c
                if self.family == "internvl":
                    seq = int(self._hf.processor.image_seq_length)
                    run = group[0]
                    n_patch = max(len(run) // seq, 1)
                    roles[run] = int(TokenRole.THUMBNAIL if n_patch == 1 else TokenRole.IMAGE_TILE)
                    if n_patch > 1:
                        roles[run[-seq:]] = int(TokenRole.THUMBNAIL)
                    continue
                for j, run in enumerate(group):
                    last = j == len(group) - 1
                    roles[run] = int(TokenRole.THUMBNAIL if last else TokenRole.IMAGE_TILE)

    def _check_images(self, images: list[Any], task: str) -> list[Any]:
        if images and not self.is_vlm and self.on_images == "ignore":
            return []
        if images and not self.is_vlm:
            raise ValueError(
                f"HFEncoder(path={self.path!r}, family={self.family!r}) is text-only but got {len(images)} "
                f"image(s) for task {task!r}; use a VLM family (llava, qwen2_vl, qwen2_5_vl, internvl, gemma3) "
                f"or drop recon/edit tasks from the data mix (or set `on_images: ignore`)."
            )
        return images

    def _user_text(self, prompt: str, task: str) -> str:
        return "" if task == "recon" else self.neutralise((prompt or "").strip())

    def _prepare_sample(
        self, prompt: str, images: list[Any], task: str, system_prompt: str | None
    ) -> tuple[dict[str, Any], Tensor]:
        """One sample through the processor; cuts the user text to fit ``max_length``."""
        images = self._check_images(images, task)
        user = self._user_text(prompt, task)
        flat, counts = self._sample_images(images)
        for _ in range(4):
            text, us, ue = self._render(user, len(flat), system_prompt)
            tail = len(text) - ue
            out = self._tokenize_sample(text, flat)
            n = out["input_ids"].shape[1]
            if n <= self.max_length:
                break
            roles = self._roles_for(out, (us, ue), tail, counts)
            user_tok = torch.nonzero(roles == int(TokenRole.USER_TEXT)).flatten()
            excess = n - self.max_length
            if len(user_tok) <= excess:
                raise ValueError(
                    f"a sample needs {n} tokens (template + images) but max_length={self.max_length}; "
                    f"raise `max_length` or lower `max_tiles` ({self.max_tiles})"
                )
            keep_tok = user_tok[len(user_tok) - excess - 1]
            cut = int(out["offset_mapping"][0][keep_tok, 1]) - (
                int(out["offset_mapping"][0][:, 1].max()) - tail - len(user)
            )
            user = user[: max(cut, 0)]
        else:
            raise ValueError(f"could not fit the prompt into max_length={self.max_length}")
        roles = self._roles_for(out, (us, ue), tail, counts)
        out.pop("offset_mapping", None)
        return out, roles

    def _prepare_per_sample(
        self, prompts: list[str], imgs: list[list[Any]], task: str, system_prompt: str | None
    ) -> tuple[list[dict[str, Any]], list[Tensor], list[dict[str, Tensor]]]:
        """One processor call per sample (the reference path; also handles ``max_length`` cuts).

        Returns the samples' sequence inputs, their roles and each sample's own image inputs."""
        samples, roles, per_images = [], [], []
        for p, im in zip(prompts, imgs):
            x, r = self._prepare_sample(p, im, task, system_prompt)
            samples.append({k: v for k, v in x.items() if _is_seq(k, v)})
            roles.append(r)
            per_images.append({k: x[k] for k in _IMAGE_KEYS if x.get(k) is not None})
        return samples, roles, per_images

    def _prepare_batched(
        self, prompts: list[str], imgs: list[list[Any]], task: str, system_prompt: str | None
    ) -> tuple[dict[str, Any], Tensor, Tensor] | None:
        """The whole batch in one processor call: ``(inputs, mask, roles)``, right-padded, with
        the same ids, masks and roles as :meth:`_prepare_per_sample` + :meth:`_collate`;
        ``None`` when a sample needs a ``max_length`` cut (the per-sample path does that)."""
        texts, spans, tails, flats, counts = [], [], [], [], []
        for p, im in zip(prompts, imgs):
            flat, c = self._sample_images(self._check_images(im, task))
            text, us, ue = self._render(self._user_text(p, task), len(flat), system_prompt)
            texts.append(text)
            spans.append((us, ue))
            tails.append(len(text) - ue)
            flats.append(flat)
            counts.append(c)
        # right padding whatever the tokenizer's default, as _collate pads
        kw = dict(self._tokenize_kwargs(), padding=True, padding_side="right")
        if self.is_vlm:
            if not any(flats):
                images = None
            elif self.family == "gemma3":
                images = flats  # Gemma 3's processor wants the images nested per text
            else:
                images = [x for f in flats for x in f]
            out = dict(self._hf.processor(text=texts, images=images, **kw))
        else:
            out = dict(self._hf.tokenizer(texts, **kw))
        mask = out["attention_mask"].bool()
        if int(mask.sum(1).max()) > self.max_length:
            return None
        roles = _text_roles(out.pop("offset_mapping"), mask, spans, tails)
        for i, c in enumerate(counts):
            if c:
                n = int(mask[i].sum())
                self._image_roles(out["input_ids"][i, :n], roles[i, :n], c)
        inputs = {k: v for k, v in out.items() if _is_seq(k, v)}
        inputs["attention_mask"] = mask.long()
        inputs["input_ids"] = out["input_ids"].masked_fill(~mask, self._hf.tokenizer.pad_token_id)
        for k in _SEQ_KEYS[2:]:  # token type ids: 0 on padding, as _collate fills
            if k in inputs:
                inputs[k] = inputs[k].masked_fill(~mask, 0)
        inputs.update({k: out[k] for k in _IMAGE_KEYS if out.get(k) is not None})
        return inputs, mask, roles

    # ------------------------------------------------------------------ batching
    def _collate(
        self, samples: list[dict[str, Any]], roles: list[Tensor], extras: dict[str, Tensor]
    ) -> tuple[dict[str, Any], Tensor, Tensor]:
        pad_id = self._hf.tokenizer.pad_token_id
        s = max(x["input_ids"].shape[1] for x in samples)
        b = len(samples)
        ids = torch.full((b, s), pad_id, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        role_t = torch.zeros((b, s), dtype=torch.int8)
        batch: dict[str, Any] = {}
        seq_keys = [k for k, v in samples[0].items() if k not in ("input_ids", "attention_mask") and _is_seq(k, v)]
        for k in seq_keys:
            batch[k] = torch.zeros((b, s), dtype=samples[0][k].dtype)
        for i, (x, r) in enumerate(zip(samples, roles)):
            n = x["input_ids"].shape[1]
            ids[i, :n] = x["input_ids"][0]
            mask[i, :n] = 1
            role_t[i, :n] = r
            for k in seq_keys:
                batch[k][i, :n] = x[k][0]
        batch.update(extras)
        batch["input_ids"] = ids
        batch["attention_mask"] = mask
        return batch, mask.bool(), role_t

    # ------------------------------------------------------------------ forward with taps
    @contextmanager
    def _taps(self, store: dict[int, Tensor], stop: bool) -> Iterator[None]:
        blocks = self.blocks()
        ids = self.spec.layer_ids
        deepest = max(ids)
        handles = []

        def pre_hook(_mod, args, kwargs):
            hs = args[0] if args else kwargs.get("hidden_states")
            store[0] = hs
            if stop and deepest == 0:
                raise _StopForward

        def make_hook(i: int):
            def hook(_mod, _args, output):
                hs = output[0] if isinstance(output, (tuple, list)) else output
                store[i] = hs
                if stop and i == deepest:
                    raise _StopForward

            return hook

        try:
            if 0 in ids:
                handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            for i in ids:
                if i >= 1:
                    handles.append(blocks[i - 1].register_forward_hook(make_hook(i)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        dev = self.target_device
        out = {}
        for k, v in batch.items():
            if isinstance(v, Tensor):
                v = v.to(dev)
                if k == "pixel_values" and v.is_floating_point():
                    v = v.to(self.torch_dtype)
            out[k] = v
        if self.family != "t5":
            out["use_cache"] = False
        return out

    @torch.no_grad()
    def tapped_forward(self, batch: dict[str, Any], truncate: bool | None = None) -> Tensor:
        """Run the model on model inputs and return ``(B, S, n, H)`` tapped states."""
        truncate = self.truncate if truncate is None else truncate
        store: dict[int, Tensor] = {}
        inputs = self._model_inputs(batch)
        with self._taps(store, stop=truncate):
            try:
                self.hf_model(**inputs)
            except _StopForward:
                pass
        missing = [i for i in self.spec.layer_ids if i not in store]
        if missing:
            raise RuntimeError(f"layers {missing} were not reached in the forward of {self.path!r}")
        return torch.stack([store[i] for i in self.spec.layer_ids], dim=2)

    def _drop_unkept_tail(self, prep: PreparedBatch, kept: tuple[TokenRole, ...] | None) -> PreparedBatch:
        """Cut each sample after its last kept token: the chat template's tail (``<|im_end|>``,
        ``ASSISTANT:``, ...) is about a third of a short caption's tokens, and in a causal LM
        no earlier token attends to it, so the kept features are the same without it.

        Only for causal text (not ``t5``, whose encoder is bidirectional) and batches without
        image inputs (placeholder markers and Qwen2-VL's M-RoPE grids must stay whole);
        every token is kept when the roles are ``all``.
        """
        if kept is None or self.family == "t5" or any(k in prep.inputs for k in _IMAGE_KEYS):
            return prep
        is_kept = torch.isin(prep.roles, torch.tensor([int(r) for r in kept], dtype=prep.roles.dtype))
        is_kept &= prep.mask
        pos = torch.arange(prep.mask.shape[1])
        # one past the last kept token; a sample that keeps nothing keeps its real tokens
        ends = torch.where(is_kept.any(1), (pos * is_kept).amax(1) + 1, prep.mask.sum(1))
        width = int(ends.max()) if ends.numel() else 0
        if width >= prep.mask.shape[1]:
            return prep
        keep = pos[:width] < ends[:, None]
        inputs = dict(prep.inputs)
        for k, v in prep.inputs.items():
            if _is_seq(k, v):
                fill = self._hf.tokenizer.pad_token_id if k == "input_ids" else 0
                inputs[k] = v[:, :width].masked_fill(~keep, fill)
        return PreparedBatch(
            inputs=inputs,
            mask=prep.mask[:, :width] & keep,
            roles=prep.roles[:, :width].masked_fill(~keep, int(TokenRole.PAD)),
            texts=prep.texts,
        )

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def prepare(
        self,
        prompts: Sequence[str] | str,
        images: Sequence[ImageList] | Tensor | None = None,
        *,
        task: str = "t2i",
        system_prompt: str | None = None,
        verifi: bool | None = None,
        per_sample: bool = False,
    ) -> PreparedBatch:
        """Render, tokenize (and with VERIFI: generate) a batch without the tapped forward.

        Every token is returned, with its role. The batch goes through the processor in
        one call; ``per_sample=True`` makes one call per sample (the reference path, and
        the fallback when a sample must be cut to ``max_length``).
        """
        use_verifi = self.verifi if verifi is None else bool(verifi)
        if use_verifi and self.family == "t5":
            raise ValueError("VERIFI needs a generative model; the t5 family is an encoder only")
        self.load()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        imgs = images_to_list(images, len(prompts))
        if len(imgs) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(imgs)} image lists")
        if system_prompt is not None:
            sys_prompt: str | None = system_prompt
        elif use_verifi:
            sys_prompt = self.system_prompt or DEFAULT_VERIFI_PROMPT
        else:
            sys_prompt = self.system_prompt
        # sample-by-sample VERIFI generation needs each sample's own image inputs
        split_images = use_verifi and not self.verifi_batch
        batched = None if (per_sample or split_images) else self._prepare_batched(prompts, imgs, task, sys_prompt)
        per_images: list[dict[str, Tensor]] | None = None
        if batched is None:
            samples, roles, per_images = self._prepare_per_sample(prompts, imgs, task, sys_prompt)
            extras = _concat_images(per_images)
        else:
            inputs, mask, role_t = batched
            if not use_verifi:
                return PreparedBatch(inputs=inputs, mask=mask, roles=role_t)
            # VERIFI appends each sample's generation: back to per-sample rows
            lengths = mask.sum(1).tolist()
            samples = [{k: v[i : i + 1, :n] for k, v in inputs.items() if _is_seq(k, v)} for i, n in enumerate(lengths)]
            roles = [role_t[i, :n] for i, n in enumerate(lengths)]
            extras = {k: inputs[k] for k in _IMAGE_KEYS if k in inputs}
        texts = None
        if use_verifi:
            texts = []
            if split_images and per_images is not None:
                gens = [g for x, e in zip(samples, per_images) for g in self._generate([x], e)]
            else:
                gens = self._generate(samples, extras)
            for i, (x, gen) in enumerate(zip(samples, gens)):
                texts.append(self._hf.tokenizer.decode(gen, skip_special_tokens=True))
                samples[i], roles[i] = _append_tokens(x, roles[i], gen)
        batch, mask, role_t = self._collate(samples, roles, extras)
        return PreparedBatch(inputs=batch, mask=mask, roles=role_t, texts=texts)

    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str] | str,
        images: Sequence[ImageList] | Tensor | None = None,
        *,
        task: str = "t2i",
        system_prompt: str | None = None,
        verifi: bool | None = None,
    ) -> EncoderFeatures:
        """Encode a batch; the result holds only the configured ``roles`` (left-aligned).

        ``system_prompt`` and ``verifi`` override the configured ones for this call (e.g.
        at inference: a different rewrite instruction, or VERIFI on/off; with the default
        roles, VERIFI on keeps the generated tokens instead of the user's)."""
        use_verifi = self.verifi if verifi is None else bool(verifi)
        prep = self.prepare(prompts, images, task=task, system_prompt=system_prompt, verifi=verifi)
        if self.truncate:
            prep = self._drop_unkept_tail(prep, self.kept_roles(use_verifi))
        hidden = self.tapped_forward(prep.inputs)
        mask = prep.mask.to(hidden.device)
        hidden = hidden * mask[:, :, None, None].to(hidden.dtype)
        features = EncoderFeatures(
            hidden=hidden,
            mask=mask,
            roles=prep.roles.to(hidden.device),
            layer_ids=self.spec.layer_ids,
            texts=prep.texts,
        )
        return self.select_kept(features, use_verifi)

    def _generate(self, samples: list[dict[str, Any]], extras: dict[str, Tensor]) -> list[Tensor]:
        """VERIFI rewrite: greedy/sampled generation for tokenized samples (left-padded batch).

        ``extras`` are the image inputs of exactly these samples. Returns the generated
        token ids per sample, cut at the first EOS/pad.
        """
        model = self.hf_model
        tok = self._hf.tokenizer
        pad_id = tok.pad_token_id
        s = max(x["input_ids"].shape[1] for x in samples)
        batch: dict[str, Any] = {}
        for k in [k for k, v in samples[0].items() if _is_seq(k, v)]:
            fill = pad_id if k == "input_ids" else 0
            rows = []
            for x in samples:
                v = x[k][0]
                rows.append(torch.cat([v.new_full((s - v.shape[0],), fill), v]))
            batch[k] = torch.stack(rows)
        batch.update(extras)
        inputs = self._model_inputs(batch)
        inputs.pop("use_cache", None)
        gen_kw: dict[str, Any] = dict(max_new_tokens=self.verifi_max_new_tokens, do_sample=self.verifi_do_sample)
        if self.verifi_do_sample:
            gen_kw.update(temperature=self.verifi_temperature, top_p=self.verifi_top_p)
        else:
            gen_kw.update(temperature=None, top_p=None, top_k=None)
        stop_ids = {i for i in (tok.eos_token_id, pad_id) if i is not None}
        dev = self.target_device
        rng_devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(self.verifi_seed)
            out = model.generate(**inputs, **gen_kw, pad_token_id=pad_id, eos_token_id=tok.eos_token_id)
        results = []
        for row in out[:, s:].cpu().tolist():
            keep = []
            for t in row:
                if t in stop_ids:
                    break
                keep.append(t)
            results.append(torch.tensor(keep, dtype=torch.long))
        return results


_SEQ_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
#: processor / tokenizer attributes naming image and video placeholder texts (per family)
_PLACEHOLDER_ATTRS = (
    "image_token",  # LLaVA <image>, Qwen2-VL <|image_pad|>, InternVL <IMG_CONTEXT>, Gemma 3 <start_of_image>
    "video_token",
    "fake_image_token",
    "boi_token",
    "eoi_token",
    "start_image_token",
    "end_image_token",
    "context_image_token",
    "vision_start_token",
    "vision_end_token",
)
#: processor outputs that belong to the images (concatenated over the batch in sample order)
_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")


def _is_seq(k: str, v: Any) -> bool:
    return k in _SEQ_KEYS and isinstance(v, Tensor)


def _append_tokens(sample: dict[str, Any], roles: Tensor, gen: Tensor) -> tuple[dict[str, Any], Tensor]:
    """Append generated tokens to one tokenized sample, tagged ``GENERATED``."""
    n = gen.shape[0]
    if n == 0:
        return sample, roles
    out = dict(sample)
    for k, v in sample.items():
        if _is_seq(k, v):
            if k == "input_ids":
                extra = gen[None].to(v.dtype)
            elif k == "attention_mask":
                extra = torch.ones((1, n), dtype=v.dtype)
            else:  # token_type_ids / mm_token_type_ids: generated tokens are text (0)
                extra = torch.zeros((1, n), dtype=v.dtype)
            out[k] = torch.cat([v, extra], dim=1)
    return out, torch.cat([roles, torch.full((n,), int(TokenRole.GENERATED), dtype=torch.int8)])


def _special_token_pattern(tokenizer: Any, processor: Any) -> re.Pattern[str] | None:
    """A regex matching the special-token strings that must not survive in user text: the
    tokenizer's special and added-special tokens plus the processor's image/video tokens."""
    found: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    for obj in (processor, tokenizer):
        for name in _PLACEHOLDER_ATTRS:
            value = getattr(obj, name, None) if obj is not None else None
            if isinstance(value, str):
                found.add(value)
    # single characters and plain words cannot be broken up without changing ordinary text
    found = {t for t in found if len(t.strip()) >= 2 and not t.strip().isalnum()}
    if not found:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(found, key=len, reverse=True)))


def _concat_images(per_images: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-sample image inputs -> the batch's (concatenated in sample order, as a batched call gives)."""
    out: dict[str, Tensor] = {}
    for k in _IMAGE_KEYS:
        parts = [x[k] for x in per_images if k in x]
        if parts:
            out[k] = torch.cat(parts)
    return out


def _text_roles(offsets: Tensor, mask: Tensor, spans: list[tuple[int, int]], tails: list[int]) -> Tensor:
    """``(B, S)`` roles from character offsets: ``USER_TEXT`` where a token overlaps the
    user's words, ``SYSTEM`` for the other real tokens, ``PAD`` on padding.

    The user's words are located from the end: the processor may expand image
    placeholders (before the user text) but never changes the text after them, so the
    user span is ``[E - tail - len(user), E - tail)`` with ``E`` the expanded length.
    """
    starts, ends = offsets[..., 0], offsets[..., 1]
    end_total = torch.where(mask, ends, torch.zeros_like(ends)).amax(1) if ends.shape[1] else ends.new_zeros(len(spans))
    ulen = torch.tensor([e - s for s, e in spans], dtype=ends.dtype)
    u_end = end_total - torch.tensor(tails, dtype=ends.dtype)
    u_start = u_end - ulen
    user = (starts < u_end[:, None]) & (ends > u_start[:, None]) & (ends > starts) & (ulen > 0)[:, None] & mask
    roles = torch.full(mask.shape, int(TokenRole.SYSTEM), dtype=torch.int8)
    roles[user] = int(TokenRole.USER_TEXT)
    roles[~mask] = int(TokenRole.PAD)
    return roles
