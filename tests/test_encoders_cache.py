import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion.encoders.cache import (
    FORMAT_VERSION,
    META_FILE,
    CacheShard,
    FeatureCacheError,
    cache_shard_paths,
    check_cache_compatible,
    features_from_cache,
    iter_cache,
    read_cached_features,
    reference_images,
    write_feature_cache,
)
from unifusion.encoders.hf import HFEncoder
from unifusion.encoders.tiny import build_tiny_vlm
from unifusion.features import DEFAULT_ROLES, VERIFI_ROLES


def _png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_source(path: str) -> list[dict]:
    import webdataset as wds

    samples = []
    for i in range(3):
        samples.append({"__key__": f"t2i{i}", "png": _png(i), "txt": f"a red circle {i}", "json": {"task": "t2i"}})
    samples.append({"__key__": "rec0", "png": _png(10), "txt": "", "json": {"task": "recon"}})
    for i in range(2):
        samples.append(
            {
                "__key__": f"edit{i}",
                "src.png": _png(20 + i),
                "tgt.png": _png(30 + i),
                "txt": "make it blue",
                "json": {"task": "edit"},
            }
        )
    samples.append({"__key__": "bad0", "png": _png(40), "txt": "x", "json": {"task": "nonsense"}})
    with wds.TarWriter(path) as w:
        for s in samples:
            w.write(
                {
                    k: (
                        json.dumps(v).encode()
                        if k == "json"
                        else v.encode()
                        if isinstance(v, str) and k != "__key__"
                        else v
                    )
                    for k, v in s.items()
                }
            )
    return samples


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; one thread avoids contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model = build_tiny_vlm(str(root / "qwen"), "qwen2_vl", num_layers=3)
    src = str(root / "src-000000.tar")
    samples = _write_source(src)
    return root, model, src, samples


def _cached_by_key(out_dir: str) -> dict:
    return {shard.samples[i]["key"]: (shard, i) for shard, i in iter_cache(out_dir)}


def test_cache_round_trip_matches_live_forward(setup):
    root, model, src, samples = setup
    enc = HFEncoder(model, layers=[1, 3])
    out_dir = str(root / "feat")
    summary = write_feature_cache(enc, src, out_dir, dtype="float16", batch_size=2, shard_size=4)
    assert summary["num_samples"] == 6 and summary["skipped"] == 1 and summary["shards"] == 2
    assert summary["bytes_per_sample"] > 0
    meta = json.load(open(os.path.join(out_dir, META_FILE)))
    assert meta["layer_ids"] == [1, 3] and meta["cache_dtype"] == "float16" and meta["num_samples"] == 6
    assert meta["roles"] == ["user_text", "image_tile", "thumbnail"] and meta["format_version"] == FORMAT_VERSION
    assert meta["shards"] == ["cache-000000.safetensors", "cache-000001.safetensors"]
    check_cache_compatible(meta, enc)
    check_cache_compatible(out_dir, enc)

    # plain safetensors files (nothing pickled), readable by the safetensors library itself
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(out_dir, "cache-000000.safetensors"))
    assert set(tensors) == {"hidden", "roles", "offsets", "image", "image_offsets"}
    assert tensors["hidden"].dtype == torch.float16 and tensors["offsets"].shape == (5,)

    cached = _cached_by_key(out_dir)
    assert set(cached) == {s["__key__"] for s in samples if s["__key__"] != "bad0"}
    # the target image travels with the features: png for t2i/recon, tgt.png for edits
    shard, i = cached["edit1"]
    assert shard.image_bytes(i) == samples[5]["tgt.png"] and shard.samples[i]["task"] == "edit"
    shard, i = cached["t2i0"]
    assert shard.image_bytes(i) == samples[0]["png"] and shard.samples[i]["txt"] == "a red circle 0"

    by_task = {"t2i": [0, 1, 2], "recon": [3], "edit": [4, 5]}
    for task, idx in by_task.items():
        raw = [samples[j] for j in idx]
        prompts = [r["txt"] for r in raw]
        live = enc.encode(prompts, [reference_images(r, task) for r in raw], task=task)
        assert not (live.roles == 1).any()  # the encoder already dropped the template (SYSTEM)
        got = features_from_cache([cached[r["__key__"]][0].features(cached[r["__key__"]][1]) for r in raw])
        assert got.layer_ids == (1, 3)
        assert torch.equal(got.mask, live.mask) and torch.equal(got.roles, live.roles)
        torch.testing.assert_close(got.hidden.float(), live.hidden, rtol=2e-3, atol=2e-3)
        assert got.hidden.dtype == torch.float16 and got.hidden.shape[2:] == (2, 64)
    # recon keeps only image tokens
    shard, i = cached["rec0"]
    assert set(shard.hidden_and_roles(i)[1].tolist()) == {4}

    # reader + layer subset
    batches = list(read_cached_features(out_dir, layer_ids=[3], batch_size=4))
    assert [len(k) for k, _ in batches] == [4, 2] and batches[0][1].layer_ids == (3,)
    # memory-mapped and in-memory reads agree
    for path in cache_shard_paths(out_dir):
        a, b = CacheShard(path), CacheShard(path, in_memory=True)
        for j in range(len(a)):
            assert all(torch.equal(x, y) for x, y in zip(a.hidden_and_roles(j), b.hidden_and_roles(j)))


