"""Converters from common image/caption and editing datasets to webdataset shards.

- :func:`convert_image_folder`: ``img.png`` + ``img.txt`` pairs in a folder tree;
- :func:`convert_index`: a JSONL/CSV/parquet index with an image path and a caption column;
- :func:`convert_edit_records`: InstructPix2Pix-style (input image, edit prompt, edited
  image) or MagicBrush-style (source, instruction, target) records from parquet/JSON/JSONL,
  with images as bytes, HF-datasets ``{"bytes": ..., "path": ...}`` dicts, or file paths.

Every converter verifies each image decodes, skips (and counts) the ones that don't,
writes shards bounded by ``maxcount`` samples and ``maxsize`` bytes plus a
``manifest.json`` (see :mod:`unifusion.data.shards`) and returns its counts.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from . import shards as shards_mod
from .shards import shapes_command  # noqa: F401  (re-exported: both CLI entry points live here)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: column names per edit-dataset style: (source image, instruction, target image)
EDIT_STYLES: dict[str, tuple[str, str, str]] = {
    "instructpix2pix": ("input_image", "edit_prompt", "edited_image"),
    "magicbrush": ("source_img", "instruction", "target_img"),
}
_KEEP_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


class _Writer:
    """Size-limited shard writer for one task that records the shards it wrote."""

    def __init__(self, out: str | os.PathLike, task: str, maxcount: int, maxsize: int, prefix: str | None) -> None:
        if maxcount < 1 or maxsize < 1:
            raise ValueError(f"maxcount and maxsize must be >= 1, got {maxcount}, {maxsize}")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.task, self.prefix = task, prefix or task
        self.maxcount, self.maxsize = maxcount, maxsize
        self.files: list[str] = []
        self._writer: Any = None
        self._keys: set[str] = set()

    def write(self, sample: dict[str, Any]) -> None:
        import webdataset as wds

        if self._writer is None:  # lazily, so a run that writes nothing leaves no empty tar
            self._writer = wds.ShardWriter(
                str(self.out / f"{self.prefix}-%06d.tar"),
                maxcount=self.maxcount,
                maxsize=self.maxsize,
                verbose=0,
                post=lambda fname: self.files.append(os.path.basename(fname)),
                mtime=0,  # reproducible shards; an int mtime also avoids a PAX header per member
            )
        key = sample["__key__"]
        n = 1
        while sample["__key__"] in self._keys:  # sanitised names can collide
            n += 1
            sample["__key__"] = f"{key}_{n}"
        self._keys.add(sample["__key__"])
        self._writer.write(sample)

    def close(self, kind: str, counts: dict[str, int], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close the shards and merge this conversion into ``manifest.json``; return its counts.

        Merging (rather than overwriting) lets several converters fill one directory,
        e.g. captioned images (t2i) and editing triplets (edit).
        """
        if self._writer is not None:
            self._writer.close()
        manifest = shards_mod.read_manifest(self.out) or {}
        if manifest.get("generator") not in (None, "convert"):
            manifest = {}  # a shapes set or foreign manifest: the new shards replace its listing
        shard_lists = dict(manifest.get("shards", {}))
        task_counts = dict(manifest.get("counts", {}))
        if self.files:
            shard_lists[self.task] = sorted(self.files)
        task_counts[self.task] = counts.get("written", 0)
        record = {"kind": kind, **counts, "shards": len(self.files), **(extra or {})}
        manifest = {
            "format": "unifusion-shards/1",
            "generator": "convert",
            "counts": task_counts,
            "shards": shard_lists,
            "conversions": [*manifest.get("conversions", []), record],
        }
        shards_mod.write_manifest(self.out, manifest)
        summary = dict(counts)
        summary["shards"] = len(self.files)
        log.debug("%s -> %s: %s", kind, self.out, summary)  # the command prints the counts
        return summary


def _sanitize_key(text: str) -> str:
    # webdataset splits member names at the first dot, and '/' would make sub-folders
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return key or "sample"


