"""The training/validation data module: weighted task mix over webdataset shards.

Each :class:`DataSource` (a shard path + one task) becomes its own stream of batches; a
seeded RNG interleaves those batch streams by weight, so a batch never mixes tasks (the
model runs one conditioning path per step) while the *batch* mix follows the weights,
e.g. the paper's 85% text->image / 5% reconstruction / 10% editing (:func:`default_mix`).

Batches follow ``docs/contracts.md``. Corrupt samples are skipped and counted
(``datamodule.skipped``), the realised task mix is recorded (``datamodule.realised_mix``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.context
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ..features import EncoderFeatures
from ..images import decode_image, load_image_bytes, resize_center_crop
from . import shards as shards_mod

log = logging.getLogger(__name__)

TASKS = ("t2i", "recon", "edit")
#: The paper's pre-training mix (Sec. training recipe): 85% t2i, 5% recon, 10% edit.
DEFAULT_MIX: dict[str, float] = {"t2i": 0.85, "recon": 0.05, "edit": 0.10}
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
CACHE_META = "cache_meta.json"


@dataclass
class DataSource:
    """One stream of samples: shards at ``path`` used for ``task`` with mixing ``weight``.

    ``path`` is a shard directory, a glob or a brace pattern (see
    :func:`unifusion.data.shards.shard_urls`). ``cached=True`` reads a feature cache
    written by ``unifusion cache`` (:mod:`unifusion.encoders.cache`) at ``path`` instead of
    prompts/images.
    """

    path: str
    task: str = "t2i"
    weight: float = 1.0
    cached: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DataSource.task must be one of {TASKS}, got {self.task!r} (path {self.path!r})")
        if not self.weight > 0:
            raise ValueError(f"DataSource.weight must be > 0, got {self.weight} (path {self.path!r})")
        self.path = str(self.path)


@dataclass
class ShapesConfig:
    """Generate shapes-world shards in ``prepare_data`` where a source path has none.

    ``size=None`` uses the data module's ``image_size``. Validation sources get
    ``val_num`` samples from ``seed + 1`` so they never repeat training scenes.
    ``workers`` processes write shards in parallel (same bytes for any number).
    """

    num: int = 20000
    seed: int = 0
    size: int | None = None
    edit_fraction: float = 0.0
    recon_fraction: float = 0.0
    shard_size: int = 1000
    min_objects: int = 1
    max_objects: int = 2
    val_num: int = 512
    workers: int = 1


def default_mix(path: str, cached: bool = False) -> list[DataSource]:
    """The paper's 85/5/10 t2i/recon/edit mix over one shard directory (see :data:`DEFAULT_MIX`)."""
    return [DataSource(path=path, task=t, weight=w, cached=cached) for t, w in DEFAULT_MIX.items()]


# ---------------------------------------------------------------------------------------
# counters shared with DataLoader worker processes


class _SharedInt:
    """An integer shared with DataLoader worker processes (a ``multiprocessing.Value``).

    The value can only travel to a process being spawned (DataLoader workers; forked ones
    inherit it); anywhere else (e.g. a deepcopy) the copy is a fresh one with the same value."""

    def __init__(self, value: int = 0) -> None:
        self._value = multiprocessing.Value("q", int(value))

    def get(self) -> int:
        return int(self._value.value)

    def set(self, value: int) -> None:
        with self._value.get_lock():
            self._value.value = int(value)

    def add(self, n: int) -> int:
        """Add ``n``; returns the new value (atomic across processes)."""
        with self._value.get_lock():
            self._value.value += n
            return int(self._value.value)

    def __reduce__(self) -> tuple[Any, ...]:
        if multiprocessing.context.get_spawning_popen() is not None:
            return (_rebuild_shared_int, (self._value,))
        return (_SharedInt, (self.get(),))


def _rebuild_shared_int(value: Any) -> _SharedInt:
    shared = _SharedInt.__new__(_SharedInt)
    shared._value = value
    return shared


class _SkipCounter:
    """Counts skipped samples across DataLoader workers."""

    def __init__(self, warn_first: int = 10, warn_every: int = 100) -> None:
        self._count = _SharedInt(0)
        self.warn_first, self.warn_every = warn_first, warn_every

    @property
    def value(self) -> int:
        return self._count.get()

    def reset(self, value: int = 0) -> None:
        self._count.set(value)

    def __call__(self, exn: BaseException, where: str = "") -> bool:
        """webdataset handler: count, warn (rate-limited), and keep going."""
        n = self._count.add(1)
        if n <= self.warn_first or n % self.warn_every == 0:
            log.warning(
                "skipped corrupt/unreadable sample%s: %s: %s (%d skipped so far)", where, type(exn).__name__, exn, n
            )
        return True