def test_check_cache_compatible_lists_differences(setup, tmp_path):
    root, model, src, _ = setup
    enc = HFEncoder(model, layers=[1, 3])
    meta = {**enc.cache_metadata(), "format_version": FORMAT_VERSION}
    check_cache_compatible(meta, HFEncoder(model, layers=[3]))  # subset of cached layers is fine
    with pytest.raises(ValueError) as e:
        check_cache_compatible(meta, HFEncoder(model, layers="all", max_tiles=5, system_prompt="hi"))
    msg = str(e.value)
    assert "layer_ids" in msg and "max_tiles" in msg and "system_prompt" in msg and "hidden_size" not in msg
    with pytest.raises(FileNotFoundError, match="cache_meta.json"):
        check_cache_compatible(str(root), enc)
    # other roles: refused, naming the field and how to re-create the cache
    with pytest.raises(
        FeatureCacheError, match=r"roles: cache=\['user_text', 'image_tile', 'thumbnail'\] encoder='all'"
    ):
        check_cache_compatible(meta, HFEncoder(model, layers=[1, 3], roles="all"))
    with pytest.raises(FeatureCacheError, match="unifusion cache -c CONFIG --out DIR"):
        check_cache_compatible(meta, HFEncoder(model, layers=[1, 3], roles=["user_text"]))
    # a cache that does not record its roles (older versions) is refused
    no_roles = {k: v for k, v in meta.items() if k != "roles"}
    with pytest.raises(FeatureCacheError, match="does not record which token roles.*re-create"):
        check_cache_compatible(no_roles, enc)


def test_old_format_caches_are_refused_with_a_clear_message(setup, tmp_path):
    """Version 1 (a feat.pth pickle per sample in .tar shards) is refused, never unpickled."""
    from unifusion.data.datamodule import DataSource, UniFusionDataModule

    root, model, src, _ = setup
    enc = HFEncoder(model, layers=[1, 3])
    old = tmp_path / "old"
    old.mkdir()
    (old / "cache-000000.tar").write_bytes(b"")
    meta = {**enc.cache_metadata(), "shards": ["cache-000000.tar"]}  # no format_version: version 1
    (old / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(FeatureCacheError, match="format version 1.*re-create it with `unifusion cache"):
        check_cache_compatible(str(old), enc)
    dm = UniFusionDataModule(sources=[DataSource(str(old), "t2i", cached=True)])
    with pytest.raises(FeatureCacheError, match="format version 1"):
        dm.setup("fit")
    # a corrupt shard is refused (reading) with the file named
    bad = tmp_path / "cache-000000.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(FeatureCacheError, match="unreadable or corrupt"):
        CacheShard(str(bad))


def test_cache_with_verifi_writes_rewrites(setup, tmp_path):
    root, model, src, _ = setup
    enc = HFEncoder(model, layers="last", verifi=True, verifi_max_new_tokens=3)
    summary = write_feature_cache(enc, [src], str(tmp_path), batch_size=4, max_samples=3)
    assert summary["num_samples"] == 3
    meta = json.load(open(tmp_path / META_FILE))
    assert meta["verifi"] is True and meta["roles"] == ["generated", "image_tile", "thumbnail"]
    keys, feats = next(iter(read_cached_features(str(tmp_path))))
    assert feats.texts is not None and len(feats.texts) == 3 and all(isinstance(t, str) for t in feats.texts)
    assert set(feats.roles[feats.mask].tolist()) <= {int(r) for r in VERIFI_ROLES}


def test_cache_task_override_and_reference_size(setup, tmp_path):
    root, model, src, samples = setup
    enc = HFEncoder(model, layers="last")
    summary = write_feature_cache(enc, src, str(tmp_path), task="recon", reference_size=24, max_samples=2)
    assert summary["num_samples"] == 2
    meta = json.load(open(tmp_path / META_FILE))
    assert meta["task"] == "recon" and meta["reference_size"] == 24
    keys, feats = next(iter(read_cached_features(str(tmp_path))))
    assert keys == ["t2i0", "t2i1"]
    assert set(feats.roles[feats.mask].tolist()) == {4}  # t2i shard encoded as recon: image tokens only
    # live features from the same resized references match the cache
    raw = [samples[0], samples[1]]
    imgs = [reference_images(r, "recon", 24) for r in raw]
    assert imgs[0][0].size == (24, 24)
    live = enc.encode(["", ""], imgs, task="recon").select_roles(DEFAULT_ROLES)
    torch.testing.assert_close(feats.hidden.float(), live.hidden, rtol=2e-3, atol=2e-3)