def _image_field(data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) to store after a full decode (which raises on unreadable data).

    PNG/JPEG/WEBP are kept byte for byte; anything else is re-encoded to PNG.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.format in _KEEP_EXT:
            return _KEEP_EXT[img.format], data
        return "png", shards_mod.png_bytes(img.convert("RGB"))


# ---------------------------------------------------------------------------------------


def convert_image_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    caption_ext: str = ".txt",
    require_caption: bool = True,
    recursive: bool = True,
    maxcount: int = 1000,
    maxsize: int = 1 << 30,
    task: str = "t2i",
) -> dict[str, int]:
    """Shard a folder of images with sibling caption files (``a/b.png`` + ``a/b.txt``).

    Images without a caption file are skipped (``skipped_no_caption``) unless
    ``require_caption=False`` (then the caption is empty); a caption file that is not UTF-8
    text is skipped too (``skipped_bad_caption``). Returns counts: ``written``,
    ``skipped_unreadable``, ``skipped_no_caption``, ``skipped_bad_caption``, ``shards``.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(root.rglob("*") if recursive else root.iterdir())
    images = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    writer = _Writer(out, task, maxcount, maxsize, None)
    counts = {"written": 0, "skipped_unreadable": 0, "skipped_no_caption": 0, "skipped_bad_caption": 0}
    for path in images:
        cap_path = path.with_suffix(caption_ext)
        if cap_path.is_file():
            try:
                text = cap_path.read_text(encoding="utf-8").strip()
            except (UnicodeDecodeError, OSError) as e:
                # one bad caption file must not abort a conversion of millions of images
                counts["skipped_bad_caption"] += 1
                log.warning("skipping %s: caption file %s is not readable UTF-8 text (%s)", path, cap_path, e)
                continue
        elif require_caption:
            counts["skipped_no_caption"] += 1
            continue
        else:
            text = ""
        try:
            ext, data = _image_field(path.read_bytes())
        except Exception as e:
            counts["skipped_unreadable"] += 1
            log.warning("skipping unreadable image %s: %s", path, e)
            continue
        rel = path.relative_to(root).with_suffix("")
        meta = {"task": task, "source": str(path.relative_to(root))}
        writer.write({"__key__": _sanitize_key(str(rel)), ext: data, "txt": text, "json": json.dumps(meta)})
        counts["written"] += 1
    return writer.close("image_folder", counts, {"src": str(root), "maxcount": maxcount, "maxsize": maxsize})


def _read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL, JSON (list or {"data": [...]}), CSV/TSV or parquet file as dicts."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"records file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    elif suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            rows = data.get("data") or data.get("rows") or data.get("records")
            if rows is None:  # a dict of columns
                keys = list(data)
                rows = [dict(zip(keys, vals)) for vals in zip(*(data[k] for k in keys))]
            data = rows
        yield from data
    elif suffix in (".csv", ".tsv"):
        with p.open(encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        # stream row groups so a large parquet file never sits in memory whole
        pf = pq.ParquetFile(str(p))
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i).to_pylist()
    else:
        raise ValueError(f"unsupported records file {str(p)!r}: use .jsonl, .json, .csv, .tsv or .parquet")


def _image_bytes(value: Any, roots: Iterable[Path]) -> bytes:
    """Image bytes from raw bytes, an HF ``{"bytes", "path"}`` dict, or a (relative) path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return _image_bytes(value["path"], roots)
        raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, str) and value:
        p = Path(os.path.expanduser(value))
        candidates = [p] if p.is_absolute() else [Path(r) / p for r in roots]
        for c in candidates:
            if c.is_file():
                return c.read_bytes()
        raise FileNotFoundError(f"image file {value!r} not found (looked in {[str(c) for c in candidates]})")
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


def _key_for(row: dict[str, Any], key_column: str | None, i: int, fallback: Any = None) -> str:
    if key_column and row.get(key_column) not in (None, ""):
        return _sanitize_key(str(row[key_column]))
    if isinstance(fallback, str) and fallback:
        return f"{i:08d}_{_sanitize_key(Path(fallback).stem)}"
    return f"{i:08d}"


