"""Small image helpers (no torchvision): decoding, resize/crop, grids, tensor <-> PIL, PNG writing.

:func:`decode_image` and :func:`resize_center_crop` are the *one* way image files become
model input: the data module (targets and reference images), the feature cache and
``unifusion edit --image`` all go through them, so live and cached features see the
same pixels.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 0.5) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (C, H', W') grid."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = images.new_full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def to_pil(image: Tensor, upscale: int = 1) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL; ``upscale`` with nearest neighbour so tiny images stay legible."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


def from_pil(img: Image.Image) -> Tensor:
    """PIL -> (3, H, W) float in [0, 1] (any mode: decoded with :func:`to_rgb8`)."""
    arr = np.asarray(to_rgb8(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel 16/32-bit integer or float image -> 8-bit ``L``, scaled, not clipped.

    ``Image.convert("RGB")`` clips these modes (a 16-bit PNG at half brightness becomes
    white). Ranges: ``I;16*`` are 0..65535; ``I`` (32-bit int, e.g. a 16-bit PNG on older
    Pillow) is read as 0..255 when every value fits, else as 0..65535; ``F`` as 0..1 when
    every value fits, else 0..255, else 0..65535.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "I":
        top = 255.0 if arr.size == 0 or int(arr.max()) <= 255 else 65535.0
    else:  # "F"
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        top = 1.0 if peak <= 1.0 else (255.0 if peak <= 255.0 else 65535.0)
    scaled = np.clip(np.nan_to_num(arr.astype(np.float64)) * (255.0 / top), 0, 255)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def to_rgb8(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit ``RGB`` at the right brightness.

    High-bit-depth single-channel modes (``I;16``, ``I``, ``F``) are scaled to 8 bit;
    transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) is composited
    onto ``background`` (white) rather than dropped, since dropping it exposes whatever
    colour the fully transparent pixels happen to store.
    """
    img.load()  # full decode now: a truncated file raises here, not later
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_8bit(img).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    canvas = Image.new("RGBA", img.size, (*background, 255))
    return Image.alpha_composite(canvas, img.convert("RGBA")).convert("RGB")


def decode_image(data: bytes | bytearray | str | os.PathLike | Image.Image) -> Image.Image:
    """Image bytes, a file path or a PIL image -> 8-bit RGB PIL image (see :func:`to_rgb8`).

    The one decoder of the library: data module, feature cache and ``edit --image``.
    """
    if isinstance(data, Image.Image):
        return to_rgb8(data)
    # no ``with``: closing would free the pixels of an image returned as-is; a fully loaded
    # single-frame image has already released its file
    src = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else os.fspath(data)
    return to_rgb8(Image.open(src))


def resize_center_crop(img: Image.Image, size: int | None) -> Image.Image:
    """Shorter side resized to ``size`` (bicubic), then centre-cropped to ``size x size``.

    ``None`` (or an image already ``size x size``) returns the image unchanged. The one
    resize/crop of the library: targets and reference images in the data module and the
    feature cache, so cached and live features are computed from the same pixels.
    """
    if size is None or img.size == (size, size):
        return img
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img: Image.Image) -> Tensor:
    """8-bit RGB PIL -> (3, H, W) float in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def load_image_bytes(data: Any, size: int | None = None) -> Tensor:
    """Image bytes (or path / PIL) -> (3, H, W) float in [0, 1]; ``size``: resize + centre crop."""
    return pil_to_tensor(resize_center_crop(decode_image(data), size))


def load_image(path: str, size: int | None = None) -> Tensor:
    """An image file -> (3, H, W) float in [0, 1] (any PNG/JPEG mode, 16-bit included);
    ``size`` resizes the shorter side and centre-crops (:func:`resize_center_crop`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    return load_image_bytes(path, size)


def save_png(image: Tensor, path: str, upscale: int = 1) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_pil(image, upscale).save(path)
    return path


def save_grid(images: Tensor, path: str, nrow: int | None = None, upscale: int = 4) -> str:
    return save_png(make_grid(images, nrow), path, upscale)


def stack_images(images: Sequence[Tensor], size: int | None = None) -> Tensor:
    """Stack (3, h, w) images, resizing to ``size`` when shapes differ."""
    if size is not None:
        images = [
            torch.nn.functional.interpolate(im[None], size=(size, size), mode="bilinear", antialias=True)[0]
            for im in images
        ]
    return torch.stack(list(images))