# ---------------------------------------------------------------------------------------
# decoding


def _load_image(data: bytes, size: int | None) -> torch.Tensor:
    """PNG/JPEG bytes -> float (3, size, size) in [0, 1]; shorter side resized, centre-cropped.

    The library's one decoder and resize (:func:`unifusion.images.load_image_bytes`): 16-bit
    and other high-bit-depth images keep their brightness, and the feature cache prepares
    reference images identically."""
    return load_image_bytes(data, size)


def _field(sample: dict[str, Any], prefix: str, task: str) -> bytes:
    for ext in IMAGE_EXTS:
        if prefix + ext in sample:
            return sample[prefix + ext]
    present = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"{task} sample {sample.get('__key__')!r} has no {prefix}png/jpg image (fields: {present})")


def _text(sample: dict[str, Any], name: str = "txt") -> str | None:
    value = sample.get(name)
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class _Decoder:
    """Raw webdataset sample -> decoded sample dict for one task (picklable for workers)."""

    task: str
    cached: bool
    image_size: int
    reference_size: int | None  # None: keep the stored size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key = str(sample.get("__key__"))
        out: dict[str, Any] = {"key": key}
        if self.task == "edit":
            # src.* first, then any further references src1.*, src2.*, ... in numeric order
            stems = sorted({k.split(".", 1)[0] for k in sample if k[:3] == "src" and k[3:4].isdigit()}, key=_ref_no)
            refs = [_field(sample, "src.", "edit")] + [_field(sample, stem + ".", "edit") for stem in stems]
            out["target"] = _load_image(_field(sample, "tgt.", "edit"), self.image_size)
            out["images"] = [_load_image(r, self.reference_size) for r in refs]
        else:
            img = _load_image(_field(sample, "", self.task), self.image_size)
            out["target"] = img
            out["images"] = []
            if self.task == "recon":
                same = self.reference_size == self.image_size
                out["images"] = [img if same else _load_image(_field(sample, "", "recon"), self.reference_size)]
        if self.task == "recon":
            out["prompt"] = ""
        else:
            text = _text(sample)
            if text is None:
                raise KeyError(f"{self.task} sample {key!r} has no txt (caption/instruction)")
            out["prompt"] = text
        return out


class _CachedShard:
    """One feature-cache shard as data-module samples (``key``, ``target``, ``features``).

    Memory-mapped: each sample's tokens are sliced from the file and its target decoded when
    asked for. ``in_memory``: the file is read once and every target decoded up front; the
    result is kept for the life of the process (see :func:`_open_cached_shard`)."""

    def __init__(self, path: str, image_size: int, in_memory: bool) -> None:
        from ..encoders.cache import CacheShard

        self.shard = CacheShard(path, in_memory=in_memory)
        self.image_size = image_size
        self.targets: list[torch.Tensor | Exception] | None = None
        self.features: list[EncoderFeatures] | None = None
        if in_memory:
            self.targets = [self._decode_target(i) for i in range(len(self.shard))]
            self.features = [self.shard.features(i) for i in range(len(self.shard))]

    def __len__(self) -> int:
        return len(self.shard)

    def task(self, i: int) -> str:
        return self.shard.samples[i].get("task", "t2i")

    def key(self, i: int) -> str:
        return self.shard.samples[i].get("key", str(i))

    def _decode_target(self, i: int) -> torch.Tensor | Exception:
        try:  # as uint8: a quarter of the memory; made float per sample (as _load_image does)
            img = resize_center_crop(decode_image(self.shard.image_bytes(i)), self.image_size)
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        except Exception as e:  # reported (and counted) when the sample is asked for
            return e

    def item(self, i: int) -> dict[str, Any]:
        if self.targets is None or self.features is None:
            target = _load_image(self.shard.image_bytes(i), self.image_size)
            return {"key": self.key(i), "target": target, "features": self.shard.features(i)}
        target = self.targets[i]
        if isinstance(target, Exception):
            raise target
        return {"key": self.key(i), "target": target.float().div_(255.0), "features": self.features[i]}