def convert_index(
    index_file: str | os.PathLike,
    image_root: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    key_column: str | None = None,
    maxcount: int = 1000,
    maxsize: int = 1 << 30,
    task: str = "t2i",
) -> dict[str, int]:
    """Shard images listed in a JSONL/CSV/JSON/parquet index with a caption column.

    ``image_key`` holds a path (relative to ``image_root``, default the index's folder),
    bytes or an HF image dict. Returns counts: ``written``, ``skipped_unreadable`` (missing
    or undecodable images), ``skipped_no_caption``, ``shards``.
    """
    roots = [Path(image_root)] if image_root else [Path(index_file).parent]
    writer = _Writer(out, task, maxcount, maxsize, None)
    counts = {"written": 0, "skipped_unreadable": 0, "skipped_no_caption": 0}
    for i, row in enumerate(_read_records(index_file)):
        if image_key not in row:
            raise KeyError(f"index {str(index_file)!r} row {i} has no column {image_key!r} (columns: {sorted(row)})")
        text = row.get(caption_key)
        if text is None or (isinstance(text, float) and text != text):  # missing or NaN
            counts["skipped_no_caption"] += 1
            continue
        try:
            ext, data = _image_field(_image_bytes(row[image_key], roots))
        except Exception as e:
            counts["skipped_unreadable"] += 1
            log.warning("skipping row %d of %s: %s", i, index_file, e)
            continue
        meta = {k: v for k, v in row.items() if k != image_key and isinstance(v, (str, int, float, bool))}
        meta["task"] = task
        key = _key_for(row, key_column, i, row[image_key] if isinstance(row[image_key], str) else None)
        writer.write({"__key__": key, ext: data, "txt": str(text).strip(), "json": json.dumps(meta)})
        counts["written"] += 1
    return writer.close("index", counts, {"src": str(index_file), "maxcount": maxcount, "maxsize": maxsize})


def convert_edit_records(
    records_file: str | os.PathLike,
    out: str | os.PathLike,
    style: str = "instructpix2pix",
    *,
    image_root: str | os.PathLike | None = None,
    source_key: str | None = None,
    instruction_key: str | None = None,
    target_key: str | None = None,
    key_column: str | None = None,
    maxcount: int = 1000,
    maxsize: int = 1 << 30,
) -> dict[str, int]:
    """Shard editing triplets as ``src.<ext>``, ``tgt.<ext>``, ``txt`` (instruction), ``json``.

    ``style`` picks default column names (:data:`EDIT_STYLES`: InstructPix2Pix
    ``input_image/edit_prompt/edited_image``, MagicBrush ``source_img/instruction/target_img``);
    ``*_key`` override them. Returns counts: ``written``, ``skipped_unreadable``,
    ``skipped_no_instruction``, ``shards``.
    """
    if style not in EDIT_STYLES:
        raise ValueError(f"unknown edit style {style!r}; choose one of {sorted(EDIT_STYLES)}")
    s_key, i_key, t_key = EDIT_STYLES[style]
    s_key, i_key, t_key = source_key or s_key, instruction_key or i_key, target_key or t_key
    roots = [Path(image_root)] if image_root else [Path(records_file).parent]
    writer = _Writer(out, "edit", maxcount, maxsize, None)
    counts = {"written": 0, "skipped_unreadable": 0, "skipped_no_instruction": 0}
    for i, row in enumerate(_read_records(records_file)):
        missing = [k for k in (s_key, i_key, t_key) if k not in row]
        if missing:
            raise KeyError(
                f"{style} record {i} of {str(records_file)!r} lacks columns {missing} (columns: {sorted(row)}); "
                "pass source_key/instruction_key/target_key"
            )
        text = row[i_key]
        if not isinstance(text, str) or not text.strip():
            counts["skipped_no_instruction"] += 1
            continue
        try:
            s_ext, s_data = _image_field(_image_bytes(row[s_key], roots))
            t_ext, t_data = _image_field(_image_bytes(row[t_key], roots))
        except Exception as e:
            counts["skipped_unreadable"] += 1
            log.warning("skipping record %d of %s: %s", i, records_file, e)
            continue
        meta = {k: v for k, v in row.items() if k not in (s_key, t_key) and isinstance(v, (str, int, float, bool))}
        meta.update(task="edit", style=style, instruction=text)
        sample = {
            "__key__": _key_for(row, key_column, i),
            f"src.{s_ext}": s_data,
            f"tgt.{t_ext}": t_data,
            "txt": text.strip(),
            "json": json.dumps(meta),
        }
        writer.write(sample)
        counts["written"] += 1
    extra = {"src": str(records_file), "style": style, "maxcount": maxcount, "maxsize": maxsize}
    return writer.close("edit_records", counts, extra)


