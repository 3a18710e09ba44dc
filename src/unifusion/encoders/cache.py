"""Feature cache: run the frozen encoder once, train many times from its features.

On-disk format (version :data:`FORMAT_VERSION`; safetensors + JSON, nothing pickled)::

    DIR/cache_meta.json            encoder.cache_metadata() (layers, roles, model, ...) + the
                                   cache's format, dtype, counts and shard list
    DIR/cache-000000.safetensors   one file per shard of up to ``shard_size`` samples:
        offsets        (N+1,) int64   sample i owns token rows offsets[i]:offsets[i+1]
        image_offsets  (N+1,) int64   sample i's target image bytes image_offsets[i]:image_offsets[i+1]
        hidden         (T, n, H)      the kept tokens of every sample, concatenated (fp16/bf16/fp32)
        roles          (T,) int8      their TokenRole
        image          (B,) uint8     the target images as stored in the source (PNG/JPEG bytes)
        __metadata__   "samples": JSON list of {"key", "task", "txt"[, "rewrite"]}, "layer_ids", format

A reader memory-maps a shard and slices one sample's rows: no ``torch.load`` per sample
(version 1 stored a ``feat.pth`` pickle per sample, which cost more per step than the
encoder it replaced). The tokens stored are exactly what ``encoder.encode`` returns —
the encoder's ``roles`` option picks them, once, for live training, the cache and
sampling alike — and the roles are recorded in the metadata and compared like every
other field, so a cache made under other roles (or by an older version) is refused.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from unifusion.errors import UserError
from unifusion.features import EncoderFeatures
from unifusion.images import decode_image, resize_center_crop

META_FILE = "cache_meta.json"
FORMAT = "unifusion-feature-cache"
#: bump when the on-disk layout changes; older caches are refused with a "re-create" message
FORMAT_VERSION = 2
SHARD_PATTERN = "cache-%06d.safetensors"
SHARD_GLOB = "cache-*.safetensors"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.int8: "I8",
    torch.int64: "I64",
    torch.uint8: "U8",
}
_NP_OF_ST = {"F16": np.float16, "BF16": np.int16, "F32": np.float32, "I8": np.int8, "I64": np.int64, "U8": np.uint8}
_TORCH_OF_ST = {v: k for k, v in _ST_DTYPES.items()}
_RECREATE = "re-create it with `unifusion cache -c CONFIG --out DIR` (the config you train with)"

#: metadata fields that must match between a cache and the encoder that would have made it
COMPARED_FIELDS = (
    "name",
    "family",
    "hidden_size",
    "depth",
    "model_dtype",
    "roles",
    "verifi",
    "system_prompt",
    "max_tiles",
    "tile_size",
    "max_length",
    "use_chat_template",
    "verifi_max_new_tokens",
    "verifi_do_sample",
    "verifi_temperature",
    "verifi_top_p",
    "verifi_seed",
)


class FeatureCacheError(UserError, ValueError):
    """A feature cache that cannot be used here (old format, other encoder settings, corrupt)."""


# ---------------------------------------------------------------------------------------
# source samples


def _expand_urls(urls: str | Sequence[str]) -> list[str]:
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        if os.path.isdir(u):
            out.extend(sorted(glob.glob(os.path.join(u, "*.tar"))))
        elif any(c in u for c in "*?["):
            out.extend(sorted(glob.glob(u)))
        elif "{" in u:
            import braceexpand

            out.extend(braceexpand.braceexpand(u))
        else:
            out.append(u)
    if not out:
        raise FileNotFoundError(f"no source shards found for {urls!r}")
    return out


def load_reference(data: bytes, size: int | None = None) -> Any:
    """Image bytes -> 8-bit RGB PIL image (:func:`unifusion.images.decode_image`); with
    ``size``: :func:`unifusion.images.resize_center_crop`, the data module's resize."""
    return resize_center_crop(decode_image(data), size)


