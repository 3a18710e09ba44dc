"""UniFusionDataModule: batch contract, task mix, corrupt samples, workers, caches, YAML."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from unifusion.data.datamodule import DEFAULT_MIX, DataSource, ShapesConfig, UniFusionDataModule, default_mix
from unifusion.data.shapes import Scene, render
from unifusion.data.shards import png_bytes, read_samples, write_shapes_shards
from unifusion.features import EncoderFeatures


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix")
    write_shapes_shards(out, num=400, seed=0, edit_fraction=0.2, recon_fraction=0.1, shard_size=60)
    return str(out)


def _dm(sources, **kw) -> UniFusionDataModule:
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle_buffer", 50)
    dm = UniFusionDataModule(sources=sources, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _first(dm: UniFusionDataModule, task: str) -> dict:
    return next(b for b in dm.train_dataloader() if b["task"] == task)


def test_batches_follow_the_contract_per_task(shapes_dir):
    dm = _dm(default_mix(shapes_dir), epoch_length=60)
    meta = {s["__key__"]: json.loads(s["json"]) for s in read_samples(shapes_dir)}
    for task in ("t2i", "recon", "edit"):
        b = _first(dm, task)
        assert set(b) == {"task", "prompt", "images", "target", "key"}
        assert b["target"].shape == (4, 3, 16, 16) and b["target"].dtype == torch.float32
        assert b["target"].min() >= -1 and b["target"].max() <= 1
        assert len(b["prompt"]) == len(b["images"]) == len(b["key"]) == 4
        for key, prompt, refs, tgt in zip(b["key"], b["prompt"], b["images"], b["target"]):
            m = meta[key]
            if task == "t2i":
                assert refs == [] and prompt == m["caption"]
                expect = render(Scene.from_dict(m["scene"]), 16)
            elif task == "recon":
                assert prompt == "" and len(refs) == 1
                assert torch.allclose(refs[0], (tgt + 1) / 2, atol=1e-6)
                expect = render(Scene.from_dict(m["scene"]), 16)
            else:
                assert m["task"] == "edit" and prompt == m["instruction"] and len(refs) == 1
                src = render(Scene.from_dict(m["source_scene"]), 16)
                assert np.array_equal((refs[0] * 255).round().byte().permute(1, 2, 0).numpy(), src)
                expect = render(Scene.from_dict(m["target_scene"]), 16)
            got = ((tgt + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
            assert np.array_equal(got, expect)


def test_realised_mix_matches_85_5_10_and_batches_never_mix_tasks(shapes_dir):
    assert DEFAULT_MIX == {"t2i": 0.85, "recon": 0.05, "edit": 0.10}
    dm = _dm(UniFusionDataModule.default_mix(shapes_dir), batch_size=1, epoch_length=1500, shuffle_buffer=20)
    task_of = {s["__key__"]: json.loads(s["json"])["task"] for s in read_samples(shapes_dir)}
    loader = dm.train_dataloader()
    assert len(loader) == 1500
    n = 0
    for b in loader:
        n += 1
        # recon reads the recon shards; t2i and edit read their own
        assert {task_of[k] for k in b["key"]} == {b["task"]}
    assert n == 1500 and sum(dm.realised_mix.values()) == 1500
    for task, want in DEFAULT_MIX.items():
        assert dm.realised_fractions()[task] == pytest.approx(want, abs=0.03)
    assert "realised task mix" in dm.log_mix()


def test_same_seed_same_stream_and_epochs_reshuffle(shapes_dir):
    def keys(seed, epochs=1):
        dm = _dm([DataSource(shapes_dir, "t2i")], seed=seed)
        loader = dm.train_dataloader()
        return [[k for b in loader for k in b["key"]] for _ in range(epochs)]

    e0, e1 = keys(0, epochs=2)
    assert keys(0) == [e0]
    assert keys(1) != [e0]
    assert e0 != e1 and sorted(e0) == sorted(e1)
    # a finite training pass drops only the ragged last batch
    assert len(e0) == 280 // 4 * 4 and len(set(e0)) == len(e0)


def _write_tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def _good(i: int, color: str = "red") -> dict:
    from unifusion.data.shapes import ShapeObject

    img = render(Scene([ShapeObject("circle", color, 0.35, 0.5, 0.5)]), 16)
    return {"__key__": f"s{i:04d}", "png": png_bytes(img), "txt": f"a {color} circle"}


def test_corrupt_samples_are_skipped_counted_and_warned(tmp_path, caplog):
    d = tmp_path / "bad"
    d.mkdir()
    samples = [_good(i) for i in range(10)]
    truncated = png_bytes(np.zeros((16, 16, 3), np.uint8))[:30]
    samples.insert(3, {"__key__": "bad0001", "png": b"not an image at all", "txt": "x"})
    samples.insert(7, {"__key__": "bad0002", "png": truncated, "txt": "x"})
    samples.insert(9, {"__key__": "bad0003", "txt": "a caption without an image"})
    _write_tar(d / "data-000000.tar", samples)
    dm = _dm([DataSource(str(d), "t2i")], batch_size=5, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="unifusion.data.datamodule"):
        batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"s{i:04d}" for i in range(10)]
    assert dm.skipped == 3
    assert any("bad0002" in r.getMessage() and "skipped so far" in r.getMessage() for r in caplog.records)
    assert any("3 corrupt/unreadable samples skipped" in r.getMessage() for r in caplog.records)


def test_workers_partition_the_data_and_share_the_skip_count(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    for s in range(3):
        _write_tar(d / f"p-{s:06d}.tar", [_good(s * 100 + i) for i in range(8)])
    _write_tar(d / "p-000003.tar", [_good(300), {"__key__": "bad", "png": b"junk", "txt": "x"}])
    dm = _dm([DataSource(str(d), "t2i")], batch_size=3, num_workers=2, val_sources=[DataSource(str(d), "t2i")])
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert len(keys) == 25 and len(set(keys)) == 25
    assert dm.skipped == 1, "workers report skips to the main process"
    # one shard, two workers: a sample-level split still reads each sample once
    one = tmp_path / "one"
    one.mkdir()
    _write_tar(one / "a-000000.tar", [_good(i) for i in range(10)])
    dm1 = _dm([DataSource(str(one), "t2i")], batch_size=2, num_workers=2, val_sources=[DataSource(str(one), "t2i")])
    keys1 = [k for b in dm1.val_dataloader() for k in b["key"]]
    assert sorted(keys1) == [f"s{i:04d}" for i in range(10)]


def test_one_worker_streams_the_same_training_batches_as_none(shapes_dir):
    """The quickstart trains with ``num_workers: 1``: the worker must not change the data order
    (same batches, tasks and images as ``num_workers: 0``), so runs and resumes stay comparable."""
    sources = [DataSource(shapes_dir, "t2i"), DataSource(shapes_dir, "edit", 0.5)]

    def stream(workers: int) -> list[tuple]:
        dm = _dm(sources, num_workers=workers)
        return [(b["task"], tuple(b["key"]), float(b["target"].sum())) for b in dm.train_dataloader()]

    inline, worker = stream(0), stream(1)
    assert len(inline) > 10 and {t for t, *_ in inline} == {"t2i", "edit"}
    assert worker == inline


def test_workers_persist_across_epochs_and_each_epoch_streams_as_without_workers(shapes_dir):
    """Workers start once per loader (re-forking the training process each epoch costs a
    copy-on-write stall); each epoch still reshuffles, in the same order as ``num_workers: 0``."""
    sources = [DataSource(shapes_dir, "t2i")]

    def epochs(workers: int) -> tuple[list[list[tuple]], list[set[int]]]:
        loader = _dm(sources, num_workers=workers).train_dataloader()
        streams, pids = [], []
        for _ in range(3):
            streams.append([tuple(b["key"]) for b in loader])
            workers_now = getattr(getattr(loader, "_iterator", None), "_workers", [])
            pids.append({w.pid for w in workers_now})
        return streams, pids

    inline, _ = epochs(0)
    streams, pids = epochs(1)
    assert streams == inline
    assert len({tuple(e) for e in inline}) == 3  # every epoch its own order
    assert len(pids[0]) == 1 and pids[0] == pids[1] == pids[2]


def test_shared_int_reaches_a_spawned_process_and_copies_elsewhere():
    """Spawned (or forkserver) workers get the shared value itself (pickled while spawning); any
    other copy is a fresh value. Forked workers inherit it (the persistent-workers test)."""
    import copy
    import subprocess
    import sys
    import textwrap

    from unifusion.data.datamodule import _SharedInt, _SkipCounter

    spawn = textwrap.dedent(
        """
        import multiprocessing as mp
        mp.set_start_method("spawn")
        from unifusion.data.datamodule import _SharedInt
        n = _SharedInt(5)
        child = mp.Process(target=n.add, args=(2,))
        child.start()
        child.join()
        print(child.exitcode, n.get())
        """
    )
    run = subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "7"]  # the child added to the parent's value
    n = _SharedInt(5)
    twin = copy.deepcopy(n)  # not a spawn: a fresh value, not the shared one
    twin.set(9)
    assert (n.get(), twin.get(), n.add(2)) == (5, 9, 7)
    counter = _SkipCounter()
    counter(ValueError("bad"), " in a test")
    assert counter.value == 1 and copy.deepcopy(counter).value == 1


def test_prepare_data_generates_shapes_once(tmp_path, caplog):
    train, val = tmp_path / "gen" / "train", tmp_path / "gen" / "val"
    cfg = ShapesConfig(num=40, seed=3, val_num=14, edit_fraction=0.25, shard_size=100)
    dm = _dm(
        [DataSource(str(train), "t2i"), DataSource(str(train), "edit", 0.5)],
        generate_shapes=cfg,
        val_sources=[DataSource(str(val), "t2i")],
        image_size=24,
    )
    m = json.loads((train / "manifest.json").read_text())
    assert m["counts"] == {"t2i": 30, "recon": 0, "edit": 10} and m["seed"] == 3 and m["size"] == 24
    val_manifest = json.loads((val / "manifest.json").read_text())
    assert val_manifest["seed"] == 4 and val_manifest["counts"] == {"t2i": 10, "recon": 0, "edit": 4}
    assert not [p for p in os.listdir(tmp_path / "gen") if p.startswith(".")], "temporary dir cleaned up"
    stamp = os.stat(train / "t2i-000000.tar").st_mtime_ns
    dm.prepare_data()
    assert os.stat(train / "t2i-000000.tar").st_mtime_ns == stamp
    other = UniFusionDataModule([DataSource(str(train))], generate_shapes=ShapesConfig(num=40, seed=9), image_size=24)
    with caplog.at_level(logging.WARNING, logger="unifusion.data.datamodule"):
        other.prepare_data()
    assert os.stat(train / "t2i-000000.tar").st_mtime_ns == stamp
    assert any(
        "reusing shapes shards" in r.getMessage() and "seed 3 (asked 9)" in r.getMessage() for r in caplog.records
    )
    val_batches = list(dm.val_dataloader())
    assert [len(b["key"]) for b in val_batches] == [4, 4, 2], "validation keeps the ragged last batch"
    assert val_batches[0]["target"].shape[-1] == 24
    assert {b["task"] for b in dm.train_dataloader()} == {"t2i", "edit"}


def test_constructor_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        DataSource("x", task="video")
    with pytest.raises(ValueError, match="weight"):
        DataSource("x", weight=0)
    with pytest.raises(ValueError, match="epoch_length"):
        UniFusionDataModule(sources=[DataSource("x")], resampled=True)
    with pytest.raises(ValueError, match="at least one"):
        UniFusionDataModule(sources=[])
    dm = UniFusionDataModule(sources=[{"path": str(tmp_path / "missing"), "task": "t2i"}])
    with pytest.raises(FileNotFoundError, match="missing"):
        dm.setup("fit")


def test_resampled_stream_fills_the_epoch(shapes_dir):
    dm = _dm([DataSource(shapes_dir, "edit")], resampled=True, epoch_length=30, batch_size=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 30 and all(b["task"] == "edit" for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) < len(keys), "80 edit samples drawn 120 times: with replacement"


def _cached_dir(tmp_path, lengths, rewrites):
    """A feature cache (format 2: safetensors shard + cache_meta.json) with random features."""
    from unifusion.encoders.cache import FORMAT, FORMAT_VERSION, CacheShardWriter

    d = tmp_path / "cache"
    d.mkdir()
    w = CacheShardWriter(str(d / "cache-000000.safetensors"), torch.float16, [0, 2, 4])
    for i, (s, rw) in enumerate(zip(lengths, rewrites)):
        info = {"key": f"s{i:04d}", "task": "t2i", "txt": "a red circle"}
        if rw is not None:
            info["rewrite"] = rw
        w.add(torch.randn(s, 3, 8).half(), torch.full((s,), 2, dtype=torch.int8), _good(i)["png"], info)
    w.close()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": "tiny",
        "layer_ids": [0, 2, 4],
        "hidden_size": 8,
        "roles": ["user_text"],
        "shards": ["cache-000000.safetensors"],
    }
    (d / "cache_meta.json").write_text(json.dumps(meta))
    return d, meta


def test_cached_sources_give_encoder_features(tmp_path):
    d, meta = _cached_dir(tmp_path, [5, 3, 7], ["rewrite zero", None, "rewrite two"])
    dm = _dm([DataSource(str(d), "t2i", cached=True)], batch_size=3, shuffle_buffer=1)
    (b,) = list(dm.train_dataloader())
    assert dm.skipped == 0
    assert set(b) == {"task", "target", "key", "features"}
    f = b["features"]
    assert isinstance(f, EncoderFeatures)
    assert f.hidden.shape == (3, 7, 3, 8) and f.hidden.dtype == torch.float16
    assert f.layer_ids == (0, 2, 4)
    assert f.mask.sum(1).tolist() == [5, 3, 7]
    assert f.texts == ["rewrite zero", "", "rewrite two"]
    assert dm.cache_metadata() == meta
    assert UniFusionDataModule(sources=[DataSource(str(d), "t2i")]).cache_metadata() is None


def test_no_val_sources_means_no_validation_and_yaml_builds_it(shapes_dir, tmp_path, caplog):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(UniFusionDataModule, "data")
    cfg = {
        "data": {
            "sources": [{"path": shapes_dir, "task": "t2i", "weight": 0.9}, {"path": shapes_dir, "task": "edit"}],
            "batch_size": 2,
            "epoch_length": 3,
            "generate_shapes": {"num": 10},
        }
    }
    ns = parser.parse_string(yaml.safe_dump(cfg))
    dm = parser.instantiate(ns).data
    assert isinstance(dm, UniFusionDataModule)
    assert dm.sources[1] == DataSource(shapes_dir, "edit", 1.0, False)
    assert dm.generate_shapes == ShapesConfig(num=10)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    from lightning.pytorch.utilities.model_helpers import is_overridden

    # Lightning must see no val hook (so it skips validation), unless val sources exist
    assert not is_overridden("val_dataloader", dm)
    assert is_overridden("val_dataloader", UniFusionDataModule([DataSource("x")], val_sources=[DataSource("y")]))

    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.tasks = []

        def training_step(self, batch, _):
            self.tasks.append(batch["task"])
            return (batch["target"].mean() - self.w).pow(2)

        def validation_step(self, batch, _):  # pragma: no cover - must not run
            raise AssertionError("no validation without val_sources")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with caplog.at_level(logging.INFO, logger="unifusion.data.datamodule"):
        trainer.fit(model, datamodule=dm)
    assert len(model.tasks) == 6 and sum(dm.realised_mix.values()) == 6
    # the mix is reported once per epoch even though Lightning stops after len(loader) batches
    mix_lines = [r.getMessage() for r in caplog.records if "train data: realised task mix" in r.getMessage()]
    assert len(mix_lines) == 2 and "t2i" in mix_lines[-1]
    state = dm.state_dict()
    assert state["epoch"] == 2
    fresh = UniFusionDataModule(sources=[DataSource(shapes_dir)])
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_ranks_get_disjoint_shards_and_the_same_task_sequence(shapes_dir, monkeypatch):
    def run(rank: int):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = _dm(default_mix(shapes_dir), epoch_length=40, val_sources=[DataSource(shapes_dir, "t2i")])
        tasks = [b["task"] for b in dm.train_dataloader()]
        val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
        return tasks, val_keys

    (tasks0, val0), (tasks1, val1) = run(0), run(1)
    assert tasks0 == tasks1, "every rank trains on the same task at the same step"
    assert not set(val0) & set(val1)
    assert len(val0) + len(val1) == 280


def test_shuffle_buffer_mixes_far_apart_samples(tmp_path):
    d = tmp_path / "ordered"
    d.mkdir()
    _write_tar(d / "o-000000.tar", [_good(i) for i in range(200)])
    dm = _dm([DataSource(str(d), "t2i")], batch_size=10, shuffle_buffer=100)
    order = [int(k[1:]) for b in dm.train_dataloader() for k in b["key"]]
    assert sorted(order) == list(range(200))
    # the buffer keeps growing to its full size: the 45 first drawn reach past index 75,
    # while a 20-sample buffer can only have read 20 + 45 samples by then
    assert max(order[:45]) > 75
    small = _dm([DataSource(str(d), "t2i")], batch_size=10, shuffle_buffer=20)
    assert max(int(k[1:]) for b in list(small.train_dataloader())[:5] for k in b["key"]) < 66
    dm_off = _dm([DataSource(str(d), "t2i")], batch_size=10, shuffle_buffer=0)
    assert [int(k[1:]) for b in dm_off.train_dataloader() for k in b["key"]] == list(range(200))


def test_datamodule_pickles_and_deepcopies(shapes_dir):
    import copy
    import pickle

    dm = _dm([DataSource(shapes_dir, "t2i")], epoch_length=3)
    list(dm.train_dataloader())
    for clone in (pickle.loads(pickle.dumps(dm)), copy.deepcopy(dm)):
        assert clone.sources == dm.sources and clone.val_dataloader() == []
        assert clone.realised_mix == dm.realised_mix and clone.skipped == dm.skipped
        clone.setup("fit")
        assert len(list(clone.train_dataloader())) == 3


def test_edit_samples_with_several_reference_images(tmp_path):
    from unifusion.data.shapes import ShapeObject

    def img(color):
        return png_bytes(render(Scene([ShapeObject("square", color, 0.36, 0.5, 0.5)]), 16))

    d = tmp_path / "multi"
    d.mkdir()
    sample = {"__key__": "m0", "src.png": img("red"), "src2.png": img("blue"), "src10.png": img("cyan")}
    sample.update({"src1.png": img("green"), "tgt.png": img("yellow"), "txt": "combine them"})
    _write_tar(d / "e-000000.tar", [sample])
    dm = _dm([DataSource(str(d), "edit")], batch_size=1)
    (b,) = list(dm.train_dataloader())
    centre = [tuple((im[:, 8, 8] * 255).round().int().tolist()) for im in b["images"][0]]
    from unifusion.data.shapes import COLORS

    assert centre == [COLORS[c] for c in ("red", "green", "blue", "cyan")]
    assert b["prompt"] == ["combine them"]


# ---------------------------------------------------------------------------------- held (issue 13)
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels and holds none: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_one_epoch_skips_and_counts_exactly_the_7_corrupt_samples_of_52(tmp_path):
    """45 good samples and 7 broken in different ways, in one shard: one epoch yields the 45 and
    counts the 7 (the held behaviour of issue 13)."""
    from PIL import Image

    bomb_side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 16  # over PIL's error threshold
    broken = {
        "truncated_png": {"png": png_bytes(np.zeros((16, 16, 3), np.uint8))[:40], "txt": "x"},
        "not_an_image": {"png": b"<html>404 not found</html>", "txt": "x"},
        "zero_bytes": {"png": b"", "txt": "x"},
        "no_caption": {"png": _good(0)["png"]},
        "caption_not_utf8": {"png": _good(0)["png"], "txt": b"caf\xe9 cr\xe8me \xff"},
        "decompression_bomb": {"png": _png_header_only(bomb_side, bomb_side), "txt": "x"},
        "no_image": {"txt": "a caption without its image"},
    }
    samples = [_good(i) for i in range(45)]
    for j, (name, fields) in enumerate(broken.items()):
        samples.insert(3 + 6 * j, {"__key__": f"bad_{name}", **fields})
    assert len(samples) == 52
    d = tmp_path / "corrupt"
    d.mkdir()
    _write_tar(d / "data-000000.tar", samples)
    dm = _dm([DataSource(str(d), "t2i")], batch_size=5, shuffle_buffer=16)
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert sorted(keys) == [f"s{i:04d}" for i in range(45)]  # every good sample once, no broken one
    assert dm.skipped == 7
    assert dm.state_dict()["skipped"] == 7


class _Evil:
    """Unpickling this would run code (here: create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_feature_cache_with_a_pickle_is_refused_not_unpickled(tmp_path):
    """A version-1 style cache (a ``feat.pth`` pickle per sample) is refused before any sample is
    read, so a crafted pickle in it never runs."""
    from unifusion.encoders.cache import FeatureCacheError

    marker = tmp_path / "pwned"
    d = tmp_path / "old_cache"
    d.mkdir()
    evil = tmp_path / "evil.pth"
    torch.save({"hidden": _Evil(str(marker))}, evil)
    _write_tar(d / "cache-000000.tar", [{"__key__": "s0000", "feat.pth": evil.read_bytes(), "png": _good(0)["png"]}])
    (d / "cache_meta.json").write_text(json.dumps({"format_version": 1, "layer_ids": [0], "encoder": "tiny"}))
    dm = UniFusionDataModule(sources=[DataSource(str(d), "t2i", cached=True)], batch_size=1)
    with pytest.raises(FeatureCacheError, match="format version 1"):
        dm.setup("fit")
        list(dm.train_dataloader())
    assert not marker.exists()


# ---------------------------------------------------------------------------------- group_by_length
def _captioned(i: int, words: int) -> dict:
    s = _good(i)
    s["txt"] = "a red circle" + " and more" * words
    return s


@pytest.fixture
def varied_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "varied"
    d.mkdir()
    _write_tar(d / "v-000000.tar", [_captioned(i, int(rng.integers(0, 12))) for i in range(205)])
    return d


def _spread(dm) -> tuple[list[str], float]:
    batches = list(dm.train_dataloader())
    assert all(len(b["key"]) == 10 for b in batches)
    spread = [max(map(len, b["prompt"])) - min(map(len, b["prompt"])) for b in batches]
    return [k for b in batches for k in b["key"]], float(np.mean(spread))


def test_group_by_length_batches_similar_prompts_and_keeps_the_epoch(varied_dir):
    plain_keys, plain_spread = _spread(_dm([DataSource(str(varied_dir), "t2i")], batch_size=10))
    dm = _dm([DataSource(str(varied_dir), "t2i")], batch_size=10, group_by_length=5)
    keys, spread = _spread(dm)
    # the same 20 full batches' worth of samples, each once (the ragged 5 dropped, as without)
    assert len(keys) == len(set(keys)) == len(plain_keys) == 200
    assert spread < plain_spread / 3, (spread, plain_spread)
    # deterministic given (seed, epoch), so a resumed epoch can fast-forward; the next epoch differs
    assert keys == _spread(_dm([DataSource(str(varied_dir), "t2i")], batch_size=10, group_by_length=5))[0]
    loader = dm.train_dataloader()
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]
    assert first == keys and second != first and len(set(second)) == 200


