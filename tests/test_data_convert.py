"""Converters: image folders, caption indexes and editing records to shards."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unifusion.data.convert import (
    convert_command,
    convert_edit_records,
    convert_image_folder,
    convert_index,
    shapes_command,
)
from unifusion.data.datamodule import DataSource, UniFusionDataModule
from unifusion.data.shards import read_manifest, read_samples, shard_urls


def _img_bytes(color, fmt="PNG", size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "images"
    (src / "sub.dir").mkdir(parents=True)
    (src / "red.png").write_bytes(_img_bytes((255, 0, 0)))
    (src / "red.txt").write_text("a red square\n")
    (src / "sub.dir" / "green.v2.jpg").write_bytes(_img_bytes((0, 255, 0), "JPEG"))
    (src / "sub.dir" / "green.v2.txt").write_text("a green field")
    (src / "blue.bmp").write_bytes(_img_bytes((0, 0, 255), "BMP"))
    (src / "blue.txt").write_text("blue")
    (src / "nocap.png").write_bytes(_img_bytes((9, 9, 9)))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (src / "broken.txt").write_text("never written")
    return src


def test_image_folder_writes_captions_and_counts_skips(folder, tmp_path):
    out = tmp_path / "shards"
    counts = convert_image_folder(folder, out, maxcount=2)
    assert counts == {
        "written": 3,
        "skipped_unreadable": 1,
        "skipped_no_caption": 1,
        "skipped_bad_caption": 0,
        "shards": 2,
    }
    samples = {s["txt"].decode(): s for s in read_samples(out)}
    assert set(samples) == {"a red square", "a green field", "blue"}
    assert not any("." in s["__key__"] or "/" in s["__key__"] for s in samples.values())
    # PNG/JPEG bytes kept as they are, BMP re-encoded to PNG
    assert "png" in samples["a red square"] and "jpg" in samples["a green field"] and "png" in samples["blue"]
    assert tuple(_decode(samples["blue"]["png"])[0, 0]) == (0, 0, 255)
    manifest = read_manifest(out)
    assert manifest["counts"]["t2i"] == 3 and len(manifest["shards"]["t2i"]) == 2
    assert len(shard_urls(out)) == 2
    # the data module reads converted shards, resizing and centre-cropping to image_size
    dm = UniFusionDataModule([DataSource(str(out), "t2i")], image_size=8, batch_size=3, shuffle_buffer=1)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    assert batch["target"].shape == (3, 3, 8, 8) and sorted(batch["prompt"]) == sorted(samples)


def test_image_folder_optional_captions_and_size_limit(folder, tmp_path):
    counts = convert_image_folder(folder, tmp_path / "o", require_caption=False, maxsize=1)
    assert counts["written"] == 4 and counts["skipped_no_caption"] == 0 and counts["skipped_unreadable"] == 1
    # a shard is closed once it reaches maxsize bytes: here after every sample
    assert counts["shards"] == 4
    assert convert_image_folder(folder, tmp_path / "o1", require_caption=False, maxsize=10**6)["shards"] == 1
    with pytest.raises(FileNotFoundError, match="nope"):
        convert_image_folder(tmp_path / "nope", tmp_path / "o2")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_index_files(tmp_path, fmt):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(_img_bytes((10, 200, 30)))
    (root / "b.jpg").write_bytes(_img_bytes((200, 10, 30), "JPEG"))
    (root / "c.png").write_bytes(b"corrupt")
    rows = [
        {"file": "a.png", "text": "first", "id": "x1"},
        {"file": "b.jpg", "text": "second", "id": "x2"},
        {"file": "c.png", "text": "third", "id": "x3"},
        {"file": "missing.png", "text": "fourth", "id": "x4"},
    ]
    index = tmp_path / f"index.{fmt}"
    df = pd.DataFrame(rows)
    if fmt == "jsonl":
        index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        df.to_csv(index, index=False)
    else:
        df.to_parquet(index)
    out = tmp_path / "out"
    counts = convert_index(index, root, out, image_key="file", caption_key="text", key_column="id")
    assert counts == {"written": 2, "skipped_unreadable": 2, "skipped_no_caption": 0, "shards": 1}
    samples = list(read_samples(out))
    assert [(s["__key__"], s["txt"].decode()) for s in samples] == [("x1", "first"), ("x2", "second")]
    assert json.loads(samples[0]["json"])["id"] == "x1"
    with pytest.raises(KeyError, match="no column 'image'"):
        convert_index(index, root, tmp_path / "o2")


def _edit_rows(style: str, as_dict: bool):
    def img(color):
        data = _img_bytes(color, size=(16, 16))
        return {"bytes": data, "path": None} if as_dict else data

    keys = {
        "instructpix2pix": ("input_image", "edit_prompt", "edited_image"),
        "magicbrush": ("source_img", "instruction", "target_img"),
    }[style]
    s, i, t = keys
    rows = [
        {s: img((255, 0, 0)), i: "make it blue", t: img((0, 0, 255)), "turn": 1},
        {s: img((0, 255, 0)), i: "make it red", t: img((255, 0, 0)), "turn": 2},
        {s: {"bytes": b"broken", "path": None} if as_dict else b"broken", i: "x", t: img((0, 0, 0)), "turn": 3},
        {s: img((1, 1, 1)), i: "", t: img((2, 2, 2)), "turn": 4},
    ]
    return rows


@pytest.mark.parametrize("style,as_dict", [("instructpix2pix", False), ("magicbrush", True)])
def test_edit_records_from_parquet(tmp_path, style, as_dict):
    rec = tmp_path / "edits.parquet"
    pd.DataFrame(_edit_rows(style, as_dict)).to_parquet(rec)
    out = tmp_path / "edit_shards"
    counts = convert_edit_records(rec, out, style=style)
    assert counts == {"written": 2, "skipped_unreadable": 1, "skipped_no_instruction": 1, "shards": 1}
    samples = list(read_samples(out))
    assert [s["txt"].decode() for s in samples] == ["make it blue", "make it red"]
    assert tuple(_decode(samples[0]["src.png"])[0, 0]) == (255, 0, 0)
    assert tuple(_decode(samples[0]["tgt.png"])[0, 0]) == (0, 0, 255)
    meta = json.loads(samples[1]["json"])
    assert meta["task"] == "edit" and meta["style"] == style and meta["turn"] == 2
    assert read_manifest(out)["shards"] == {"edit": ["edit-000000.tar"]}
    # edit batches straight from the converted shards
    dm = UniFusionDataModule([DataSource(str(out), "edit")], image_size=16, batch_size=2, shuffle_buffer=1)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    assert batch["task"] == "edit" and len(batch["images"][0]) == 1 and batch["target"].shape == (2, 3, 16, 16)


def test_edit_records_json_with_paths_and_column_overrides(tmp_path):
    (tmp_path / "s.png").write_bytes(_img_bytes((5, 5, 5)))
    (tmp_path / "t.png").write_bytes(_img_bytes((250, 5, 5)))
    rec = tmp_path / "edits.json"
    rec.write_text(json.dumps([{"before": "s.png", "prompt": "redden", "after": "t.png"}]))
    counts = convert_edit_records(
        rec, tmp_path / "o", source_key="before", instruction_key="prompt", target_key="after"
    )
    assert counts["written"] == 1
    with pytest.raises(KeyError, match="lacks columns"):
        convert_edit_records(rec, tmp_path / "o2", style="magicbrush")
    with pytest.raises(ValueError, match="unknown edit style"):
        convert_edit_records(rec, tmp_path / "o3", style="pix2pix-zero")


def test_cli_functions_return_counts_and_the_command_prints_them_once(tmp_path, folder, capsys):
    from unifusion.cli import main

    counts = shapes_command(str(tmp_path / "shp"), num=12, seed=1, edit_fraction=0.25, shard_size=5)
    assert counts == {"t2i": 9, "recon": 0, "edit": 3, "shards": 3}
    assert capsys.readouterr().out == ""  # library functions do not print; the command does
    c2 = convert_command("image_folder", str(folder), str(tmp_path / "conv"), maxcount=10)
    assert c2["written"] == 3 and capsys.readouterr().out == ""
    assert os.path.isfile(tmp_path / "conv" / "manifest.json")
    with pytest.raises(ValueError, match="unknown converter kind"):
        convert_command("zip", "a", "b")
    assert main(["data", "convert", "--kind", "image_folder", "--src", str(folder), "--out", str(tmp_path / "c3")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"data convert: wrote {tmp_path / 'c3'}: written 3, skipped_unreadable 1, "
        "skipped_no_caption 1, skipped_bad_caption 0, shards 1"
    ]


def test_image_folder_skips_and_counts_a_caption_file_that_is_not_utf8(folder, tmp_path, caplog):
    """A caption file in another encoding aborted the whole conversion (read_text outside the try)."""
    (folder / "latin.png").write_bytes(_img_bytes((1, 2, 3)))
    (folder / "latin.txt").write_bytes("caf\xe9 au lait, \xa9 2019".encode("latin-1"))
    (folder / "binary.png").write_bytes(_img_bytes((4, 5, 6)))
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    out = tmp_path / "shards"
    counts = convert_image_folder(folder, out)
    assert counts["written"] == 3 and counts["skipped_bad_caption"] == 2 and counts["skipped_unreadable"] == 1
    manifest = read_manifest(out)
    assert manifest["counts"]["t2i"] == 3 and manifest["conversions"][-1]["skipped_bad_caption"] == 2
    assert {s["txt"].decode() for s in read_samples(out)} == {"a red square", "a green field", "blue"}
    assert any("latin.txt" in r.getMessage() and "UTF-8" in r.getMessage() for r in caplog.records)


def test_converters_share_one_directory(folder, tmp_path):
    out = tmp_path / "both"
    convert_image_folder(folder, out)
    rec = tmp_path / "edits.parquet"
    pd.DataFrame(_edit_rows("instructpix2pix", False)).to_parquet(rec)
    convert_edit_records(rec, out)
    manifest = read_manifest(out)
    assert manifest["counts"] == {"t2i": 3, "edit": 2}
    assert manifest["shards"] == {"t2i": ["t2i-000000.tar"], "edit": ["edit-000000.tar"]}
    assert [c["kind"] for c in manifest["conversions"]] == ["image_folder", "edit_records"]
    # the 85/5/10 mix over the converted directory: recon reuses the t2i images
    from unifusion.data.datamodule import default_mix

    dm = UniFusionDataModule(default_mix(str(out)), image_size=8, batch_size=1, epoch_length=120, shuffle_buffer=1)
    dm.setup("fit")
    assert {b["task"] for b in dm.train_dataloader()} == {"t2i", "recon", "edit"}


def test_reference_size_options(tmp_path):
    rec = tmp_path / "e.jsonl"
    src, tgt = _img_bytes((255, 0, 0), size=(40, 20)), _img_bytes((0, 0, 255), size=(40, 20))
    (tmp_path / "s.png").write_bytes(src)
    (tmp_path / "t.png").write_bytes(tgt)
    rec.write_text(json.dumps({"input_image": "s.png", "edit_prompt": "blue", "edited_image": "t.png"}) + "\n")
    out = tmp_path / "o"
    convert_edit_records(rec, out)
    shapes_seen = {}
    for ref in (None, 0, 12):
        dm = UniFusionDataModule([DataSource(str(out), "edit")], image_size=8, reference_size=ref, batch_size=1)
        dm.setup("fit")
        (b,) = list(dm.train_dataloader())
        assert b["target"].shape == (1, 3, 8, 8)
        shapes_seen[ref] = tuple(b["images"][0][0].shape)
    assert shapes_seen == {None: (3, 8, 8), 0: (3, 20, 40), 12: (3, 12, 12)}


def test_data_cli_entry_points_parse_their_options(tmp_path, folder, capsys):
    from jsonargparse import CLI

    from unifusion.data.shards import shapes_command as shards_shapes_command

    assert shards_shapes_command is shapes_command
    commands = {"shapes": shapes_command, "convert": convert_command}
    counts = CLI(commands, args=["shapes", str(tmp_path / "s"), "6", "--seed", "2"])
    assert counts == {"t2i": 6, "recon": 0, "edit": 0, "shards": 1}
    index = tmp_path / "idx.jsonl"
    index.write_text(json.dumps({"file": "red.png", "text": "red"}) + "\n")
    # required parameters are positional (kind, src, out), options are flags
    args = ["convert", "index", str(index), str(tmp_path / "c"), "--image_root"]
    args += [str(folder), "--image_key", "file", "--caption_key", "text", "--maxcount", "5"]
    assert CLI(commands, args=args)["written"] == 1