def _image_field(sample: dict[str, Any], prefix: str) -> bytes | None:
    for ext in IMAGE_EXTS:
        if prefix + ext in sample:
            return sample[prefix + ext]
    return None


def reference_images(sample: dict[str, Any], task: str, size: int | None = None) -> list[Any]:
    """The images the encoder sees for a raw (bytes) sample: none for t2i, the image
    (``png``/``jpg``/...) for recon, ``src.*`` (+ ``src1.*``, ``src2.*``, ...) for edits.
    ``size`` resizes + centre-crops like the DataModule's ``reference_size``."""
    if task == "t2i":
        return []
    if task == "recon":
        data = _image_field(sample, "") or _image_field(sample, "src.")
        if data is None:
            raise KeyError(f"recon sample {sample.get('__key__')!r} has no image field")
        return [load_reference(data, size)]
    stems = sorted({k.split(".", 1)[0] for k in sample if k[:3] == "src" and k[3:4].isdigit()}, key=_ref_no)
    prefixes = ["src."] + [stem + "." for stem in stems]
    out = [load_reference(d, size) for d in (_image_field(sample, p) for p in prefixes) if d is not None]
    if not out:
        raise KeyError(f"edit sample {sample.get('__key__')!r} has no src.png/src.jpg reference image")
    return out


def _ref_no(stem: str) -> int:
    digits = stem[3:]
    return int(digits) if digits.isdigit() else 1 << 30


def target_image(sample: dict[str, Any], task: str) -> bytes:
    """The encoded bytes of the image a sample trains to generate (``tgt.*`` for edits)."""
    data = _image_field(sample, "tgt." if task == "edit" else "")
    if data is None:
        raise KeyError(f"{task} sample {sample.get('__key__')!r} has no target image")
    return data


def _text(sample: dict[str, Any], key: str = "txt") -> str:
    v = sample.get(key, b"")
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _task(sample: dict[str, Any], override: str | None = None) -> str:
    if override is not None:
        task = override
    else:
        meta = json.loads(_text(sample, "json") or "{}")
        task = meta.get("task", "t2i")
    if task not in ("t2i", "recon", "edit"):
        raise ValueError(f"unknown task {task!r}")
    return task


# ---------------------------------------------------------------------------------------
# shard files


class CacheShardWriter:
    """Writes one safetensors shard; the big arrays stream through temporary files, so a
    shard never has to fit in memory."""

    def __init__(self, path: str, dtype: torch.dtype, layer_ids: Sequence[int]) -> None:
        self.path, self.dtype, self.layer_ids = path, dtype, list(layer_ids)
        d = os.path.dirname(os.path.abspath(path))
        self._hidden = tempfile.TemporaryFile(dir=d)
        self._image = tempfile.TemporaryFile(dir=d)
        self.roles: list[np.ndarray] = []
        self.offsets, self.image_offsets = [0], [0]
        self.samples: list[dict[str, str]] = []
        self.shape_tail: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, hidden: torch.Tensor, roles: torch.Tensor, image: bytes, info: dict[str, str]) -> None:
        tail = (int(hidden.shape[1]), int(hidden.shape[2]))
        if self.shape_tail is None:
            self.shape_tail = tail
        elif tail != self.shape_tail:
            raise ValueError(f"cached hidden states must all be (S, {self.shape_tail}), got {tuple(hidden.shape)}")
        self._hidden.write(_raw_bytes(hidden.to("cpu", self.dtype)))
        self._image.write(image)
        self.roles.append(roles.to("cpu", torch.int8).numpy())
        self.offsets.append(self.offsets[-1] + int(hidden.shape[0]))
        self.image_offsets.append(self.image_offsets[-1] + len(image))
        self.samples.append(info)

    def close(self) -> int:
        """Write the file (atomically); returns its size in bytes."""
        n_tok = self.offsets[-1]
        n_layers, hidden_size = self.shape_tail or (len(self.layer_ids), 0)
        small = {
            "offsets": np.asarray(self.offsets, dtype=np.int64).tobytes(),
            "image_offsets": np.asarray(self.image_offsets, dtype=np.int64).tobytes(),
        }
        roles = np.concatenate(self.roles).astype(np.int8).tobytes() if self.roles else b""
        # 8-byte types first, so every array starts aligned after the 8-aligned header
        entries = [
            ("offsets", "I64", [len(self.offsets)], small["offsets"]),
            ("image_offsets", "I64", [len(self.image_offsets)], small["image_offsets"]),
            ("hidden", _ST_DTYPES[self.dtype], [n_tok, n_layers, hidden_size], self._hidden),
            ("roles", "I8", [n_tok], roles),
            ("image", "U8", [self.image_offsets[-1]], self._image),
        ]
        header: dict[str, Any] = {
            "__metadata__": {
                "format": FORMAT,
                "format_version": str(FORMAT_VERSION),
                "layer_ids": json.dumps(self.layer_ids),
                "samples": json.dumps(self.samples, ensure_ascii=False),
            }
        }
        pos = 0
        for name, st_dtype, shape, data in entries:
            size = data.tell() if hasattr(data, "tell") else len(data)
            header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [pos, pos + size]}
            pos += size
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for _, _, _, data in entries:
                if hasattr(data, "read"):
                    data.seek(0)
                    while chunk := data.read(1 << 24):
                        f.write(chunk)
                else:
                    f.write(data)
        os.replace(tmp, self.path)
        self._hidden.close()
        self._image.close()
        return os.path.getsize(self.path)


