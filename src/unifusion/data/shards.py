"""Webdataset shards: the shapes-world writer, a shard lister and a plain sample reader.

Shard layout (shared with :mod:`unifusion.data.convert`): a directory of ``*.tar`` files
plus ``manifest.json``. Sample keys contain no dots (webdataset splits a member name into
key and field at the first dot). Fields:

- ``png`` (or ``jpg``/``webp``): the image to generate; ``txt``: caption; ``json``: metadata
  with ``task`` and, for shapes, the scene graph;
- edit samples: ``src.png``, ``tgt.png``, ``txt`` = instruction;
- cached samples additionally ``feat.pth`` and optionally ``rewrite.txt``.

``manifest.json`` has ``counts`` and ``shards`` = ``{task: [file names]}``, which lets a
data source with ``task="edit"`` read only the edit shards of a mixed directory.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds

from . import shapes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TASKS = ("t2i", "recon", "edit")
# fork where available: a spawned worker re-imports torch/webdataset, which takes longer
# than writing a few thousand samples; the shard jobs touch no torch state
_POOL_START = "fork" if sys.platform.startswith("linux") else "spawn"
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


def png_bytes(array: Any) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array (or a PIL image) as PNG bytes, deterministically."""
    from PIL import Image

    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (a crashed writer never leaves half a manifest)."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a shard directory, or None when there is none."""
    p = Path(path)
    p = p / MANIFEST if p.is_dir() else p
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def _assign_tasks(num: int, seed: int, edit_fraction: float, recon_fraction: float) -> list[str]:
    if not (0 <= edit_fraction <= 1 and 0 <= recon_fraction <= 1 and edit_fraction + recon_fraction <= 1):
        raise ValueError(
            f"edit_fraction ({edit_fraction}) and recon_fraction ({recon_fraction}) must be in [0, 1] and sum to <= 1"
        )
    n_edit, n_recon = round(num * edit_fraction), round(num * recon_fraction)
    tasks = ["edit"] * n_edit + ["recon"] * n_recon + ["t2i"] * (num - n_edit - n_recon)
    # exact counts (so the manifest matches the request) in a seeded random order
    random.Random(f"tasks-{seed}").shuffle(tasks)
    return tasks


def _shapes_sample(i: int, task: str, seed: int, size: int, min_objects: int, max_objects: int) -> dict[str, Any]:
    """Sample ``i`` of a shapes set: a pure function of its arguments."""
    rng = random.Random(f"shapes-{seed}-{i}")
    key = f"shapes{seed}_{i:08d}".replace("-", "m")  # negative seeds stay dot-free and tidy
    if task == "edit":
        # the source needs room for add/remove, so draw at least one object
        scene = shapes.random_scene(rng, max(1, min_objects), max(max_objects, 1))
        instruction, target, record = shapes.make_edit(scene, rng, max_objects=max(max_objects, 2))
        meta = {
            "task": "edit",
            "source_scene": scene.to_dict(),
            "target_scene": target.to_dict(),
            "edit": record,
            "instruction": instruction,
            "target_caption": shapes.caption(target, rng, style="full"),
        }
        return {
            "__key__": key,
            "src.png": png_bytes(shapes.render(scene, size)),
            "tgt.png": png_bytes(shapes.render(target, size)),
            "txt": instruction,
            "json": json.dumps(meta, sort_keys=True),
        }
    scene = shapes.random_scene(rng, min_objects, max_objects)
    text = shapes.caption(scene, rng)
    meta = {"task": task, "scene": scene.to_dict(), "caption": text}
    return {
        "__key__": key,
        "png": png_bytes(shapes.render(scene, size)),
        "txt": text,
        "json": json.dumps(meta, sort_keys=True),
    }