#: in-memory cache shards already loaded by this process: (path, mtime, size, image_size) -> shard
_IN_MEMORY_SHARDS: dict[tuple[str, float, int, int], _CachedShard] = {}


def _open_cached_shard(path: str, image_size: int, in_memory: bool) -> _CachedShard:
    if not in_memory:
        return _CachedShard(path, image_size, False)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime, st.st_size, image_size)
    shard = _IN_MEMORY_SHARDS.get(key)
    if shard is None:
        shard = _IN_MEMORY_SHARDS[key] = _CachedShard(path, image_size, True)
    return shard


def _ref_no(stem: str) -> int:
    digits = stem[3:]
    return int(digits) if digits.isdigit() else 1 << 30


def _collate(task: str, cached: bool, items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "task": task,
        "key": [it["key"] for it in items],
        # images are stored in [0, 1]; the model generates in [-1, 1]
        "target": torch.stack([it["target"] for it in items]).mul_(2.0).sub_(1.0),
    }
    if cached:
        batch["features"] = EncoderFeatures.collate([it["features"] for it in items])
    else:
        batch["prompt"] = [it["prompt"] for it in items]
        batch["images"] = [it["images"] for it in items]
    return batch


def _length_key(item: dict[str, Any]) -> tuple[int, int]:
    """How many tokens a sample will pad to: its reference images first, then its text.

    A cached sample knows its token count; a live one is measured by its prompt's characters
    (the tokenizer runs later, in the model; characters order captions as tokens do, closely)."""
    if "features" in item:
        return 0, int(item["features"].seq_len)
    return len(item.get("images") or ()), len(item.get("prompt") or "")


def _identity(x: Any) -> Any:
    return x


# ---------------------------------------------------------------------------------------
# the mixed stream


@dataclass
class _SourceSpec:
    index: int
    task: str
    weight: float
    cached: bool
    urls: list[str]


