"""Image decoding and resize/crop: one decoder and one resize for the data module, the cache and `edit --image`."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion.data.datamodule import _load_image
from unifusion.encoders.cache import load_reference
from unifusion.images import decode_image, load_image, resize_center_crop


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB/LA): color type 0 = gray,
    2 = RGB, 4 = gray + alpha, 6 = RGBA."""
    h, w = arr.shape[:2]
    rows = arr.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _gray16_half() -> bytes:
    return _encode(Image.fromarray(np.full((8, 12), 32768, dtype=np.uint16)))  # mode I;16


def test_16bit_png_keeps_its_brightness_everywhere(tmp_path):
    """Regression: Image.convert("RGB") clipped a mid-gray 16-bit PNG to white (255)."""
    data = _gray16_half()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # the data module (targets and references), the cache (references) and `edit --image`
    target = _load_image(data, 8)
    assert target.shape == (3, 8, 8)
    assert torch.allclose(target, torch.full_like(target, 128 / 255))
    assert np.asarray(load_reference(data, 8)).max() == 128
    path = tmp_path / "gray16.png"
    path.write_bytes(data)
    edit_input = load_image(str(path))
    assert edit_input.shape == (3, 8, 12) and torch.allclose(edit_input, torch.full_like(edit_input, 128 / 255))


@pytest.mark.parametrize(
    "color_type,channels,expect",
    [(0, 1, (128, 128, 128)), (2, 3, (128, 64, 255)), (4, 2, (128, 128, 128)), (6, 4, (128, 64, 255))],
)
def test_16bit_png_color_types(color_type, channels, expect):
    values = {1: [32896], 2: [32896, 65535], 3: [32896, 16448, 65535], 4: [32896, 16448, 65535, 65535]}[channels]
    arr = np.tile(np.asarray(values, dtype=np.uint16), (4, 4, 1))
    rgb = np.asarray(decode_image(_png16(arr, color_type)))
    assert rgb.dtype == np.uint8 and tuple(rgb[0, 0]) == expect


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda: Image.fromarray(np.full((4, 4), 1000, np.int32)), (4, 4, 4)),  # I, 16-bit range
        (lambda: Image.fromarray(np.full((4, 4), 200, np.int32)), (200, 200, 200)),  # I, 8-bit range
        (lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)),  # F in [0, 1]
        (lambda: Image.fromarray(np.full((4, 4), 100, np.uint8)), (100, 100, 100)),  # L
        (lambda: Image.fromarray(np.full((4, 4, 3), (10, 20, 30), np.uint8)).quantize(4), (10, 20, 30)),  # P
        (lambda: Image.new("LA", (4, 4), (90, 255)), (90, 90, 90)),  # opaque gray + alpha
        (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),  # transparent: onto white
        (lambda: Image.new("RGBA", (4, 4), (200, 0, 0, 255)), (200, 0, 0)),  # opaque RGBA
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    ],
)
def test_decode_image_modes(make, expect):
    rgb = decode_image(make())
    assert rgb.mode == "RGB" and tuple(np.asarray(rgb)[0, 0]) == expect


def test_decode_accepts_bytes_paths_and_jpeg(tmp_path):
    img = Image.fromarray(np.full((6, 6, 3), 77, np.uint8))
    (tmp_path / "a.jpg").write_bytes(_encode(img, "JPEG"))
    assert abs(int(np.asarray(decode_image(str(tmp_path / "a.jpg")))[0, 0, 0]) - 77) <= 2
    assert tuple(np.asarray(decode_image(_encode(img)))[0, 0]) == (77, 77, 77)
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(OSError):
        decode_image(_encode(img)[:30])  # truncated: fails at decode, not later


def test_one_resize_center_crop():
    img = Image.fromarray(np.arange(20 * 40 * 3, dtype=np.uint8).reshape(20, 40, 3) % 255)
    out = resize_center_crop(img, 10)
    assert out.size == (10, 10)
    assert resize_center_crop(img, None) is img
    # the data module and the cache prepare reference images with the same function
    data = _encode(img)
    assert torch.equal(
        _load_image(data, 10),
        torch.from_numpy(np.asarray(load_reference(data, 10)).copy()).permute(2, 0, 1).float() / 255,
    )
