"""ShapesBench: a deterministic prompt-following benchmark in the synthetic shapes world.

Prompts (fixed by ``seed``) fall into six categories, each with scene-graph constraints:

* ``single_object`` — "a red circle": an object of that colour and shape exists;
* ``color_binding`` — "a red circle and a blue square": both bindings exist (a blue circle
  and a red square do not count);
* ``counting`` — "three green triangles": exactly that many;
* ``relative_position`` — "a red circle to the left of a blue square": both exist and
  their centres are in that relation (by more than ``relation_margin`` of the side);
* ``held_out`` — exactly the compositions the training generator never produces
  (:data:`unifusion.data.shapes.HELD_OUT`): colour–shape pairs ("a red triangle", whose
  colour and shape are each seen with others) and arrangements of two seen objects ("a
  blue circle to the left of a green square", only ever seen the other way round). No
  prompt of another category names or shows one, so this category measures
  generalisation and the others in-distribution prompt following;
* ``editing`` — source scene (reference image) + instruction; the result must contain
  every object of the expected target scene with its colour, shape and 3x3 grid cell
  (and size for a resize edit), and no extra objects.

Scoring parses each image back into objects, with no training and no network:

1. the background colour is estimated (median of near-background pixels);
2. every pixel is projected onto each palette direction ``bg + a (colour - bg)``; it gets
   the colour with the smallest residual and coverage ``a`` — anti-aliased edges and
   soft generated edges keep their colour;
3. pixels with enough coverage form 8-connected components per colour; specks below
   ``min_mass`` are dropped;
4. each component is explained by analysis-by-synthesis: templates of every shape in
   the generator's vocabulary (the renderer's own inside-tests, super-sampled) over a
   grid of sizes, aligned on the component's coverage centroid, are compared with the
   coverage map (other components masked out), each also 3x3-blurred so soft generated
   edges fit; sizes are searched near the one the coverage mass implies; the smallest
   squared error wins. A component spread over several grid cells is also explained as
   one object per cell and split when that halves the error (touching same-colour
   objects at 16 px); the parts are refined jointly with the union of their templates
   as the model.

``bench.score(bench.target_images())`` is ~100% and shuffled prompt/image pairs score
near chance (see ``tests/test_eval_shapesbench.py``).

Reporting: every category's accuracy comes with a 95 % percentile-bootstrap interval over
its prompts (``ci_low``/``ci_high``; seeded, so the same scores give the same interval).
``overall`` is the macro mean over categories; ``overall_all`` and ``overall_no_editing``
are both always reported, and ``overall`` is the latter (``overall_note`` says so) when
the checkpoint never trained on edits (``trained_on_edits=False``; see
:func:`trained_on_edits_from_run`). ``run_shapesbench(..., baseline=True)`` adds the
unconditional baseline (empty prompts) as ``result["baseline"]``.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from unifusion.data import shapes as sw

__all__ = [
    "CATEGORIES",
    "BenchItem",
    "DetectedObject",
    "ShapeParser",
    "ShapesBench",
    "baseline_summary",
    "bootstrap_means",
    "flatten_scores",
    "percentile_ci",
    "run_shapesbench",
    "summarize",
    "trained_on_edits_from_config",
    "trained_on_edits_from_run",
    "unconditional_baseline",
]

CATEGORIES: tuple[str, ...] = (
    "single_object",
    "color_binding",
    "counting",
    "relative_position",
    "held_out",
    "editing",
)
_NUM_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_RELATIONS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}

GenerateFn = Callable[[list[str], "list[list[Tensor]] | None"], Tensor]


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class DetectedObject:
    """An object parsed from an image; ``size``/``x``/``y`` are fractions of the side."""

    shape: str
    color: str
    size: float
    x: float
    y: float
    mass: float  # coverage-weighted pixel count
    error: float  # mean squared template error over the fit window

    @property
    def cell(self) -> tuple[int, int]:
        return _bin(self.y), _bin(self.x)

    @property
    def size_name(self) -> str:
        return min(sw.SIZES, key=lambda k: abs(sw.SIZES[k] - self.size))


class Fit(NamedTuple):
    shape: str
    size: float
    x: float  # anchor, fraction of the side
    y: float
    sse: float
    mass: float


def _bin(v: float) -> int:
    return min(sw.GRID - 1, max(0, int(v * sw.GRID)))


def _to_hwc_float(image: np.ndarray | Tensor) -> np.ndarray:
    """(H, W, 3) float64 in 0..255 from uint8 HWC arrays or float [0,1] CHW/HWC tensors/arrays."""
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
        arr = arr.astype(np.float64) if image.dtype == torch.uint8 else np.clip(arr.astype(np.float64), 0, 1) * 255
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        arr = arr.astype(np.float64) if arr.dtype == np.uint8 else np.clip(arr.astype(np.float64), 0, 1) * 255
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"ShapesBench: expected an (H, W, 3) or (3, H, W) image, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    p = np.pad(mask, 1)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dr in range(3):
        for dc in range(3):
            out |= p[dr : dr + h, dc : dc + w]
    return out


def _blur3(t: np.ndarray) -> np.ndarray:
    """Binomial 3x3 blur over the last two axes (zero padding)."""
    p = np.pad(t, [(0, 0)] * (t.ndim - 2) + [(1, 1), (1, 1)])
    v = 0.25 * p[..., :-2, :] + 0.5 * p[..., 1:-1, :] + 0.25 * p[..., 2:, :]
    return 0.25 * v[..., :-2] + 0.5 * v[..., 1:-1] + 0.25 * v[..., 2:]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of flat indices (row-major order)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps: list[np.ndarray] = []
    for start in np.flatnonzero(mask):
        if seen.flat[start]:
            continue
        stack = [int(start)]
        seen.flat[start] = True
        members = []
        while stack:
            p = stack.pop()
            members.append(p)
            r, c = divmod(p, w)
            for dr in (-1, 0, 1):
                rr = r + dr
                if rr < 0 or rr >= h:
                    continue
                for dc in (-1, 0, 1):
                    cc = c + dc
                    if 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append(rr * w + cc)
        comps.append(np.sort(np.asarray(members, dtype=np.int64)))
    return comps


class ShapeParser:
    """Parse shapes-world images into :class:`DetectedObject` lists (module docstring)."""

    def __init__(
        self,
        shapes: Sequence[str] = sw.SHAPES,
        colors: dict[str, tuple[int, int, int]] | None = None,
        background: tuple[int, int, int] = sw.BACKGROUND,
        size_grid: Sequence[float] | None = None,
        supersample: int = 4,
        min_coverage: float = 0.3,
        min_mass_frac: float = 0.35,
        cell_core: float = 0.6,
        core_fill: float = 0.3,
        blur: bool = True,
    ) -> None:
        self.shapes = tuple(shapes)
        self.colors = dict(colors if colors is not None else sw.COLORS)
        self.color_names = list(self.colors)
        self.palette = np.asarray([self.colors[c] for c in self.color_names], dtype=np.float64)
        self.background = np.asarray(background, dtype=np.float64)
        self.size_grid = np.asarray(size_grid if size_grid is not None else np.arange(0.14, 0.50001, 0.02))
        self.ss = int(supersample)
        self.min_coverage = float(min_coverage)
        self.cell_core = float(cell_core)
        self.split_jitter = (-0.4, 0.0, 0.4)
        self.core_fill = float(core_fill)
        # the smallest object of the world (a small triangle covers half its box)
        self.min_mass_frac = float(min_mass_frac) * 0.5 * min(sw.SIZES.values()) ** 2
        self._stats = {s: self._shape_stats(s) for s in self.shapes}
        self.blur = bool(blur)

    @staticmethod
    def _shape_stats(shape: str) -> tuple[float, float, float]:
        """(centroid x, centroid y) minus the anchor in units of the size, and the area / size²."""
        n = 400
        g = (np.arange(n) + 0.5) / n - 0.5
        px, py = np.meshgrid(g, g)
        m = sw._coverage(sw.ShapeObject(shape, "red", 1.0, 0.0, 0.0), px, py)
        return float(px[m].mean()), float(py[m].mean()), float(m.mean())

    # ------------------------------------------------------------------ pixels
    def _background(self, img: np.ndarray) -> np.ndarray:
        flat = img.reshape(-1, 3)
        near = flat[np.linalg.norm(flat - self.background, axis=1) < 60.0]
        if len(near) >= 0.2 * len(flat):
            return np.median(near, axis=0)
        return self.background

    def _coverage_maps(self, img: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per colour coverage ``a`` (K, H, W) and per-pixel best colour label (H, W)."""
        diff = img - bg  # (H, W, 3)
        dirs = self.palette - bg  # (K, 3)
        norms = (dirs**2).sum(-1).clip(min=1e-6)
        alpha = np.einsum("hwc,kc->khw", diff, dirs) / norms[:, None, None]
        alpha_c = alpha.clip(0.0, 1.0)
        resid = np.linalg.norm(diff[None] - alpha_c[..., None] * dirs[:, None, None, :], axis=-1)
        # a pixel "is" colour k when that explains it best and covers a fair share of it
        resid = np.where(alpha > 0.15, resid, np.inf)
        label = resid.argmin(axis=0)
        cover = np.take_along_axis(alpha_c, label[None], axis=0)[0]
        label = np.where(np.isfinite(resid.min(axis=0)) & (cover >= self.min_coverage), label, -1)
        return alpha_c, label

    # ------------------------------------------------------------------ fitting
    def _template(self, shape: str, size: float, x0: float, y0: float, h: int, w: int, side: int) -> np.ndarray:
        """Super-sampled coverage (h, w) of one shape; ``x0``/``y0`` anchor in fractions of the side."""
        ss = self._ss(side)
        ys = ((np.arange(h)[:, None] + (np.arange(ss) + 0.5)[None] / ss).reshape(-1)) / side
        xs = ((np.arange(w)[:, None] + (np.arange(ss) + 0.5)[None] / ss).reshape(-1)) / side
        py, px = np.meshgrid(ys, xs, indexing="ij")
        m = sw._coverage(sw.ShapeObject(shape, "red", float(size), x0, y0), px, py)
        return m.reshape(h, ss, w, ss).mean(axis=(1, 3))

    def _fit(
        self,
        cover: np.ndarray,
        weight: np.ndarray,
        pix: np.ndarray,
        side: int,
        jitter: Sequence[float] = (0.0,),
        base: np.ndarray | None = None,
    ) -> Fit | None:
        """Best single-object explanation of the component pixels ``pix`` (flat indices).

        The template is aligned on the coverage centroid (± ``jitter`` px); ``base`` is
        coverage already explained by sibling objects (the model is their union).
        """
        h, w = cover.shape
        # centroid over the component grown by one pixel: its faint anti-aliased rim
        # (below the labelling threshold) must count, or the centroid is biased
        grown = np.zeros((h, w), dtype=bool)
        grown.flat[pix] = True
        grown = _dilate(grown) & (weight > 0)
        rows, cols = np.nonzero(grown)
        a = cover[rows, cols]
        if base is not None:
            a = np.clip(a - base[rows, cols], 0, None)
        mass = float(cover.flat[pix].sum())
        total = float(a.sum())
        if mass <= 0 or total <= 0:
            return None
        cy, cx = float((rows + 0.5) @ a / total), float((cols + 0.5) @ a / total)  # pixel units
        rad = int(math.ceil(0.5 * side * float(self.size_grid.max()))) + 2
        r0, r1 = max(0, int(cy) - rad), min(h, int(cy) + rad + 1)
        c0, c1 = max(0, int(cx) - rad), min(w, int(cx) + rad + 1)
        obs = cover[r0:r1, c0:c1]
        wt = weight[r0:r1, c0:c1]
        bwin = base[r0:r1, c0:c1] if base is not None else None
        ss = self._ss(side)
        sub = (np.arange(ss) + 0.5) / ss
        ys = (np.arange(r0, r1)[:, None] + sub[None, :]).reshape(-1)  # pixel units
        xs = (np.arange(c0, c1)[:, None] + sub[None, :]).reshape(-1)
        py, px = np.meshgrid(ys / side, xs / side, indexing="ij")  # fractions of the side
        jit = np.asarray(jitter, dtype=np.float64) / side
        jx, jy = (v.reshape(-1, 1, 1) for v in np.meshgrid(jit, jit))  # (P, 1, 1) position offsets
        best: Fit | None = None
        for shape in self.shapes:
            ox, oy, area = self._stats[shape]
            # sizes near the one the coverage mass implies (blur keeps the mass)
            est = math.sqrt(total / (area * side * side))
            near = np.argsort(np.abs(self.size_grid - est), kind="stable")[:5]
            for size in self.size_grid[np.sort(near)]:
                x0, y0 = cx / side - ox * size + jx, cy / side - oy * size + jy
                obj = sw.ShapeObject(shape, "red", float(size), x0, y0)  # type: ignore[arg-type]
                m = sw._coverage(obj, px[None], py[None])
                tmpl = m.reshape(-1, r1 - r0, ss, c1 - c0, ss).mean(axis=(2, 4))
                cands = [tmpl, _blur3(tmpl)] if self.blur else [tmpl]
                for t in cands:
                    if bwin is not None:
                        t = np.maximum(t, bwin[None])
                    sse_all = (wt[None] * (obs[None] - t) ** 2).sum(axis=(1, 2))
                    j = int(sse_all.argmin())
                    sse = float(sse_all[j])
                    if best is None or sse < best.sse - 1e-9:
                        best = Fit(shape, float(size), float(x0.flat[j]), float(y0.flat[j]), sse, mass)
        return best

    def _ss(self, side: int) -> int:
        """Super-sampling per axis: finer for small images, where one pixel is a lot of shape."""
        return max(2, min(self.ss, 64 // max(1, side)))

    def parse(self, image: np.ndarray | Tensor) -> list[DetectedObject]:
        img = _to_hwc_float(image)
        h, w = img.shape[:2]
        side = min(h, w)
        bg = self._background(img)
        alpha, label = self._coverage_maps(img, bg)
        min_mass = self.min_mass_frac * side * side
        comps: list[tuple[int, np.ndarray]] = []
        for k in range(len(self.color_names)):
            for pix in _components(label == k):
                if float(alpha[k].flat[pix].sum()) >= min_mass:
                    comps.append((k, pix))
        owner = np.full(h * w, -1, dtype=np.int64)
        for i, (_, pix) in enumerate(comps):
            owner[pix] = i
        found: list[DetectedObject] = []
        for i, (k, pix) in enumerate(comps):
            cover = alpha[k]
            weight = ((owner == -1) | (owner == i)).reshape(h, w).astype(np.float64)
            fits = self._explain(cover, weight, pix, side, min_mass)
            for shape, size, x0, y0, sse, mass in fits:
                npx = max(1.0, (size * side) ** 2)
                found.append(
                    DetectedObject(shape, self.color_names[k], size, x0 * side / w, y0 * side / h, mass, sse / npx)
                )
        found.sort(key=lambda o: (o.y, o.x, o.color, o.shape))
        return found

    def _explain(self, cover: np.ndarray, weight: np.ndarray, pix: np.ndarray, side: int, min_mass: float) -> list[Fit]:
        single = self._fit(cover, weight, pix, side)
        if single is None:
            return []
        h, w = cover.shape
        rows, cols = np.divmod(pix, w)
        a = cover.flat[pix]
        # a grid cell holds an object of this component when the *central* part of the cell
        # is covered (neighbours' anti-aliased rims only touch a cell's border)
        cell = side / sw.GRID
        half = self.cell_core * cell / 2
        n_core = max(1, int(np.ceil(2 * half)) ** 2)
        major = []
        for r in range(sw.GRID):
            for c in range(sw.GRID):
                ry, rx = (r + 0.5) * cell, (c + 0.5) * cell
                core = (np.abs(rows + 0.5 - ry) <= half) & (np.abs(cols + 0.5 - rx) <= half)
                if float(a[core].sum()) >= self.core_fill * n_core:
                    major.append((ry, rx))
        if len(major) < 2:
            return [single]
        # several objects: seed one per occupied cell, then refine them jointly (the model
        # is the union of the templates, so seams between touching objects are explained)
        centres = np.asarray(major)
        d = ((rows[:, None] + 0.5 - centres[None, :, 0]) ** 2) + ((cols[:, None] + 0.5 - centres[None, :, 1]) ** 2)
        group = d.argmin(axis=1)
        gmap = np.full((h, w), -1, dtype=np.int64)
        gmap.flat[pix] = group
        parts: list[Fit] = []
        for g in range(len(major)):
            other = (gmap >= 0) & (gmap != g)
            wt = weight * ~(other | (_dilate(other) & (gmap == g)))
            fit = self._fit(cover, wt, pix[group == g], side)
            if fit is None:
                return [single]
            parts.append(fit)
        tmpls = [self._template(f.shape, f.size, f.x, f.y, h, w, side) for f in parts]
        for _ in range(2):
            for g in range(len(parts)):
                others = [t for i, t in enumerate(tmpls) if i != g]
                base = np.max(np.stack(others), axis=0)
                fit = self._fit(cover, weight, pix[group == g], side, jitter=self.split_jitter, base=base)
                if fit is not None:
                    parts[g] = Fit(fit.shape, fit.size, fit.x, fit.y, fit.sse, parts[g].mass)
                    tmpls[g] = self._template(fit.shape, fit.size, fit.x, fit.y, h, w, side)
        grown = np.zeros((h, w), dtype=bool)
        grown.flat[pix] = True
        region = _dilate(_dilate(grown)) * weight
        model = np.max(np.stack(tmpls), axis=0)
        joint = float((region * (cover - model) ** 2).sum())
        single_t = self._template(single.shape, single.size, single.x, single.y, h, w, side)
        single_sse = float((region * (cover - single_t) ** 2).sum())
        if joint >= 0.5 * single_sse:
            return [single]
        masses = [float(a[group == g].sum()) for g in range(len(parts))]
        return [Fit(f.shape, f.size, f.x, f.y, f.sse, m) for f, m in zip(parts, masses)]


# ----------------------------------------------------------------------------- prompts


@dataclass
class BenchItem:
    """One ShapesBench prompt with its reference scene(s), expected scene and constraints."""

    id: str
    category: str
    prompt: str
    target: sw.Scene
    constraints: list[dict[str, Any]]
    ref_scenes: list[sw.Scene] = field(default_factory=list)
    ref_images: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W, 3)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return "edit" if self.ref_images else "t2i"

    def ref_tensors(self) -> list[Tensor]:
        """Reference images as float (3, H, W) tensors in [0, 1] (the batch contract)."""
        return [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in self.ref_images]


def _describe(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _obj(color: str, shape: str, size: str, cell: tuple[int, int]) -> sw.ShapeObject:
    x, y = sw.cell_center(*cell)
    return sw.ShapeObject(shape=shape, color=color, size=sw.SIZES[size], x=x, y=y)


def _cells(rng: random.Random, k: int) -> list[tuple[int, int]]:
    return rng.sample([(r, c) for r in range(sw.GRID) for c in range(sw.GRID)], k)


def _relation_cells(rng: random.Random, rel: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cells of objects a and b on one grid line with a ``rel`` b."""
    line = rng.randrange(sw.GRID)
    i, j = sorted(rng.sample(range(sw.GRID), 2))
    if rel == "left_of":
        return (line, i), (line, j)
    if rel == "right_of":
        return (line, j), (line, i)
    if rel == "above":
        return (i, line), (j, line)
    return (j, line), (i, line)


def _pair_cons(c: str, s: str, op: str = ">=", n: int = 1) -> dict[str, Any]:
    return {"type": "count", "color": c, "shape": s, "op": op, "n": n}


def _make_item(
    category: str,
    rng: random.Random,
    shapes: Sequence[str],
    colors: Sequence[str],
    held_out: sw.HeldOut | None = None,
) -> tuple[str, sw.Scene, list[dict[str, Any]], list[sw.Scene], dict[str, Any]]:
    """One prompt of an in-distribution category; it never names or shows a ``held_out`` composition
    (a draw that would is made again, so prompts that never touch one are unchanged)."""
    sizes = list(sw.SIZES)
    ho = held_out if held_out is not None else sw.HeldOut()
    if category == "single_object":
        while True:
            c, s = rng.choice(colors), rng.choice(shapes)
            if (c, s) not in ho.pairs:
                break
        scene = sw.Scene([_obj(c, s, rng.choice(sizes), _cells(rng, 1)[0])])
        return _describe(c, s), scene, [_pair_cons(c, s)], [], {}
    if category == "color_binding":
        while True:
            c1, c2 = rng.sample(list(colors), 2)
            s1, s2 = rng.sample(list(shapes), 2) if len(shapes) >= 2 else (shapes[0], shapes[0])
            cells = _cells(rng, 2)
            scene = sw.Scene([_obj(c1, s1, rng.choice(sizes), cells[0]), _obj(c2, s2, rng.choice(sizes), cells[1])])
            if ho.allows(scene.objects):
                break
        cons = [_pair_cons(c1, s1), _pair_cons(c2, s2)]
        return f"{_describe(c1, s1)} and {_describe(c2, s2)}", scene, cons, [], {}
    if category == "counting":
        n = rng.choice([2, 3, 4])
        while True:
            c, s, size = rng.choice(colors), rng.choice(shapes), rng.choice(sizes)
            if (c, s) not in ho.pairs:
                break
        scene = sw.Scene([_obj(c, s, size, cell) for cell in _cells(rng, n)])
        return f"{_NUM_WORDS[n]} {c} {_plural(s)}", scene, [_pair_cons(c, s, "==", n)], [], {"n": n}
    if category == "relative_position":
        rel = rng.choice(list(_RELATIONS))
        ca, cb = _relation_cells(rng, rel)
        while True:
            c1, c2 = rng.choice(colors), rng.choice(colors)
            s1, s2 = rng.choice(shapes), rng.choice(shapes)
            if (c1, s1) != (c2, s2) and ho.allows([_obj(c1, s1, "small", ca), _obj(c2, s2, "small", cb)]):
                break
        scene = sw.Scene([_obj(c1, s1, rng.choice(sizes), ca), _obj(c2, s2, rng.choice(sizes), cb)])
        a, b = {"color": c1, "shape": s1}, {"color": c2, "shape": s2}
        cons = [_pair_cons(c1, s1), _pair_cons(c2, s2), {"type": "relation", "a": a, "b": b, "rel": rel}]
        return f"{_describe(c1, s1)} {_RELATIONS[rel]} {_describe(c2, s2)}", scene, cons, [], {"rel": rel}
    if category == "editing":
        source = sw.random_scene(rng, 1, 3, shapes=shapes, colors=colors, held_out=ho)
        instruction, target, record = sw.make_edit(
            source, rng, max_objects=4, shapes=shapes, colors=colors, held_out=ho
        )
        cons: list[dict[str, Any]] = [{"type": "total", "n": len(target.objects)}]
        for idx, o in enumerate(target.objects):
            con: dict[str, Any] = {"type": "object", "color": o.color, "shape": o.shape, "cell": list(o.cell)}
            if record["type"] == "resize" and idx == record["index"]:
                con["size"] = o.size_name
            cons.append(con)
        return instruction, target, cons, [source], {"edit": record}
    if category == "held_out":
        raise ValueError("ShapesBench: held_out items are made by _held_out_item")
    raise ValueError(f"unknown ShapesBench category {category!r}; valid: {', '.join(CATEGORIES)}")


def _held_out_item(
    n: int, rng: random.Random, held_out: sw.HeldOut
) -> tuple[str, sw.Scene, list[dict[str, Any]], list[sw.Scene], dict[str, Any]]:
    """Prompt ``n`` of the ``held_out`` category: the compositions in turn (a pair as a single
    object, a relation alternately in both phrasings), each in a fresh random arrangement."""
    comps: list[tuple[str, Any]] = [("pair", p) for p in held_out.pairs] + [("relation", r) for r in held_out.relations]
    kind, comp = comps[n % len(comps)]
    sizes = list(sw.SIZES)
    if kind == "pair":
        c, s = comp
        scene = sw.Scene([_obj(c, s, rng.choice(sizes), _cells(rng, 1)[0])])
        return _describe(c, s), scene, [_pair_cons(c, s)], [], {"held_out": held_out.pair_name(comp), "kind": kind}
    a, rel, b = comp
    name = held_out.relation_name(a, rel, b)
    if (n // len(comps)) % 2 == 1:  # "B right of A" is the same arrangement as "A left of B"
        a, rel, b = b, sw.inverse_relation(rel), a
    ca, cb = _relation_cells(rng, rel)
    scene = sw.Scene([_obj(*a, rng.choice(sizes), ca), _obj(*b, rng.choice(sizes), cb)])
    cons = [
        _pair_cons(*a),
        _pair_cons(*b),
        {"type": "relation", "a": {"color": a[0], "shape": a[1]}, "b": {"color": b[0], "shape": b[1]}, "rel": rel},
    ]
    prompt = f"{_describe(*a)} {_RELATIONS[rel]} {_describe(*b)}"
    return prompt, scene, cons, [], {"held_out": name, "kind": kind, "rel": rel}


def _check(con: dict[str, Any], objs: Sequence[DetectedObject], margin: float) -> bool:
    kind = con["type"]
    if kind == "count":
        n = sum(1 for o in objs if o.color == con["color"] and o.shape == con["shape"])
        return n >= con["n"] if con["op"] == ">=" else n == con["n"]
    if kind == "total":
        return len(objs) == con["n"]
    if kind == "object":
        return any(
            o.color == con["color"]
            and o.shape == con["shape"]
            and list(o.cell) == list(con["cell"])
            and ("size" not in con or o.size_name == con["size"])
            for o in objs
        )
    if kind == "relation":
        a = [o for o in objs if o.color == con["a"]["color"] and o.shape == con["a"]["shape"]]
        b = [o for o in objs if o.color == con["b"]["color"] and o.shape == con["b"]["shape"]]
        rel = con["rel"]
        for oa in a:
            for ob in b:
                if oa is ob:
                    continue
                if rel == "left_of" and oa.x < ob.x - margin:
                    return True
                if rel == "right_of" and oa.x > ob.x + margin:
                    return True
                if rel == "above" and oa.y < ob.y - margin:
                    return True
                if rel == "below" and oa.y > ob.y + margin:
                    return True
        return False
    raise ValueError(f"unknown constraint type {kind!r}")


class ShapesBench:
    """Fixed prompt set + deterministic scorer; see the module docstring.

    Args:
        image_size: side of reference/ground-truth renders (generated images may be any size).
        num_per_category: prompts per category.
        seed: the prompt set is a pure function of (seed, categories, shapes, colors, num, held_out).
        shapes/colors: the generator's vocabulary (defaults: the shapes world's).
        relation_margin: centres must differ by this fraction of the side for a relation.
        held_out: the compositions the training data never contains (default: the generator's
            :data:`unifusion.data.shapes.HELD_OUT`): the ``held_out`` category asks for exactly
            these, and no prompt of another category names or shows one.
    """

    def __init__(
        self,
        image_size: int = 16,
        num_per_category: int = 20,
        seed: int = 0,
        categories: Sequence[str] = CATEGORIES,
        shapes: Sequence[str] = sw.SHAPES,
        colors: Sequence[str] | None = None,
        relation_margin: float = 0.1,
        held_out: sw.HeldOut | None = sw.HELD_OUT,
    ) -> None:
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"ShapesBench: unknown categories {unknown}; valid: {', '.join(CATEGORIES)}")
        self.image_size = int(image_size)
        self.num_per_category = int(num_per_category)
        self.seed = int(seed)
        self.categories = tuple(categories)
        self.shapes = tuple(shapes)
        self.colors = list(colors) if colors is not None else list(sw.COLORS)
        self.relation_margin = float(relation_margin)
        self.held_out = (held_out or sw.HeldOut()).within(self.shapes, self.colors)
        if "held_out" in self.categories and not self.held_out.names():
            raise ValueError(
                "ShapesBench: the held_out category needs held-out compositions within the vocabulary "
                f"(shapes {list(self.shapes)}, colors {self.colors}); drop the category or pass held_out="
            )
        palette = {c: sw.ALL_COLORS[c] for c in self.colors}
        self.parser = ShapeParser(shapes=self.shapes, colors=palette)
        self.prompts: list[BenchItem] = []
        for cat in self.categories:
            rng = random.Random(f"shapesbench-{self.seed}-{cat}")
            for n in range(self.num_per_category):
                if cat == "held_out":
                    prompt, target, cons, refs, meta = _held_out_item(n, rng, self.held_out)
                else:
                    prompt, target, cons, refs, meta = _make_item(cat, rng, self.shapes, self.colors, self.held_out)
                self.prompts.append(
                    BenchItem(
                        id=f"{cat}-{n:03d}",
                        category=cat,
                        prompt=prompt,
                        target=target,
                        constraints=cons,
                        ref_scenes=refs,
                        ref_images=[sw.render(s, self.image_size) for s in refs],
                        meta=meta,
                    )
                )

    def __len__(self) -> int:
        return len(self.prompts)

    def target_images(self, size: int | None = None) -> list[np.ndarray]:
        """Ground-truth renders of every prompt's expected scene (uint8 (H, W, 3))."""
        return [sw.render(it.target, size or self.image_size) for it in self.prompts]

    def parse(self, image: np.ndarray | Tensor) -> list[DetectedObject]:
        return self.parser.parse(image)

    def score_item(self, item: BenchItem, image: np.ndarray | Tensor) -> dict[str, Any]:
        objs = self.parse(image)
        sat = [_check(c, objs, self.relation_margin) for c in item.constraints]
        return {
            "id": item.id,
            "category": item.category,
            "correct": float(all(sat)),
            "constraint_score": float(np.mean(sat)) if sat else 1.0,
            "detected": [f"{o.size_name} {o.color} {o.shape} @{o.cell}" for o in objs],
        }

    def score(
        self,
        images: Sequence[np.ndarray | Tensor] | Tensor,
        with_items: bool = False,
        trained_on_edits: bool | None = None,
        num_bootstrap: int = 1000,
        ci: float = 0.95,
        bootstrap_seed: int = 0,
    ) -> dict[str, Any]:
        """Score one image per prompt (in ``self.prompts`` order).

        Returns ``{"overall", "overall_micro", "constraint_score", "categories": {cat:
        {"accuracy", "constraint_score", "n", "ci_low", "ci_high"}}, ...}`` (+ ``"items"``).
        ``ci_low``/``ci_high`` are a ``ci`` percentile-bootstrap interval over prompts
        (``num_bootstrap`` resamples, seeded by ``bootstrap_seed`` and the category name:
        the same scores always give the same interval).

        ``overall`` is the macro mean over categories; with ``trained_on_edits=False`` it
        leaves out ``editing`` (a model that never saw an edit sample scores ~0 there by
        construction, which would only dilute the comparison) and ``overall_note`` says so.
        Both variants are always reported: ``overall_all`` (every category) and
        ``overall_no_editing``, each with ``*_ci_low``/``*_ci_high`` (the bootstrap resamples
        prompts within each category).
        """
        if isinstance(images, Tensor) and images.ndim == 4:
            images = list(images)
        if len(images) != len(self.prompts):
            raise ValueError(f"ShapesBench.score: {len(images)} images for {len(self.prompts)} prompts")
        items = [self.score_item(it, im) for it, im in zip(self.prompts, images)]
        for it, row in zip(self.prompts, items):
            if "held_out" in it.meta:
                row["held_out"], row["held_out_kind"] = it.meta["held_out"], it.meta["kind"]
        out = summarize(items, self.categories, trained_on_edits, num_bootstrap, ci, bootstrap_seed)
        if with_items:
            out["items"] = items
        return out


def _seed_of(name: str, seed: int) -> int:
    # a stable per-category stream (Python's hash() of a str changes between processes)
    return (zlib.crc32(name.encode()) + 1_000_003 * int(seed)) % 2**32


def bootstrap_means(values: Sequence[float] | np.ndarray, num_bootstrap: int = 1000, seed: int = 0) -> np.ndarray:
    """``num_bootstrap`` means of ``values`` resampled with replacement (seeded, deterministic)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return np.full(num_bootstrap, np.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(num_bootstrap, v.size))
    return v[idx].mean(axis=1)


def percentile_ci(replicates: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap replicates."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    r = np.asarray(replicates, dtype=np.float64)
    if r.size == 0 or np.isnan(r).all():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(r, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return float(lo), float(hi)


def summarize(
    items: Sequence[dict[str, Any]],
    categories: Sequence[str] = CATEGORIES,
    trained_on_edits: bool | None = None,
    num_bootstrap: int = 1000,
    ci: float = 0.95,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Aggregate per-item rows (``category``, ``correct``, ``constraint_score``) into the
    :meth:`ShapesBench.score` result (per-category accuracy with bootstrap CIs, both overalls)."""
    cats: dict[str, dict[str, float]] = {}
    reps: dict[str, np.ndarray] = {}
    for cat in categories:
        rows = [r for r in items if r["category"] == cat]
        if not rows:
            continue
        correct = [float(r["correct"]) for r in rows]
        reps[cat] = bootstrap_means(correct, num_bootstrap, _seed_of(cat, bootstrap_seed))
        lo, hi = percentile_ci(reps[cat], ci)
        cats[cat] = {
            "accuracy": float(np.mean(correct)),
            "constraint_score": float(np.mean([r["constraint_score"] for r in rows])),
            "n": float(len(rows)),
            "ci_low": lo,
            "ci_high": hi,
        }
    out: dict[str, Any] = {}

    def macro(name: str, keep: list[str]) -> None:
        if not keep:
            out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float("nan"), float("nan"), float("nan")
            return
        out[name] = float(np.mean([cats[c]["accuracy"] for c in keep]))
        # stratified: each category's prompts are resampled on their own, then macro-averaged
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = percentile_ci(np.mean([reps[c] for c in keep], axis=0), ci)

    macro("overall_all", list(cats))
    macro("overall_no_editing", [c for c in cats if c != "editing"])
    exclude = trained_on_edits is False and "editing" in cats and len(cats) > 1
    chosen = "overall_no_editing" if exclude else "overall_all"
    result: dict[str, Any] = {
        "overall": out[chosen],
        "overall_ci_low": out[f"{chosen}_ci_low"],
        "overall_ci_high": out[f"{chosen}_ci_high"],
        "overall_excludes": ["editing"] if exclude else [],
        "overall_note": (
            "editing excluded from overall: the checkpoint never trained on edit samples" if exclude else ""
        ),
        "overall_micro": float(np.mean([r["correct"] for r in items])) if items else float("nan"),
        "constraint_score": float(np.mean([r["constraint_score"] for r in items])) if items else float("nan"),
        **out,
        "ci": float(ci),
        "num_bootstrap": int(num_bootstrap),
        "categories": cats,
    }
    kinds = {}
    for kind in ("pair", "relation"):
        rows = [r for r in items if r["category"] == "held_out" and r.get("held_out_kind") == kind]
        if rows:
            kinds[kind] = float(np.mean([r["correct"] for r in rows]))
    if kinds:
        result["held_out_kinds"] = kinds
    return result


def flatten_scores(result: dict[str, Any], prefix: str = "shapesbench") -> dict[str, float]:
    """``{"shapesbench/overall": .., "shapesbench/counting": .., ...}`` for loggers."""
    flat = {
        f"{prefix}/overall": float(result["overall"]),
        f"{prefix}/constraint_score": float(result["constraint_score"]),
    }
    for cat, vals in result["categories"].items():
        flat[f"{prefix}/{cat}"] = float(vals["accuracy"])
    return flat


def _generate_all(
    generate_fn: GenerateFn, bench: ShapesBench, batch_size: int, *, empty_prompts: bool, keep_images: bool
) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(bench.prompts)
    for task in ("t2i", "edit"):
        idx = [i for i, it in enumerate(bench.prompts) if it.task == task]
        for s in range(0, len(idx), max(1, batch_size)):
            chunk = idx[s : s + batch_size]
            prompts = ["" if empty_prompts else bench.prompts[i].prompt for i in chunk]
            refs = [bench.prompts[i].ref_tensors() for i in chunk] if (task == "edit" and keep_images) else None
            with torch.no_grad():
                imgs = generate_fn(prompts, refs)
            if imgs.ndim != 4 or imgs.shape[0] != len(chunk) or imgs.shape[1] != 3:
                raise ValueError(f"generate_fn must return (B, 3, H, W) with B={len(chunk)}, got {tuple(imgs.shape)}")
            for i, im in zip(chunk, imgs):
                out[i] = im.detach().float().cpu().clamp(0, 1)
    return [o for o in out if o is not None]


def run_shapesbench(
    generate_fn: GenerateFn,
    bench: ShapesBench,
    batch_size: int = 16,
    return_images: bool = False,
    trained_on_edits: bool | None = None,
    baseline: bool = False,
) -> dict[str, Any]:
    """Generate one image per prompt and score it.

    ``generate_fn(prompts, images) -> (B, 3, H, W)`` in [0, 1]; text-to-image and editing
    prompts are never mixed in a batch (``images`` is ``None`` for text-to-image and one
    ``[source]`` list per sample for editing). ``trained_on_edits``: see
    :meth:`ShapesBench.score`. ``baseline=True`` also scores the unconditional baseline
    (:func:`unconditional_baseline`) and adds it as ``result["baseline"]`` =
    ``{"overall", "overall_all", "overall_no_editing", <category>: accuracy, ...}``.
    """
    imgs = _generate_all(generate_fn, bench, batch_size, empty_prompts=False, keep_images=True)
    result = bench.score(imgs, with_items=True, trained_on_edits=trained_on_edits)
    for it, row in zip(bench.prompts, result["items"]):
        row["prompt"] = it.prompt
    if baseline:
        base = unconditional_baseline(generate_fn, bench, batch_size=batch_size, trained_on_edits=trained_on_edits)
        result["baseline"] = baseline_summary(base)
    if return_images:
        result["images"] = imgs
    return result


def baseline_summary(base: dict[str, Any]) -> dict[str, float]:
    """The flat ``baseline`` block of a result: overalls and per-category accuracy."""
    keys = ("overall", "overall_all", "overall_no_editing")
    return {
        **{k: float(base[k]) for k in keys if k in base},
        **{c: v["accuracy"] for c, v in base["categories"].items()},
    }


def unconditional_baseline(
    generate_fn: GenerateFn,
    bench: ShapesBench,
    batch_size: int = 16,
    keep_images: bool = False,
    trained_on_edits: bool | None = None,
) -> dict[str, Any]:
    """Same as :func:`run_shapesbench` with empty prompts (and, by default, no reference images):
    the score a model gets without following the prompt — the floor to compare against."""
    imgs = _generate_all(generate_fn, bench, batch_size, empty_prompts=True, keep_images=keep_images)
    return bench.score(imgs, with_items=True, trained_on_edits=trained_on_edits)


def trained_on_edits_from_config(config: dict[str, Any]) -> bool | None:
    """Did a run with this merged config (``config.yaml`` of a run) train on edit samples?

    True when a training data source has ``task: edit``; False when the sources are known
    and none has; None when the config has no readable ``data.init_args.sources``.
    """
    data = config.get("data") if isinstance(config, dict) else None
    args = data.get("init_args", data) if isinstance(data, dict) else None
    sources = args.get("sources") if isinstance(args, dict) else None
    if not isinstance(sources, list):
        return None
    return any(isinstance(s, dict) and s.get("task") == "edit" and float(s.get("weight", 1.0)) > 0 for s in sources)


def trained_on_edits_from_run(ckpt_or_run_dir: str) -> bool | None:
    """:func:`trained_on_edits_from_config` for the run a checkpoint belongs to: reads the
    ``config.yaml`` that ``unifusion fit`` saves in the run folder (``<run>/checkpoints/x.ckpt``
    or ``<run>``). Plain YAML, nothing is unpickled; None when there is no such file."""
    import os

    import yaml

    path = os.path.abspath(ckpt_or_run_dir)
    candidates = [path] if os.path.isdir(path) else []
    d = os.path.dirname(path)
    candidates += [d, os.path.dirname(d)]
    for c in candidates:
        cfg = os.path.join(c, "config.yaml")
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                return trained_on_edits_from_config(yaml.safe_load(f) or {})
    return None