class _MixedBatches(IterableDataset):
    """Weighted interleaving of per-source batch streams (one task per batch)."""

    def __init__(
        self,
        sources: list[_SourceSpec],
        *,
        batch_size: int,
        image_size: int,
        reference_size: int | None,
        shuffle_buffer: int,
        epoch_length: int | None,
        resampled: bool,
        seed: int,
        train: bool,
        skipped: _SkipCounter,
        rank: int = 0,
        world_size: int = 1,
        cache_in_memory: bool = False,
        group_by_length: int = 0,
    ) -> None:
        super().__init__()
        self.cache_in_memory = cache_in_memory
        self.group_by_length = group_by_length
        self.sources = sources
        self.batch_size, self.image_size, self.reference_size = batch_size, image_size, reference_size
        self.shuffle_buffer, self.epoch_length, self.resampled = shuffle_buffer, epoch_length, resampled
        self.seed, self.train, self.skipped = seed, train, skipped
        self.rank, self.world_size = rank, world_size
        # shared: persistent workers start each epoch's stream from the epoch set here
        self._epoch = _SharedInt(0)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    def _info(self) -> tuple[int, int, int, int]:
        """(rank, world_size, worker, num_workers). Rank and world size are captured in the
        main process when the loader is built: a worker process may not see the process group."""
        w = torch.utils.data.get_worker_info()
        return self.rank, self.world_size, (w.id if w else 0), (w.num_workers if w else 1)

    # -- one source ------------------------------------------------------------------
    def _urls_once(self, src: _SourceSpec, pass_idx: int) -> tuple[list[str], int, int]:
        """This worker's shards for one pass and the (stride, offset) for sample-level split."""
        rank, world, worker, nworkers = self._info()
        total, gid = world * nworkers, rank * nworkers + worker
        urls = list(src.urls)
        if self.train:
            # same permutation on every rank/worker, so the split stays a partition
            random.Random(f"shards-{self.seed}-{src.index}-{self.epoch}-{pass_idx}").shuffle(urls)
        if len(urls) >= total:
            return urls[gid::total], 1, 0
        # fewer shards than readers: everyone reads all shards, keeping every total-th sample
        return urls, total, gid

    def _samples(self, src: _SourceSpec) -> Iterator[dict[str, Any]]:
        if src.cached:
            yield from self._cached_samples(src)
            return
        rank, _, worker, _ = self._info()
        decode = _Decoder(src.task, src.cached, self.image_size, self.reference_size)
        where = f" in source {src.index} ({src.task})"
        pass_idx = 0
        while True:
            if self.resampled:
                rng = random.Random(f"resample-{self.seed}-{src.index}-{self.epoch}-{rank}-{worker}")
                url_iter: Iterator[dict[str, str]] = ({"url": rng.choice(src.urls)} for _ in iter(int, 1))
                stride, offset = 1, 0
            else:
                urls, stride, offset = self._urls_once(src, pass_idx)
                url_iter = iter([{"url": u} for u in urls])
            raw = wds.tariterators.tarfile_samples(url_iter, handler=lambda e: self.skipped(e, where))
            n_yielded = 0
            for i, sample in enumerate(raw):
                if stride > 1 and i % stride != offset:
                    continue
                try:
                    item = decode(sample)
                except Exception as e:  # a corrupt sample must never end a long run
                    self.skipped(e, f"{where} key {sample.get('__key__')!r}")
                    continue
                n_yielded += 1
                yield item
            # finite pass done; repeat forever only when an epoch length drives the loop
            if self.epoch_length is None or self.resampled:
                return
            if n_yielded == 0:
                log.warning("source %d (%s) yielded no samples on this worker; dropping it", src.index, src.task)
                return
            pass_idx += 1

    def _cached_samples(self, src: _SourceSpec) -> Iterator[dict[str, Any]]:
        """Samples of a feature cache: same shard split, passes and sample striding as
        :meth:`_samples` (so resume and multi-worker splits behave alike), but each sample is
        a slice of a memory-mapped safetensors shard, not a pickle to unpickle."""
        rank, _, worker, _ = self._info()
        where = f" in cached source {src.index} ({src.task})"
        pass_idx = 0
        while True:
            if self.resampled:
                rng = random.Random(f"resample-{self.seed}-{src.index}-{self.epoch}-{rank}-{worker}")
                urls: Iterator[str] | list[str] = (rng.choice(src.urls) for _ in iter(int, 1))
                stride, offset = 1, 0
            else:
                urls, stride, offset = self._urls_once(src, pass_idx)
            i, n_yielded = -1, 0
            for url in urls:
                try:
                    shard = _open_cached_shard(url, self.image_size, self.cache_in_memory)
                except Exception as e:  # a corrupt shard file must not end a long run
                    self.skipped(e, f"{where} shard {url!r}")
                    continue
                for row in range(len(shard)):
                    i += 1
                    if stride > 1 and i % stride != offset:
                        continue
                    if shard.task(row) != src.task:  # a cache of mixed tasks serves each task's source
                        continue
                    try:
                        item = shard.item(row)
                    except Exception as e:
                        self.skipped(e, f"{where} key {shard.key(row)!r}")
                        continue
                    n_yielded += 1
                    yield item
            if self.epoch_length is None or self.resampled:
                return
            if n_yielded == 0:
                log.warning("source %d (%s) yielded no samples on this worker; dropping it", src.index, src.task)
                return
            pass_idx += 1

    def _shuffled(self, it: Iterator[dict[str, Any]], src: _SourceSpec) -> Iterator[dict[str, Any]]:
        if not self.train or self.shuffle_buffer <= 1:
            yield from it
            return
        rank, _, worker, _ = self._info()
        rng = random.Random(f"shuffle-{self.seed}-{src.index}-{self.epoch}-{rank}-{worker}")
        buf: list[dict[str, Any]] = []
        # start yielding once the buffer is a tenth full, so the first batch comes quickly;
        # below full size take two items per item given out, so the buffer keeps growing
        initial = max(1, min(self.shuffle_buffer, max(self.batch_size, self.shuffle_buffer // 10)))
        it = iter(it)
        for item in it:
            buf.append(item)
            if len(buf) < self.shuffle_buffer:
                extra = next(it, None)
                if extra is not None:
                    buf.append(extra)
            if len(buf) >= initial:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _batches(self, src: _SourceSpec) -> Iterator[dict[str, Any]]:
        """Batches of the shuffled stream, read a window at a time: one batch, or with
        ``group_by_length`` (training) that many batches, sorted by :func:`_length_key` and
        cut into batches handed out in a random order (HF Trainer's ``group_by_length``). A
        batch then pads its prompts to about its own length instead of the window's longest:
        every part of the step that runs on the padded tokens (VLM, refiner, the DiT's prefix)
        does less work. Deterministic given (seed, epoch), like the shuffle, so resume is exact.
        """
        group = self.group_by_length if self.train and self.group_by_length > 1 else 1
        rng = None
        if group > 1:
            rank, _, worker, _ = self._info()
            rng = random.Random(f"length-groups-{self.seed}-{src.index}-{self.epoch}-{rank}-{worker}")

        def cut(window: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            if self.train:
                # training keeps a constant batch shape: the epoch's ragged tail is dropped, and
                # before sorting, so the dropped samples are random ones (the shuffle's), not the longest
                window = window[: len(window) // self.batch_size * self.batch_size]
            if rng is not None:
                window.sort(key=_length_key)
            batches = [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
            if rng is not None:
                rng.shuffle(batches)
            for b in batches:
                yield _collate(src.task, src.cached, b)

        items: list[dict[str, Any]] = []
        for item in self._shuffled(self._samples(src), src):
            items.append(item)
            if len(items) == group * self.batch_size:
                yield from cut(items)
                items = []
        yield from cut(items)

    # -- the mix ---------------------------------------------------------------------
    def _limit(self) -> int | None:
        if self.epoch_length is None:
            return None
        _, _, worker, nworkers = self._info()
        return self.epoch_length // nworkers + (1 if worker < self.epoch_length % nworkers else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        _, _, worker, _ = self._info()
        streams = [self._batches(s) for s in self.sources]
        limit = self._limit()
        if not self.train:
            # evaluation: every source in order, deterministic and complete
            n = 0
            for stream in streams:
                for b in stream:
                    if limit is not None and n >= limit:
                        return
                    n += 1
                    yield b
            return
        # the same task sequence on every rank (same seed, no rank in it) keeps ranks in step
        rng = random.Random(f"mix-{self.seed}-{self.epoch}-{worker}")
        active = list(range(len(streams)))
        n = 0
        while active and (limit is None or n < limit):
            i = rng.choices(active, weights=[self.sources[j].weight for j in active])[0]
            try:
                batch = next(streams[i])
            except StopIteration:
                active.remove(i)
                continue
            n += 1
            yield batch


class _SizedMixedBatches(_MixedBatches):
    def __len__(self) -> int:
        assert self.epoch_length is not None
        return self.epoch_length


class _MixLoader(DataLoader):
    """DataLoader that records the task of every batch it hands out, in the main process."""

    def __init__(
        self,
        dataset: _MixedBatches,
        *args: Any,
        mix: Counter | None = None,
        name: str = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.mix = mix if mix is not None else Counter()
        self.name = name
        self.epoch = 0
        #: batches of the next epoch that a resumed run already trained on
        self.skip_batches = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        # before the (persistent) workers restart their streams: they read the epoch from shared memory
        self.dataset.set_epoch(self.epoch)  # type: ignore[attr-defined]
        self.epoch += 1
        length = len(self.dataset) if isinstance(self.dataset, _SizedMixedBatches) else None
        skip, self.skip_batches = self.skip_batches, 0
        if length is not None:
            length -= skip
        logged, n = False, 0
        try:
            batches = super().__iter__()
            # fast-forward a resumed epoch: the stream is deterministic given (seed, epoch),
            # so dropping the batches already trained on continues exactly where it stopped
            for _ in range(skip):
                if next(batches, None) is None:
                    break
            for batch in batches:
                self.mix[batch["task"]] += 1
                n += 1
                if n == length:
                    # Lightning stops asking after len(loader) batches, so the loop below
                    # would never finish: report the epoch now
                    self._log_summary()
                    logged = True
                yield batch
        finally:
            if not logged and n:
                self._log_summary()

    def _log_summary(self) -> None:
        total = sum(self.mix.values())
        mix = ", ".join(f"{t} {k} ({k / total:.1%})" for t, k in sorted(self.mix.items()))
        skipped = self.dataset.skipped.value  # type: ignore[attr-defined]
        log.info("%s data: realised task mix so far: %s", self.name, mix or "no batches")
        if skipped:
            log.warning("%s data: %d corrupt/unreadable samples skipped so far", self.name, skipped)


# ---------------------------------------------------------------------------------------


def _no_val_loader() -> list:
    return []


# module level (not a closure) so a data module without val sources still pickles
_no_val_loader.__wrapped__ = pl.LightningDataModule.val_dataloader  # type: ignore[attr-defined]


def _as_sources(sources: Sequence[DataSource | dict[str, Any]] | None, what: str) -> list[DataSource]:
    out = []
    for s in sources or []:
        if isinstance(s, DataSource):
            out.append(s)
        elif isinstance(s, dict):
            out.append(DataSource(**s))
        else:
            raise TypeError(f"{what} entries must be DataSource or dict, got {type(s).__name__}")
    return out


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[{") or "::" in path


class UniFusionDataModule(pl.LightningDataModule):
    """Weighted multi-task data from webdataset shards.

    Args:
        sources: training streams; each batch comes from one source (so one task).
        image_size: side of the target image (shorter side resized, centre crop).
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes (persistent: started once per loader, not per epoch).
        shuffle_buffer: per-source sample shuffle buffer (training only).
        epoch_length: batches per epoch per rank; streams repeat (or are resampled)
            to fill it. ``None``: one pass over every source.
        resampled: draw shards with replacement (infinite; needs ``epoch_length``) instead
            of splitting them across ranks and workers.
        seed: seeds shard order, shuffle buffers and the task mix.
        generate_shapes: write shapes-world shards in ``prepare_data`` into source paths
            that have none (the quickstart path).
        val_sources: validation streams (no shuffling, every sample once); none = no val loader.
        reference_size: side of reference images (``images``); ``None`` = ``image_size``,
            ``0`` = keep each image's stored size (e.g. for an encoder that tiles them itself).
        pin_memory: DataLoader ``pin_memory``.
        cache_in_memory: cached sources (``cached: true``) are read whole into memory, with
            their target images decoded, once per process, instead of memory-mapped and decoded
            per sample. Fastest when the cache fits in RAM (each DataLoader worker holds its
            own copy, read once: the workers persist across epochs).
        group_by_length: training batches of similar prompt length: each window of this
            many batches (after the shuffle buffer) is sorted by length and cut into batches,
            handed out in random order, so a batch pads its tokens to about its own length
            (the quickstart: 16, a 1.04x faster step). 0 or 1: off (a batch is any
            ``batch_size`` consecutive samples of the shuffled stream).
    """

    def __init__(
        self,
        sources: list[DataSource],
        image_size: int = 16,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        epoch_length: int | None = None,
        resampled: bool = False,
        seed: int = 0,
        generate_shapes: ShapesConfig | None = None,
        val_sources: list[DataSource] | None = None,
        reference_size: int | None = None,
        pin_memory: bool = False,
        cache_in_memory: bool = False,
        group_by_length: int = 0,
    ) -> None:
        super().__init__()
        self.cache_in_memory = cache_in_memory
        self.group_by_length = group_by_length
        self.sources = _as_sources(sources, "sources")
        if not self.sources:
            raise ValueError("UniFusionDataModule needs at least one entry in `sources` (path + task)")
        self.val_sources = _as_sources(val_sources, "val_sources")
        if isinstance(generate_shapes, dict):
            generate_shapes = ShapesConfig(**generate_shapes)
        self.generate_shapes = generate_shapes
        for name, v in (("image_size", image_size), ("batch_size", batch_size)):
            if v < 1:
                raise ValueError(f"UniFusionDataModule.{name} must be >= 1, got {v}")
        if resampled and epoch_length is None:
            raise ValueError("resampled=True gives an endless stream: set epoch_length (batches per epoch)")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if group_by_length < 0:
            raise ValueError(
                f"group_by_length must be >= 0 (batches per length-sorted window; 0 = off), got {group_by_length}"
            )
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.shuffle_buffer, self.epoch_length, self.resampled = shuffle_buffer, epoch_length, resampled
        self.seed, self.reference_size, self.pin_memory = seed, reference_size, pin_memory
        self._skipped = _SkipCounter()
        self.realised_mix: Counter = Counter()
        self.val_mix: Counter = Counter()
        self._train_epoch = 0
        self._resume_batches = 0
        self._train_loader: _MixLoader | None = None
        self._resolved: dict[str, list[_SourceSpec]] = {}
        if not self.val_sources:
            # Lightning runs validation whenever val_dataloader is overridden. Without val
            # sources we mark the hook as the base one (``__wrapped__`` is what Lightning's
            # override check follows), so the trainer skips validation without an
            # empty-loader warning, while a direct call still returns an empty list.
            self.val_dataloader = _no_val_loader  # type: ignore[method-assign]

    # -- public helpers --------------------------------------------------------------
    default_mix = staticmethod(default_mix)

    @property
    def skipped(self) -> int:
        """Samples skipped as corrupt/unreadable so far (all workers)."""
        return self._skipped.value

    def realised_fractions(self) -> dict[str, float]:
        """Fraction of training batches per task handed out so far."""
        total = sum(self.realised_mix.values())
        return {t: self.realised_mix[t] / total for t in sorted(self.realised_mix)} if total else {}

    def cache_metadata(self) -> dict[str, Any] | None:
        """``cache_meta.json`` of the cached sources (None if no source is cached or none has one).

        Raises ``ValueError`` if cached sources disagree, since one model can't match both.
        """
        found: list[tuple[str, dict[str, Any]]] = []
        for src in self.sources + self.val_sources:
            if not src.cached:
                continue
            p = os.path.expanduser(src.path)
            if not os.path.isdir(p):
                try:
                    p = os.path.dirname(shards_mod.shard_urls(p)[0])
                except FileNotFoundError:
                    continue
            meta_path = os.path.join(p, CACHE_META)
            if os.path.isfile(meta_path):
                with open(meta_path) as f:
                    found.append((meta_path, json.load(f)))
        if not found:
            return None
        first_path, first = found[0]
        for other_path, other in found[1:]:
            if other != first:
                raise ValueError(f"feature caches disagree: {first_path} vs {other_path}; use caches from one encoder")
        return first

    # -- Lightning hooks -------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.generate_shapes is None:
            return
        g = self.generate_shapes
        done: set[str] = set()
        for sources, seed, num in ((self.sources, g.seed, g.num), (self.val_sources, g.seed + 1, g.val_num)):
            for src in sources:
                path = os.path.expanduser(src.path)
                if src.cached or path in done or _has_magic(path) or num <= 0:
                    continue
                done.add(path)
                if os.path.isdir(path) and any(f.endswith(shards_mod.SHARD_SUFFIXES) for f in os.listdir(path)):
                    self._check_existing(path, seed, num, g)
                    continue
                self._generate(path, seed, num, g)

    def _check_existing(self, path: str, seed: int, num: int, g: ShapesConfig) -> None:
        """Existing shards are reused as they are; say so when they differ from the request."""
        manifest = shards_mod.read_manifest(path) or {}
        if manifest.get("generator") != "shapes":
            return
        want = {
            "seed": seed,
            "num": num,
            "size": g.size or self.image_size,
            "edit_fraction": g.edit_fraction,
            "recon_fraction": g.recon_fraction,
            # shards written before the held-out compositions existed contain them
            "held_out": shards_mod.shapes.HELD_OUT.names(),
        }
        diff = {k: (manifest.get(k), v) for k, v in want.items() if manifest.get(k) != v}
        if diff:
            details = ", ".join(f"{k} {have} (asked {asked})" for k, (have, asked) in diff.items())
            log.warning(
                "reusing shapes shards at %s written with %s; delete the directory to regenerate", path, details
            )

    def _generate(self, path: str, seed: int, num: int, g: ShapesConfig) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        # write next to the target and move into place: an interrupted run leaves no half set
        tmp = tempfile.mkdtemp(prefix=".shapes-tmp-", dir=parent)
        try:
            manifest = shards_mod.write_shapes_shards(
                tmp,
                num=num,
                seed=seed,
                size=g.size or self.image_size,
                edit_fraction=g.edit_fraction,
                recon_fraction=g.recon_fraction,
                shard_size=g.shard_size,
                min_objects=g.min_objects,
                max_objects=g.max_objects,
                workers=g.workers,
            )
            os.makedirs(path, exist_ok=True)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("wrote %d shapes samples %s to %s", num, manifest["counts"], path)

    def _resolve(self, sources: list[DataSource]) -> list[_SourceSpec]:
        from ..encoders.cache import cache_shard_paths

        return [
            _SourceSpec(
                i,
                s.task,
                s.weight,
                s.cached,
                # a cache is checked here (format version, completeness), before training starts
                cache_shard_paths(os.path.expanduser(s.path))
                if s.cached
                else shards_mod.task_shard_urls(s.path, s.task),
            )
            for i, s in enumerate(sources)
        ]

    def setup(self, stage: str | None = None) -> None:
        # resolve eagerly so a wrong path fails before training starts, naming the path
        self._resolved["train"] = self._resolve(self.sources)
        self._resolved["val"] = self._resolve(self.val_sources)

    def _dataset(self, split: str) -> _MixedBatches:
        if split not in self._resolved:
            self.setup()
        train = split == "train"
        rank, world = self._rank_and_world()
        if train and world > 1 and self.epoch_length is None:
            # finite streams split over ranks give each rank a different number of batches,
            # and DDP waits forever for the rank that stopped first
            log.warning(
                "training on %d ranks without epoch_length: ranks may see different numbers of batches "
                "and hang at the end of the epoch; set data.epoch_length (batches per epoch per rank)",
                world,
            )
        cls = _SizedMixedBatches if (train and self.epoch_length is not None) else _MixedBatches
        return cls(
            self._resolved[split],
            batch_size=self.batch_size,
            image_size=self.image_size,
            reference_size=self.image_size if self.reference_size is None else (self.reference_size or None),
            shuffle_buffer=self.shuffle_buffer,
            epoch_length=self.epoch_length if train else None,
            resampled=self.resampled if train else False,
            seed=self.seed,
            train=train,
            skipped=self._skipped,
            rank=rank,
            world_size=world,
            cache_in_memory=self.cache_in_memory,
            group_by_length=self.group_by_length,
        )

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return 0, 1

    def _loader(self, dataset: _MixedBatches, mix: Counter, name: str) -> _MixLoader:
        return _MixLoader(
            dataset,
            batch_size=None,  # the dataset yields whole, single-task batches
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            # started once per loader, not once per epoch: re-forking a big training process each
            # epoch costs ~1-2 s of copy-on-write page faults in the step after (and the workers'
            # in-memory cache shards would be read again)
            persistent_workers=self.num_workers > 0,
            mix=mix,
            name=name,
            # its own generator: an iterator's base seed would otherwise come from the global
            # RNG, which a resumed run restores *before* the loader is iterated
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self._dataset("train"), self.realised_mix, "train")
        loader.epoch = self._train_epoch
        loader.skip_batches, self._resume_batches = self._resume_batches, 0
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        return self._loader(self._dataset("val"), self.val_mix, "val")

    def test_dataloader(self) -> DataLoader:
        """``unifusion test`` scores the held-out split: the validation sources."""
        if not self.val_sources:
            from unifusion.errors import UserError

            raise UserError(
                "`test` evaluates the held-out split: give data.val_sources, e.g. "
                "--data.init_args.val_sources='[{path: artifacts/shapes/val, task: t2i}]'"
            )
        return self._loader(self._dataset("val"), Counter(), "test")

    def log_mix(self) -> str:
        """Log (and return) the realised task mix and skipped count as one line."""
        fr = self.realised_fractions()
        text = ", ".join(f"{t} {self.realised_mix[t]} ({fr[t]:.1%})" for t in fr) or "no batches yet"
        line = f"realised task mix: {text}; skipped samples: {self.skipped}"
        log.info(line)
        return line

    # -- checkpointing: resume keeps the epoch's data order and the counters ---------
    def state_dict(self) -> dict[str, Any]:
        """Epoch and position in it (batches trained on), so a resume continues the stream."""
        epoch, in_epoch = self._train_epoch, 0
        trainer = getattr(self, "trainer", None)
        if trainer is not None and self._train_loader is not None:
            # the trainer's counts, not the loader's: Lightning prefetches one batch ahead
            batches = trainer.fit_loop.epoch_loop.batch_progress
            if batches.is_last_batch:  # epoch finished: a resume starts the next one
                epoch = int(trainer.fit_loop.epoch_progress.current.started)
            else:
                epoch = int(trainer.current_epoch)
                in_epoch = int(batches.current.processed)
        return {
            "epoch": epoch,
            "batches_in_epoch": in_epoch,
            "realised_mix": dict(self.realised_mix),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_epoch = int(state_dict.get("epoch", 0))
        self._resume_batches = int(state_dict.get("batches_in_epoch", 0))
        self.realised_mix.clear()
        self.realised_mix.update(state_dict.get("realised_mix", {}))
        self._skipped.reset(int(state_dict.get("skipped", 0)))

    def describe(self) -> dict[str, Any]:
        """Plain-dict summary of the configuration (for logs)."""
        return {
            "sources": [asdict(s) for s in self.sources],
            "val_sources": [asdict(s) for s in self.val_sources],
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "epoch_length": self.epoch_length,
            "resampled": self.resampled,
            "seed": self.seed,
            "group_by_length": self.group_by_length,
        }