def _write_shapes_shard(job: tuple[str, str, list[int], dict[str, Any]]) -> dict[str, int]:
    """Write one complete shard (a job of a pool); returns its edit-type counts."""
    path, task, indices, kw = job
    edit_types: dict[str, int] = {}
    tmp = path + ".tmp"
    # a fixed int mtime makes shards byte-identical across runs (a float one would also
    # cost a PAX header per member)
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as w:
        for i in indices:
            sample = _shapes_sample(i, task, **kw)
            if task == "edit":
                kind = json.loads(sample["json"])["edit"]["type"]
                edit_types[kind] = edit_types.get(kind, 0) + 1
            w.write(sample)
    os.replace(tmp, path)
    return edit_types


def write_shapes_shards(
    out_dir: str | os.PathLike,
    num: int,
    seed: int,
    size: int = 16,
    edit_fraction: float = 0.0,
    recon_fraction: float = 0.0,
    shard_size: int = 1000,
    min_objects: int = 1,
    max_objects: int = 2,
    workers: int = 1,
) -> dict[str, Any]:
    """Write ``num`` shapes-world samples as webdataset shards into ``out_dir``.

    Each task goes to its own shards (``t2i-000000.tar``, ``recon-...``, ``edit-...``), so
    a data source can read one task of a mixed directory via the manifest. Sample ``i``
    is a pure function of ``(seed, i)`` and shards are cut before writing, so the same
    arguments give byte-identical shards for any number of ``workers`` (processes).
    Returns the manifest (also written to ``out_dir/manifest.json``).
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = _assign_tasks(num, seed, edit_fraction, recon_fraction)
    per_task: dict[str, list[int]] = {t: [] for t in TASKS}
    for i, task in enumerate(tasks):
        per_task[task].append(i)
    kw = {"seed": seed, "size": size, "min_objects": min_objects, "max_objects": max_objects}
    jobs, files = [], {}
    for task, indices in per_task.items():
        chunks = [indices[k : k + shard_size] for k in range(0, len(indices), shard_size)]
        if chunks:
            files[task] = [f"{task}-{n:06d}.tar" for n in range(len(chunks))]
            jobs += [(str(out / name), task, chunk, kw) for name, chunk in zip(files[task], chunks)]
    workers = max(1, min(int(workers), len(jobs)))
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context(_POOL_START).Pool(workers) as pool:
            results = pool.map(_write_shapes_shard, jobs, chunksize=1)
    else:
        results = [_write_shapes_shard(job) for job in jobs]
    edit_types: dict[str, int] = {}
    for r in results:
        for k, v in r.items():
            edit_types[k] = edit_types.get(k, 0) + v
    manifest = {
        "format": "unifusion-shards/1",
        "generator": "shapes",
        "seed": seed,
        "size": size,
        "num": num,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "edit_fraction": edit_fraction,
        "recon_fraction": recon_fraction,
        # the compositions the generator left out (ShapesBench's held_out category)
        "held_out": shapes.HELD_OUT.names(),
        "shard_size": shard_size,
        "counts": {t: len(v) for t, v in per_task.items()},
        "edit_types": dict(sorted(edit_types.items())),
        "shards": files,
    }
    write_manifest(out, manifest)
    return manifest


def shapes_command(
    out: str,
    num: int,
    seed: int = 0,
    size: int = 16,
    edit_fraction: float = 0.0,
    recon_fraction: float = 0.0,
    shard_size: int = 1000,
    workers: int = 1,
) -> dict[str, Any]:
    """``unifusion data shapes``: write procedural shapes-world shards (the quickstart's data).

    Returns the per-task counts and the number of shards; the command prints them.

    Args:
        out: output shard directory (with ``manifest.json``).
        num: samples to write.
        seed: generator seed (same seed, same bytes).
        size: image side in px.
        edit_fraction: fraction of samples that are editing triplets (``src.png``, ``txt``, ``tgt.png``).
        recon_fraction: fraction of samples marked for reconstruction.
        shard_size: samples per shard.
        workers: processes writing shards in parallel (same bytes for any number).
    """
    manifest = write_shapes_shards(
        out,
        num=num,
        seed=seed,
        size=size,
        edit_fraction=edit_fraction,
        recon_fraction=recon_fraction,
        shard_size=shard_size,
        workers=workers,
    )
    counts = dict(manifest["counts"])
    counts["shards"] = sum(len(v) for v in manifest["shards"].values())
    log.debug("wrote %d shapes samples (%d px, seed %d) to %s: %s", num, size, seed, out, counts)
    return counts


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def _expand_one(spec: str) -> list[str]:
    spec = os.path.expanduser(spec)
    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        return sorted(
            os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(SHARD_SUFFIXES) and not f.startswith(".")
        )
    out: list[str] = []
    for part in braceexpand.braceexpand(spec):
        if glob.has_magic(part):
            out.extend(sorted(glob.glob(part)))
        elif os.path.isfile(part):
            out.append(part)
    return out


def shard_urls(path_or_pattern: str | os.PathLike | Iterable[str]) -> list[str]:
    """Shard URLs from a directory, a glob (``data/*.tar``), a brace pattern
    (``data/t2i-{000000..000009}.tar``), a ``::``-separated list of these, or a list.

    Remote URLs (``pipe:``, ``http(s)://``, ``s3://``...) are brace-expanded but not checked.
    Raises ``FileNotFoundError`` naming the path when nothing matches.
    """
    if isinstance(path_or_pattern, (str, os.PathLike)):
        specs = str(path_or_pattern).split("::")
    else:
        specs = [str(p) for p in path_or_pattern]
    urls: list[str] = []
    for spec in specs:
        found = _expand_one(spec)
        if not found:
            hint = (
                "the directory has no .tar shards"
                if os.path.isdir(os.path.expanduser(spec))
                else "no file matches (expected a directory of .tar shards, a glob or a brace pattern)"
            )
            raise FileNotFoundError(
                f"No webdataset shards found at {spec!r}: {hint}. "
                "Write some with `unifusion data shapes` or `unifusion data convert`, or fix the path."
            )
        urls.extend(found)
    return urls


def task_shard_urls(path: str | os.PathLike, task: str) -> list[str]:
    """Shards of ``path`` holding ``task`` samples.

    For a directory with a manifest listing shards per task, only that task's shards
    (``recon`` falls back to the ``t2i`` shards: any image can be reconstructed); for
    anything else, every shard :func:`shard_urls` finds.
    """
    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        manifest = read_manifest(p)
        per_task = (manifest or {}).get("shards")
        if isinstance(per_task, dict) and per_task:
            names = per_task.get(task) or (per_task.get("t2i") if task == "recon" else None)
            if not names:
                raise FileNotFoundError(
                    f"The manifest of {p!r} lists no shards for task {task!r} (it has: {sorted(per_task)}). "
                    f"Write {task} samples there (for shapes: edit_fraction/recon_fraction) or change the source's task."
                )
            return [os.path.join(p, n) for n in names]
    return shard_urls(p)


def read_samples(urls: str | os.PathLike | Iterable[str]) -> Iterator[dict[str, Any]]:
    """Iterate raw samples (``__key__``, ``__url__`` and one bytes value per field) in order.

    A plain, single-process reader for inspection, tests and converters; training goes
    through :class:`unifusion.data.datamodule.UniFusionDataModule`.
    """
    resolved = shard_urls(urls)
    for url in resolved:
        if _is_remote(url):
            stream = wds.gopen(url)
            yield from _iter_tar(tarfile.open(fileobj=stream, mode="r|*"), url)
        else:
            with tarfile.open(url, mode="r|*") as tf:
                yield from _iter_tar(tf, url)


def _iter_tar(tf: tarfile.TarFile, url: str) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] | None = None
    for member in tf:
        if not member.isfile():
            continue
        dirname, base = os.path.split(member.name)
        if "." not in base:
            continue
        stem, field = base.split(".", 1)
        key = os.path.join(dirname, stem) if dirname else stem
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        f = tf.extractfile(member)
        current[field] = f.read() if f is not None else b""
    if current is not None:
        yield current