def test_group_by_length_resume_continues_the_epoch_exactly(varied_dir):
    src = [DataSource(str(varied_dir), "t2i")]
    full = [b["key"] for b in _dm(src, batch_size=10, group_by_length=5).train_dataloader()]
    resumed = _dm(src, batch_size=10, group_by_length=5)
    resumed.load_state_dict({"epoch": 0, "batches_in_epoch": 7})
    assert [b["key"] for b in resumed.train_dataloader()] == full[7:]


def test_group_by_length_leaves_evaluation_and_the_off_setting_alone(varied_dir):
    src = [DataSource(str(varied_dir), "t2i")]
    plain = _dm(src, batch_size=10, val_sources=src)
    for g in (1, 8):
        dm = _dm(src, batch_size=10, group_by_length=g, val_sources=src)
        assert [b["key"] for b in dm.val_dataloader()] == [b["key"] for b in plain.val_dataloader()]
    one = _dm(src, batch_size=10, group_by_length=1)
    assert [b["key"] for b in one.train_dataloader()] == [b["key"] for b in plain.train_dataloader()]
    with pytest.raises(ValueError, match="group_by_length must be >= 0"):
        UniFusionDataModule(src, group_by_length=-1)


def test_length_key_counts_cached_tokens_and_live_prompt_characters():
    from unifusion.data.datamodule import _length_key

    feats = EncoderFeatures(
        hidden=torch.zeros(1, 7, 2, 4),
        mask=torch.ones(1, 7, dtype=torch.bool),
        roles=torch.zeros(1, 7, dtype=torch.int8),
        layer_ids=(0, 1),
    )
    assert _length_key({"features": feats}) == (0, 7)
    assert _length_key({"prompt": "a red circle", "images": []}) == (0, 12)
    assert _length_key({"prompt": "make it blue", "images": [torch.zeros(3, 4, 4)]}) > _length_key(
        {"prompt": "a much longer instruction than that one", "images": []}
    )


def test_group_by_length_with_two_workers_keeps_each_sample_once(varied_dir):
    src = [DataSource(str(varied_dir), "t2i")]
    dm = _dm(src, batch_size=10, group_by_length=5, num_workers=2)
    keys, spread = _spread(dm)
    assert len(keys) == len(set(keys)) == 200  # each worker drops its own ragged tail (102 -> 100, 103 -> 100)
    assert spread < _spread(_dm(src, batch_size=10, num_workers=2))[1] / 3
    assert keys == _spread(_dm(src, batch_size=10, group_by_length=5, num_workers=2))[0]
