"""The paper's layer analyses as images (PNG + TensorBoard), drawn with PIL alone.

- :func:`layer_weight_map`: magnitude of LAP's pooling weight per VLM layer (Fig. 8, 11);
  one row per LAP module (a per-DiT-layer LAP gives a 2-D map).
- :func:`adjacent_layer_similarity`: cosine similarity between the VLM's hidden states at
  every pair of layers, averaged over real tokens (Fig. 10; the first off-diagonal is the
  adjacent-layer similarity).
- :func:`layer_dropout_grid`: zero chosen layers' pooling weights and sample with the
  same seed (Fig. 12).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from unifusion.images import make_grid, save_png, to_pil

DEFAULT_PROMPTS = [
    "a red circle",
    "a blue square and a yellow triangle",
    "two green circles",
    "a small magenta square on the left",
]

# viridis control points; interpolated so no plotting library is needed
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [109, 205, 89],
        [180, 222, 44],
        [253, 231, 37],
    ],
    dtype=np.float32,
)


def colormap(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Map values to viridis RGB uint8."""
    vmin = float(np.min(values)) if vmin is None else vmin
    vmax = float(np.max(values)) if vmax is None else vmax
    x = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_VIRIDIS) - 1)
    frac = (x - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[hi] * frac).astype(np.uint8)


def heatmap(
    values: np.ndarray,
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    title: str,
    cell: int = 28,
    annotate: bool = True,
) -> Image.Image:
    """A labelled heatmap with a colour bar, as a PIL image."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float32))
    rows, cols = values.shape
    font = ImageFont.load_default()
    left, top, bar = 70, 36, 40
    w, h = left + cols * cell + bar + 50, top + rows * cell + 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black", font=font)
    rgb = colormap(values)
    vmin, vmax = float(values.min()), float(values.max())
    for r in range(rows):
        draw.text((4, top + r * cell + cell // 3), str(row_labels[r])[:10], fill="black", font=font)
        for c in range(cols):
            x0, y0 = left + c * cell, top + r * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=tuple(int(v) for v in rgb[r, c]))
            if annotate and cell >= 24:
                v = values[r, c]
                txt = f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"
                lum = 0.3 * rgb[r, c, 0] + 0.6 * rgb[r, c, 1] + 0.1 * rgb[r, c, 2]
                draw.text((x0 + 2, y0 + cell // 3), txt[:4], fill="black" if lum > 128 else "white", font=font)
    for c in range(cols):
        draw.text((left + c * cell + 4, top + rows * cell + 4), str(col_labels[c])[:4], fill="black", font=font)
    # colour bar
    bx = left + cols * cell + 12
    steps = max(rows * cell, 40)
    for i in range(steps):
        v = vmax - (vmax - vmin) * i / max(steps - 1, 1)
        draw.line([bx, top + i, bx + 12, top + i], fill=tuple(int(x) for x in colormap(np.array([v]), vmin, vmax)[0]))
    draw.text((bx + 16, top - 2), f"{vmax:.2f}", fill="black", font=font)
    draw.text((bx + 16, top + steps - 10), f"{vmin:.2f}", fill="black", font=font)
    return img


def _pil_to_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _write(img: Image.Image, out_dir: str, name: str, writer=None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.png")
    img.save(path)
    if writer is not None:
        writer.add_image(f"analysis/{name}", _pil_to_tensor(img), global_step=0)
    return path


def _lap(pipeline):
    cond = pipeline.conditioner
    if not hasattr(cond, "pooling_weights"):
        raise ValueError(
            f"the layer analyses need a conditioner with learned layer pooling (LAP); this model uses {type(cond).__name__}"
        )
    return cond


def layer_weight_map(pipeline) -> tuple[Image.Image, np.ndarray]:
    """|pooling weight| per VLM layer (columns) for each LAP module (rows), from a
    :class:`~unifusion.pipeline.UniFusionPipeline` (exported / loaded with EMA weights by default)."""
    cond = _lap(pipeline)
    w = cond.pooling_weights().detach().float().abs().cpu().numpy()
    w2 = np.atleast_2d(w)
    layer_ids = list(getattr(cond, "layer_ids", pipeline.encoder.spec.layer_ids))
    rows = ["LAP"] if w2.shape[0] == 1 else [f"DiT {i}" for i in range(w2.shape[0])]
    img = heatmap(w2, [str(i) for i in layer_ids], rows, "LAP pooling |weight| per VLM layer (Fig. 8/11)")
    return img, w2


@torch.no_grad()
def adjacent_layer_similarity(encoder, prompts: Sequence[str]) -> tuple[Image.Image, np.ndarray, list[int]]:
    """Cosine similarity of hidden states between every pair of the VLM's layers."""
    from unifusion.encoders.hf import HFEncoder

    if not isinstance(encoder, HFEncoder):
        raise ValueError(f"layer-similarity needs an HFEncoder, got {type(encoder).__name__}")
    full = HFEncoder(
        path=encoder.path, layers="all", family=encoder.family, dtype=encoder.dtype_name, truncate=False, roles="all"
    )
    feats = full.encode(list(prompts))
    h = feats.hidden.float()  # (B, S, n, H)
    m = feats.mask
    x = torch.nn.functional.normalize(h[m], dim=-1)  # (T, n, H)
    sim = torch.einsum("tih,tjh->ij", x, x) / max(x.shape[0], 1)
    ids = list(feats.layer_ids)
    img = heatmap(
        sim.cpu().numpy(),
        [str(i) for i in ids],
        [str(i) for i in ids],
        "cosine similarity between VLM layers (Fig. 10)",
        cell=22,
        annotate=len(ids) <= 12,
    )
    return img, sim.cpu().numpy(), ids