# ---------------------------------------------------------------------------------------
# plain functions for the CLI


CONVERTERS = ("image_folder", "index", "edit_records")


def convert_command(
    kind: Literal["image_folder", "index", "edit_records"],
    src: str,
    out: str,
    *,
    maxcount: int = 1000,
    maxsize: int = 1 << 30,
    image_root: str | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
    key_column: str | None = None,
    caption_ext: str = ".txt",
    require_caption: bool = True,
    style: Literal["instructpix2pix", "magicbrush"] = "instructpix2pix",
    source_key: str | None = None,
    instruction_key: str | None = None,
    target_key: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``unifusion data convert``: turn your images/captions or editing records into shards.

    Returns the counts (``written``, ``skipped_*``, ``shards``); the command prints them.

    Args:
        kind: ``image_folder``: SRC is a folder tree of images, each with a caption file of the
            same name (``a/b.png`` + ``a/b.txt``). ``index``: SRC is a JSONL/JSON/CSV/TSV/parquet
            index with columns ``image_key`` (a path relative to ``image_root``, bytes, or an HF
            image dict) and ``caption_key``. ``edit_records``: SRC is a parquet/JSON/JSONL file of
            editing triplets whose columns ``style`` names (or ``source_key``/``instruction_key``/
            ``target_key`` give).
        src: input folder or file.
        out: output shard directory (``manifest.json`` is merged, so kinds can share one).
        maxcount: samples per shard at most.
        maxsize: bytes per shard (a shard is closed once it reaches this size).
        image_root: ``index``/``edit_records``: folder that relative image paths start from
            (default: SRC's folder).
        image_key: ``index``: the image column.
        caption_key: ``index``: the caption column.
        key_column: ``index``/``edit_records``: a column with unique sample ids (default: row number).
        caption_ext: ``image_folder``: suffix of the caption files.
        require_caption: ``image_folder``: skip images without a caption file (else: empty caption).
        style: ``edit_records``: the dataset's column names (source image, instruction, target image):
            ``instructpix2pix`` = ``input_image``, ``edit_prompt``, ``edited_image``;
            ``magicbrush`` = ``source_img``, ``instruction``, ``target_img``. Images may be bytes,
            ``{"bytes": ..., "path": ...}`` dicts (Hugging Face datasets) or paths.
        source_key: ``edit_records``: source-image column, overriding ``style``.
        instruction_key: ``edit_records``: instruction column, overriding ``style``.
        target_key: ``edit_records``: target-image column, overriding ``style``.
    """
    limits = {"maxcount": maxcount, "maxsize": maxsize}
    if kind == "image_folder":
        counts = convert_image_folder(
            src, out, caption_ext=caption_ext, require_caption=require_caption, **limits, **options
        )
    elif kind == "index":
        counts = convert_index(
            src,
            image_root,
            out,
            image_key=image_key,
            caption_key=caption_key,
            key_column=key_column,
            **limits,
            **options,
        )
    elif kind == "edit_records":
        counts = convert_edit_records(
            src,
            out,
            style=style,
            image_root=image_root,
            source_key=source_key,
            instruction_key=instruction_key,
            target_key=target_key,
            key_column=key_column,
            **limits,
            **options,
        )
    else:
        raise ValueError(f"unknown converter kind {kind!r}; choose one of {list(CONVERTERS)}")
    return counts