def _raw_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes of a tensor of any dtype (bfloat16 included)."""
    t = t.contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


class CacheShard:
    """Read access to one shard file: memory-mapped, one sample sliced at a time.

    ``in_memory=True`` reads the whole file once instead (then every access is a view).
    """

    def __init__(self, path: str, in_memory: bool = False) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(f.read(n))
            meta = header.pop("__metadata__", {})
            if meta.get("format") != FORMAT:
                raise ValueError("not a feature-cache shard")
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise FeatureCacheError(
                    f"feature-cache shard {path!r} has format version {meta.get('format_version')}, this version "
                    f"reads {FORMAT_VERSION}; {_RECREATE}"
                )
            self.samples: list[dict[str, str]] = json.loads(meta["samples"])
            self.layer_ids = tuple(int(i) for i in json.loads(meta["layer_ids"]))
            base = 8 + n
            if in_memory:
                with open(path, "rb") as f:
                    buf: Any = np.frombuffer(f.read(), dtype=np.uint8)
            else:
                buf = np.memmap(path, dtype=np.uint8, mode="r")
            self._arrays: dict[str, np.ndarray] = {}
            self._dtypes: dict[str, str] = {}
            for name, spec in header.items():
                a, b = (base + int(x) for x in spec["data_offsets"])
                arr = buf[a:b].view(_NP_OF_ST[spec["dtype"]]).reshape(spec["shape"])
                self._arrays[name] = arr
                self._dtypes[name] = spec["dtype"]
            self.offsets = np.asarray(self._arrays["offsets"], dtype=np.int64)
            self.image_offsets = np.asarray(self._arrays["image_offsets"], dtype=np.int64)
            if len(self.offsets) != len(self.samples) + 1 or len(self.image_offsets) != len(self.samples) + 1:
                raise ValueError("offsets do not match the sample list")
        except FeatureCacheError:
            raise
        except Exception as e:
            raise FeatureCacheError(f"feature-cache shard {path!r} is unreadable or corrupt ({e}); {_RECREATE}") from e

    def __len__(self) -> int:
        return len(self.samples)

    def _tensor(self, name: str, a: int, b: int) -> torch.Tensor:
        # a copy: the mapped file stays read-only, and torch wants writable memory
        out = torch.from_numpy(np.array(self._arrays[name][a:b]))
        return out.view(torch.bfloat16) if self._dtypes[name] == "BF16" else out

    def hidden_and_roles(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``i``'s kept tokens: hidden ``(S, n, H)`` and roles ``(S,)`` int8."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._tensor("hidden", a, b), self._tensor("roles", a, b)

    def features(self, i: int, rewrite: bool = True) -> EncoderFeatures:
        """Sample ``i`` as a one-sample :class:`EncoderFeatures` (at least one, masked, position)."""
        hidden, roles = self.hidden_and_roles(i)
        s = hidden.shape[0]
        text = self.samples[i].get("rewrite") if rewrite else None
        texts = [text] if text is not None else None
        if s == 0:  # keep one masked position, like select_roles
            return EncoderFeatures(
                hidden=hidden.new_zeros(1, 1, *hidden.shape[1:]),
                mask=torch.zeros(1, 1, dtype=torch.bool),
                roles=torch.zeros(1, 1, dtype=torch.int8),
                layer_ids=self.layer_ids,
                texts=texts,
            )
        return EncoderFeatures(
            hidden=hidden[None],
            mask=torch.ones(1, s, dtype=torch.bool),
            roles=roles[None],
            layer_ids=self.layer_ids,
            texts=texts,
        )

    def image_bytes(self, i: int) -> bytes:
        a, b = int(self.image_offsets[i]), int(self.image_offsets[i + 1])
        return self._arrays["image"][a:b].tobytes()


# ---------------------------------------------------------------------------------------
# metadata


def read_cache_meta(path: str) -> dict[str, Any]:
    """``cache_meta.json`` of a cache directory (or the file itself), format-checked."""
    meta_path = os.path.join(path, META_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no {META_FILE} at {path!r}: is it a feature cache written by `unifusion cache`?")
    with open(meta_path) as f:
        meta = json.load(f)
    check_format(meta, path)
    return meta


def check_format(meta: dict[str, Any], where: str = "the feature cache") -> None:
    """Refuse caches of another format version (version 1 had a ``feat.pth`` pickle per sample)."""
    version = meta.get("format_version", 1)
    if version != FORMAT_VERSION:
        raise FeatureCacheError(
            f"feature cache {where!r} has format version {version}, this version of unifusion reads version "
            f"{FORMAT_VERSION} (safetensors shards); {_RECREATE}"
        )


def cache_shard_paths(path: str) -> list[str]:
    """The shard files of a cache directory, in order (format-checked)."""
    meta = read_cache_meta(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    names = meta.get("shards")
    paths = [os.path.join(root, n) for n in names] if names else sorted(glob.glob(os.path.join(root, SHARD_GLOB)))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FeatureCacheError(f"feature cache {path!r} is incomplete: missing {missing[:3]}; {_RECREATE}")
    return paths


def _metadata_of(encoder_or_metadata: Any) -> dict[str, Any]:
    if isinstance(encoder_or_metadata, dict):
        return encoder_or_metadata
    return encoder_or_metadata.cache_metadata()


def check_cache_compatible(meta: dict[str, Any] | str, encoder_or_metadata: Any) -> None:
    """Raise :class:`FeatureCacheError` (a ``ValueError``) listing every field where a
    cache differs from the encoder, or when it is of another format version.

    ``meta`` is a cache's metadata dict or the cache directory. The encoder's layer ids
    must be a subset of the cached ones (a subset can be selected when reading). A cache
    without recorded ``roles`` (older versions) is refused: which tokens it holds is unknown.
    """
    if isinstance(meta, str):
        where = meta
        meta_path = os.path.join(meta, META_FILE) if os.path.isdir(meta) else meta
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no {META_FILE} at {meta!r}: is it a feature cache written by `unifusion cache`?")
        with open(meta_path) as f:
            meta = json.load(f)
    else:
        where = str(meta.get("out_dir", "the feature cache"))
    check_format(meta, where)
    want = _metadata_of(encoder_or_metadata)
    if "roles" not in meta:
        raise FeatureCacheError(
            f"feature cache {where!r} does not record which token roles it holds (written by an older "
            f"version); {_RECREATE}"
        )
    diffs = []
    for key in COMPARED_FIELDS:
        if key in meta or key in want:
            if meta.get(key) != want.get(key):
                diffs.append(f"  {key}: cache={meta.get(key)!r} encoder={want.get(key)!r}")
    cached_layers = list(meta.get("layer_ids", []))
    missing = [i for i in want.get("layer_ids", []) if i not in cached_layers]
    if missing:
        diffs.append(
            f"  layer_ids: cache={cached_layers} encoder={list(want.get('layer_ids', []))} (missing {missing})"
        )
    if diffs:
        raise FeatureCacheError(
            "The feature cache does not match the encoder; differing fields:\n"
            + "\n".join(diffs)
            + f"\nRe-create the cache with this encoder: {_RECREATE}; or change the encoder config to match."
        )


# ---------------------------------------------------------------------------------------
# writing


def write_feature_cache(
    encoder: Any,
    urls: str | Sequence[str],
    out_dir: str,
    dtype: str = "float16",
    batch_size: int = 8,
    shard_size: int = 1000,
    max_samples: int | None = None,
    task: str | None = None,
    reference_size: int | None = None,
) -> dict[str, Any]:
    """Encode every sample of the source shards at ``urls`` and write a feature cache.

    The tokens stored are ``encoder.encode(...)``'s output, unchanged: the encoder's
    ``roles`` option chose them (and is recorded in the metadata).

    Args:
        encoder: an :class:`~unifusion.encoders.base.Encoder` (e.g. ``HFEncoder``).
        urls: shard paths, a glob, a brace pattern or a directory of ``*.tar``.
        out_dir: where ``cache-%06d.safetensors`` shards and ``cache_meta.json`` go.
        dtype: storage dtype of the hidden states (``float16``, ``bfloat16``, ``float32``).
        batch_size: samples per encoder call (consecutive samples of the same task).
        shard_size: samples per output shard.
        max_samples: stop after this many samples.
        task: encode every sample as this task (e.g. the DataSource's task: a t2i shard
            used for ``recon``); default: each sample's ``json["task"]`` (``t2i`` if absent).
            With a directory ``urls`` and a task, the directory's manifest picks the shards
            (:func:`unifusion.data.shards.task_shard_urls`) when available.
        reference_size: resize + centre-crop reference images like the DataModule's
            ``reference_size`` (``None``: stored size).

    Returns:
        a summary dict: ``num_samples``, ``skipped``, ``shards``, ``bytes``,
        ``bytes_per_sample``, ``seconds``, ``out_dir``.
    """
    import webdataset as wds

    if dtype not in _CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not one of {sorted(_CACHE_DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    tdtype = _CACHE_DTYPES[dtype]
    verifi = bool(getattr(encoder, "verifi", False))
    os.makedirs(out_dir, exist_ok=True)
    # a half-written cache must not be mistaken for a complete one: metadata goes last
    for old in glob.glob(os.path.join(out_dir, META_FILE)) + glob.glob(os.path.join(out_dir, "cache-*")):
        os.remove(old)
    sources = None
    if task is not None and isinstance(urls, str) and os.path.isdir(urls):
        try:
            from unifusion.data.shards import task_shard_urls

            sources = list(task_shard_urls(urls, task))
        except ImportError:
            sources = None
    if sources is None:
        sources = _expand_urls(urls)
    t0 = time.time()
    stats = {"num_samples": 0, "skipped": 0}
    layer_ids = list(encoder.spec.layer_ids)
    shard_paths: list[str] = []
    writer: CacheShardWriter | None = None
    total_bytes = 0

    def sink(hidden: torch.Tensor, roles: torch.Tensor, image: bytes, info: dict[str, str]) -> None:
        nonlocal writer, total_bytes
        if writer is None:
            path = os.path.join(out_dir, SHARD_PATTERN % len(shard_paths))
            writer = CacheShardWriter(path, tdtype, layer_ids)
        writer.add(hidden, roles, image, info)
        stats["num_samples"] += 1
        if len(writer) >= shard_size:
            total_bytes += writer.close()
            shard_paths.append(writer.path)
            writer = None

    buf: list[tuple[dict[str, Any], str]] = []

    def flush() -> None:
        if not buf:
            return
        btask = buf[0][1]
        prompts, images, ok, targets = [], [], [], []
        for sample, _ in buf:
            try:
                target = target_image(sample, btask)
                decode_image(target)  # a target the data module could not decode is skipped now
                images.append(reference_images(sample, btask, reference_size))
                prompts.append(_text(sample))
                targets.append(target)
                ok.append(sample)
            except Exception:
                stats["skipped"] += 1
        buf.clear()
        if not ok:
            return
        feats = encoder.encode(prompts, images, task=btask)
        for i, sample in enumerate(ok):
            n = int(feats.mask[i].sum())  # kept tokens are left-aligned
            info = {"key": str(sample.get("__key__")), "task": btask, "txt": prompts[i]}
            if verifi and feats.texts is not None:
                info["rewrite"] = feats.texts[i]
            sink(feats.hidden[i, :n], feats.roles[i, :n], targets[i], info)

    ds = wds.WebDataset(sources, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
    for sample in ds:
        if max_samples is not None and stats["num_samples"] + len(buf) >= max_samples:
            break
        try:
            sample_task = _task(sample, task)
        except Exception:
            stats["skipped"] += 1
            continue
        if buf and (buf[0][1] != sample_task or len(buf) >= batch_size):
            flush()
        buf.append((sample, sample_task))
    flush()
    if writer is not None and len(writer):
        total_bytes += writer.close()
        shard_paths.append(writer.path)

    meta = dict(encoder.cache_metadata())
    meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        cache_dtype=dtype,
        layer_ids=layer_ids,
        task=task,
        reference_size=reference_size,
        num_samples=stats["num_samples"],
        skipped=stats["skipped"],
        shards=[os.path.basename(s) for s in shard_paths],
        sources=sources,
    )
    tmp = os.path.join(out_dir, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, META_FILE))
    n = max(stats["num_samples"], 1)
    return {
        **stats,
        "shards": len(shard_paths),
        "bytes": total_bytes,
        "bytes_per_sample": total_bytes / n,
        "seconds": time.time() - t0,
        "out_dir": out_dir,
    }


# ---------------------------------------------------------------------------------------
# reading (outside the data module)


def features_from_cache(
    items: Sequence[EncoderFeatures], layer_ids: Sequence[int] | None = None, texts: Sequence[str] | None = None
) -> EncoderFeatures:
    """Collate one-sample cached features (:meth:`CacheShard.features`) into a right-padded
    batch; ``layer_ids`` selects a subset of the cached taps (in the given order)."""
    feats = [f.select_layers(list(layer_ids)) if layer_ids is not None else f for f in items]
    out = EncoderFeatures.collate(feats)
    if texts is not None:
        out.texts = list(texts)
    return out


def iter_cache(out_dir: str, in_memory: bool = False) -> Iterator[tuple[CacheShard, int]]:
    """Every ``(shard, row)`` of a cache directory, in order."""
    for path in cache_shard_paths(out_dir):
        shard = CacheShard(path, in_memory=in_memory)
        for i in range(len(shard)):
            yield shard, i


def read_cached_features(
    out_dir: str, layer_ids: Sequence[int] | None = None, batch_size: int = 8
) -> Iterable[tuple[list[str], EncoderFeatures]]:
    """Iterate a cache directory in order, yielding ``(keys, EncoderFeatures)`` batches.

    A simple reader for tests, benchmarks and analysis; training reads the shards through
    the DataModule.
    """
    keys: list[str] = []
    items: list[EncoderFeatures] = []
    for shard, i in iter_cache(out_dir):
        keys.append(shard.samples[i]["key"])
        items.append(shard.features(i))
        if len(items) == batch_size:
            yield keys, features_from_cache(items, layer_ids)
            keys, items = [], []
    if items:
        yield keys, features_from_cache(items, layer_ids)