@torch.no_grad()
def layer_dropout_grid(
    pipeline, prompts: Sequence[str], drop: Sequence[Sequence[int]], seed: int = 0, upscale: int = 4
) -> tuple[Image.Image, list[list[int]]]:
    """Rows: no dropout, then each group of dropped layers; columns: prompts (same seed)."""
    cond = _lap(pipeline)
    groups = [[]] + [list(g) for g in drop]
    rows = []
    old = list(getattr(cond, "layer_dropout", []))
    try:
        for g in groups:
            cond.layer_dropout = g
            rows.append(pipeline.generate(list(prompts), seed=seed, output_type="pt").images.cpu())
    finally:
        cond.layer_dropout = old
    grid = make_grid(torch.cat(rows), nrow=len(prompts))
    img = to_pil(grid, upscale)
    # label rows
    font = ImageFont.load_default()
    labelled = Image.new("RGB", (img.width + 110, img.height), "white")
    labelled.paste(img, (110, 0))
    draw = ImageDraw.Draw(labelled)
    cell = img.height / len(groups)
    for r, g in enumerate(groups):
        draw.text(
            (4, int(r * cell + cell / 2) - 5),
            "none dropped" if not g else "drop " + ",".join(map(str, g)),
            fill="black",
            font=font,
        )
    return labelled, groups


def default_dropout_groups(layer_ids: Sequence[int]) -> list[list[int]]:
    """First, middle and last thirds of the tapped layers (as in Fig. 12)."""
    ids = list(layer_ids)
    k = max(1, len(ids) // 3)
    return [ids[:k], ids[len(ids) // 2 - k // 2 : len(ids) // 2 - k // 2 + k], ids[-k:]]


def run_analysis(
    pipeline,
    analysis: str,
    out: str,
    prompts: Sequence[str] | None = None,
    drop: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> list[str]:
    """Run one analysis (or ``all``) and write PNGs + TensorBoard images under ``out``."""
    from torch.utils.tensorboard import SummaryWriter

    prompts = list(prompts or DEFAULT_PROMPTS)
    writer = SummaryWriter(out)
    written: list[str] = []
    try:
        if analysis in ("layer-weights", "all"):
            img, w = layer_weight_map(pipeline)
            written.append(_write(img, out, "layer_weights", writer))
            np.savetxt(os.path.join(out, "layer_weights.csv"), w, delimiter=",", fmt="%.6f")
        if analysis in ("layer-similarity", "all"):
            img, sim, _ = adjacent_layer_similarity(pipeline.encoder, prompts)
            written.append(_write(img, out, "layer_similarity", writer))
            np.savetxt(os.path.join(out, "layer_similarity.csv"), sim, delimiter=",", fmt="%.6f")
        if analysis in ("layer-dropout", "all"):
            groups = drop or default_dropout_groups(_lap(pipeline).layer_ids)
            img, _ = layer_dropout_grid(pipeline, prompts, groups, seed=seed)
            written.append(_write(img, out, "layer_dropout", writer))
        if not written:
            raise ValueError(
                f"unknown analysis {analysis!r}; choose layer-weights, layer-similarity, layer-dropout or all"
            )
    finally:
        writer.close()
    return written  # the `analyze` command prints where they went


__all__ = [
    "adjacent_layer_similarity",
    "heatmap",
    "layer_dropout_grid",
    "layer_weight_map",
    "run_analysis",
    "save_png",
]
