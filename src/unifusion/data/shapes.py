"""A tiny procedural "shapes" world: scenes, renders, captions and edits.

Scenes are a few coloured shapes on a dark background, placed on a coarse 3x3 grid so
that every relation a caption states ("left of", "above", "in the top right corner") is
unambiguous. Everything is a pure function of a ``random.Random``: the same seed gives
the same scenes, captions, edits and pixels, which is what makes the shards, the
quickstart and ShapesBench reproducible.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Named colours, far apart in RGB so a nearest-palette judge is reliable on 16 px samples.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (245, 225, 40),
    "magenta": (225, 50, 225),
    "cyan": (40, 220, 225),
}
#: Extra colours that can be asked for explicitly (``random_scene(colors=...)``); kept out of
#: the default palette because at 16 px orange sits between red and yellow.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
}
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **EXTRA_COLORS}

#: Default shapes: distinguishable at 16 px. ``EXTRA_SHAPES`` render fine from 32 px.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
EXTRA_SHAPES: tuple[str, ...] = ("diamond", "cross")
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES

#: Object extent (diameter / side) as a fraction of the image side. Cell centres are 0.3
#: apart and 0.2 from the border, so no object is clipped and :func:`random_scene` never
#: puts two large objects in neighbouring cells (small/large neighbours touch at most).
SIZES: dict[str, float] = {"small": 0.26, "large": 0.36}

#: Dark, slightly blue-grey background: every palette colour stands out against it.
BACKGROUND: tuple[int, int, int] = (20, 20, 28)

GRID = 3  # positions live on a GRID x GRID lattice of cell centres
#: centre of each grid row/column as a fraction of the side (inset so large shapes fit)
CELL_CENTERS: tuple[float, ...] = (0.2, 0.5, 0.8)
_ROW_NAMES = ("top", "middle", "bottom")
_COL_NAMES = ("left", "center", "right")
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}

#: Spatial relations a held-out composition can name (a cell-level comparison, like captions).
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
_INVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
_RELATION_WORDS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}

Pair = tuple[str, str]  # (color, shape)


@dataclass(frozen=True)
class HeldOut:
    """Compositions the generator never produces and ShapesBench scores as ``held_out``.

    ``pairs``: (color, shape) combinations that appear in no scene, hence in no caption,
    edit instruction or image, although the colour and the shape each occur with others.
    ``relations``: ``((color, shape), rel, (color, shape))``: the first object never stands
    in relation ``rel`` (compared by grid cell, as captions do) to the second in any scene,
    although both objects occur, together too, in the other arrangements. A relation and
    its inverse with the objects swapped are the same composition ("A left of B" = "B right
    of A"), so both phrasings are held out.
    """

    pairs: tuple[Pair, ...] = ()
    relations: tuple[tuple[Pair, str, Pair], ...] = ()

    def __post_init__(self) -> None:
        for color, shape in self.pairs + tuple(o for a, _, b in self.relations for o in (a, b)):
            if color not in ALL_COLORS:
                raise ValueError(f"Unknown color {color!r} in a held-out composition; valid: {', '.join(ALL_COLORS)}")
            if shape not in ALL_SHAPES:
                raise ValueError(f"Unknown shape {shape!r} in a held-out composition; valid: {', '.join(ALL_SHAPES)}")
        for a, rel, b in self.relations:
            if rel not in RELATIONS:
                raise ValueError(f"Unknown relation {rel!r} in a held-out composition; valid: {', '.join(RELATIONS)}")
            if a == b or a in self.pairs or b in self.pairs:
                raise ValueError(f"held-out relation {a} {rel} {b}: needs two different objects that are not held out")

    @staticmethod
    def pair_name(pair: Pair) -> str:
        return f"{pair[0]} {pair[1]}"

    @staticmethod
    def relation_name(a: Pair, rel: str, b: Pair) -> str:
        return f"{HeldOut.pair_name(a)} {_RELATION_WORDS[rel]} {HeldOut.pair_name(b)}"

    def names(self) -> list[str]:
        """Every held-out composition as text: ``"red triangle"``, ``"blue circle to the left of green square"``."""
        return [self.pair_name(p) for p in self.pairs] + [self.relation_name(*r) for r in self.relations]

    def within(self, shapes: Sequence[str], colors: Sequence[str]) -> HeldOut:
        """The compositions expressible with this vocabulary."""

        def ok(p: Pair) -> bool:
            return p[0] in colors and p[1] in shapes

        return HeldOut(
            pairs=tuple(p for p in self.pairs if ok(p)),
            relations=tuple(r for r in self.relations if ok(r[0]) and ok(r[2])),
        )

    def violations(self, objects: Sequence[ShapeObject]) -> list[str]:
        """Names of the held-out compositions that ``objects`` (one scene) contain."""
        found = [self.pair_name(p) for p in self.pairs if any((o.color, o.shape) == p for o in objects)]
        for a, rel, b in self.relations:
            if any(
                (oa.color, oa.shape) == a and (ob.color, ob.shape) == b and in_relation(oa, ob, rel)
                for oa in objects
                for ob in objects
                if oa is not ob
            ):
                found.append(self.relation_name(a, rel, b))
        return found

    def allows(self, objects: Sequence[ShapeObject]) -> bool:
        """True when the scene made of ``objects`` contains no held-out composition."""
        if any((o.color, o.shape) in self.pairs for o in objects):
            return False
        return not self.relations or not self.violations(objects)


def in_relation(a: ShapeObject, b: ShapeObject, rel: str) -> bool:
    """Is ``a`` ``rel`` (left_of / right_of / above / below) ``b``, comparing grid cells?"""
    (ra, ca), (rb, cb) = a.cell, b.cell
    if rel == "left_of":
        return ca < cb
    if rel == "right_of":
        return ca > cb
    if rel == "above":
        return ra < rb
    if rel == "below":
        return ra > rb
    raise ValueError(f"Unknown relation {rel!r}; valid: {', '.join(RELATIONS)}")


def inverse_relation(rel: str) -> str:
    """``left_of`` <-> ``right_of``, ``above`` <-> ``below``."""
    return _INVERSE[rel]


#: The held-out compositions: ONE constant read by the generator (which excludes them by
#: default) and by ShapesBench (which scores exactly these as its ``held_out`` category).
#: Each held-out colour still occurs with the other two shapes and each shape with five
#: colours; none of these is in the quickstart's sample-grid prompts. The relation objects
#: are ordinary (seen) objects: only their arrangement is new.
HELD_OUT = HeldOut(
    pairs=(("red", "triangle"), ("yellow", "square"), ("cyan", "circle")),
    relations=(
        (("blue", "circle"), "left_of", ("green", "square")),
        (("magenta", "triangle"), "above", ("yellow", "circle")),
    ),
)
_REDRAWS = 20  # rejection draws before falling back to enumerating the allowed choices


@dataclass
class ShapeObject:
    """One shape; ``size`` (extent) and centre ``x``, ``y`` are fractions of the image side."""

    shape: str
    color: str
    size: float
    x: float
    y: float

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the coarse grid cell the centre lies in."""
        return _bin(self.y), _bin(self.x)

    @property
    def size_name(self) -> str:
        return min(SIZES, key=lambda k: abs(SIZES[k] - self.size))

    @property
    def position_name(self) -> str:
        return position_name(*self.cell)


@dataclass
class Scene:
    """Objects drawn in list order (later ones on top) over a flat background."""

    objects: list[ShapeObject] = field(default_factory=list)
    background: tuple[int, int, int] = BACKGROUND

    def to_dict(self) -> dict[str, Any]:
        # explicit rather than dataclasses.asdict, which deep-copies and is 10x slower
        objs = [{"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y} for o in self.objects]
        return {"objects": objs, "background": list(self.background)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objs = [ShapeObject(**o) for o in d.get("objects", [])]
        bg = tuple(int(c) for c in d.get("background", BACKGROUND))
        return cls(objects=objs, background=bg)  # type: ignore[arg-type]


def _bin(v: float) -> int:
    return min(GRID - 1, max(0, int(v * GRID)))


def cell_center(row: int, col: int) -> tuple[float, float]:
    """(x, y) centre of grid cell (row, col) as fractions of the side."""
    return CELL_CENTERS[col], CELL_CENTERS[row]


def position_name(row: int, col: int) -> str:
    """'top left', 'top', 'left', 'center', ... for a 3x3 cell."""
    r, c = _ROW_NAMES[row], _COL_NAMES[col]
    if r == "middle" and c == "center":
        return "center"
    if r == "middle":
        return c
    if c == "center":
        return r
    return f"{r} {c}"


def position_phrase(row: int, col: int, rng: random.Random | None = None) -> str:
    """A prepositional phrase for a cell: 'on the left', 'in the top right corner', ..."""
    name = position_name(row, col)
    if name == "center":
        return rng.choice(["in the center", "in the middle"]) if rng else "in the center"
    if name in ("left", "right"):
        return f"on the {name}"
    if name in ("top", "bottom"):
        return f"at the {name}"
    if rng is not None and rng.random() < 0.5:
        return f"in the {name}"
    return f"in the {name} corner"


# ---------------------------------------------------------------------------------------
# rendering


def _coverage(obj: ShapeObject, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Boolean inside-test of ``obj`` at sample points (fractions of the side)."""
    dx, dy, h = px - obj.x, py - obj.y, obj.size / 2
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":
        # apex up; the half-width grows linearly from 0 at the apex to h at the base
        t = dy + h
        return (t >= 0) & (dy <= h) & (np.abs(dx) <= t / 2)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if obj.shape == "cross":
        arm = h / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= h)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= h))
    raise ValueError(f"Unknown shape {obj.shape!r}; valid shapes are: {', '.join(ALL_SHAPES)}")


def _color(name: str) -> tuple[int, int, int]:
    try:
        return ALL_COLORS[name]
    except KeyError:
        raise ValueError(f"Unknown color {name!r}; valid colors are: {', '.join(ALL_COLORS)}") from None


@functools.lru_cache(maxsize=16)
def _sample_coords(n: int) -> np.ndarray:
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    coords.flags.writeable = False
    return coords


def render(scene: Scene, size: int, *, antialias: int = 4) -> np.ndarray:
    """Render ``scene`` to a ``(size, size, 3)`` uint8 array.

    ``antialias`` is the supersampling factor per axis (1 = hard edges); the result is a
    pure function of the scene, so the same scene always gives the same pixels.
    """
    if size < 1:
        raise ValueError(f"render size must be >= 1, got {size}")
    ss = max(1, int(antialias))
    n = size * ss
    coords = _sample_coords(n)
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = np.asarray(scene.background, dtype=np.float32)
    for obj in scene.objects:
        color = np.asarray(_color(obj.color), dtype=np.float32)
        h = obj.size / 2
        # only test the samples inside the object's bounding box (much faster for small shapes)
        x0, x1 = max(0, int((obj.x - h) * n) - 1), min(n, int((obj.x + h) * n) + 2)
        y0, y1 = max(0, int((obj.y - h) * n) - 1), min(n, int((obj.y + h) * n) + 2)
        if x0 >= x1 or y0 >= y1:
            _coverage(obj, coords[:0], coords[:0])  # still validate the shape name
            continue
        # (1, w) and (h, 1) broadcast to the (h, w) box inside _coverage
        m = np.broadcast_to(_coverage(obj, coords[None, x0:x1], coords[y0:y1, None]), (y1 - y0, x1 - x0))
        img[y0:y1, x0:x1][m] = color
    if ss > 1:
        # box filter: average each ss x ss block = fractional coverage blending. Sums of
        # integer colours are exact in float32 and ss*ss divides exactly when it is a power
        # of two, so the pixels don't depend on summation order (same bytes everywhere).
        rows = img.reshape(size, ss, n * 3).sum(axis=1)
        img = rows.reshape(size, size, ss, 3).sum(axis=2) / (ss * ss)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# sampling


def random_scene(
    rng: random.Random,
    min_objects: int = 1,
    max_objects: int = 4,
    *,
    shapes: Sequence[str] = SHAPES,
    colors: Sequence[str] | None = None,
    sizes: Sequence[str] | None = None,
    duplicate_prob: float = 0.2,
    background: tuple[int, int, int] = BACKGROUND,
    held_out: HeldOut | None = HELD_OUT,
) -> Scene:
    """A random scene of ``min_objects..max_objects`` objects, one per grid cell.

    With probability ``duplicate_prob`` a later object copies an earlier one's shape and
    colour, so counting captions ("two green triangles") occur. No scene contains a
    composition of ``held_out`` (default :data:`HELD_OUT`; ``None`` allows everything): an
    object that would make one is drawn again.
    """
    if not 0 <= min_objects <= max_objects <= GRID * GRID:
        raise ValueError(f"need 0 <= min_objects <= max_objects <= {GRID * GRID}, got {min_objects}, {max_objects}")
    colors = list(colors) if colors is not None else list(COLORS)
    sizes = list(sizes) if sizes is not None else list(SIZES)
    for c in colors:
        _color(c)
    for s in shapes:
        if s not in ALL_SHAPES:
            raise ValueError(f"Unknown shape {s!r}; valid shapes are: {', '.join(ALL_SHAPES)}")
    k = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], k)
    objects: list[ShapeObject] = []
    for r, c in cells:
        x, y = cell_center(r, c)
        if objects and rng.random() < duplicate_prob:
            ref = rng.choice(objects)
            shape, color = ref.shape, ref.color
        else:
            shape, color = rng.choice(list(shapes)), rng.choice(colors)
        if held_out is not None:
            shape, color = _allowed_draw(rng, objects, (shape, color), x, y, shapes, colors, held_out)
        size = SIZES[rng.choice(sizes)]
        if _crowded(objects, r, c, size):
            size = min(SIZES[s] for s in sizes)  # two large neighbours would overlap
        objects.append(ShapeObject(shape=shape, color=color, size=size, x=x, y=y))
    return Scene(objects=objects, background=background)


def _allowed_draw(
    rng: random.Random,
    objects: Sequence[ShapeObject],
    first: tuple[str, str],
    x: float,
    y: float,
    shapes: Sequence[str],
    colors: Sequence[str],
    held_out: HeldOut,
) -> tuple[str, str]:
    """(shape, color) for a new object at (x, y) that keeps the scene free of ``held_out``.

    ``first`` is the ordinary draw; only when it is not allowed are more draws made (so
    scenes that never touch a held-out composition are exactly what they were without
    one), and after a few misses the allowed choices are enumerated.
    """

    def ok(shape: str, color: str) -> bool:
        return held_out.allows([*objects, ShapeObject(shape=shape, color=color, size=0.0, x=x, y=y)])

    shape, color = first
    for _ in range(_REDRAWS):
        if ok(shape, color):
            return shape, color
        shape, color = rng.choice(list(shapes)), rng.choice(list(colors))
    options = [(s, c) for s in shapes for c in colors if ok(s, c)]
    if not options:
        raise ValueError(
            f"no shape/colour in shapes={list(shapes)}, colors={list(colors)} avoids the held-out compositions "
            f"{held_out.names()} here; widen the vocabulary or pass held_out=None"
        )
    return rng.choice(options)


def _crowded(objects: Sequence[ShapeObject], row: int, col: int, size: float) -> bool:
    """Would an object of ``size`` at (row, col) overlap a neighbour noticeably?"""
    spacing = CELL_CENTERS[1] - CELL_CENTERS[0]
    for o in objects:
        r, c = o.cell
        if max(abs(r - row), abs(c - col)) == 1 and (o.size + size) / 2 > spacing + 0.02:
            return True
    return False


# ---------------------------------------------------------------------------------------
# captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def describe(obj: ShapeObject, *, with_size: bool = False, article: bool = True) -> str:
    """'a small red circle' / 'red circle'."""
    words = ([obj.size_name] if with_size else []) + [obj.color, obj.shape]
    text = " ".join(words)
    return f"{_article(text)} {text}" if article else text


def _relation(a: ShapeObject, b: ShapeObject, rng: random.Random) -> str:
    """Spatial relation phrase of ``a`` relative to ``b`` (cells differ by construction)."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    vert = "above" if ra < rb else "below" if ra > rb else ""
    horiz = "to the left of" if ca < cb else "to the right of" if ca > cb else ""
    if vert and horiz:
        return f"{vert} and {horiz}"
    if vert:
        return rng.choice([vert, vert, f"directly {vert}"])
    return horiz


def _group(objects: Sequence[ShapeObject]) -> list[tuple[str, str, list[ShapeObject]]]:
    """Group objects by (color, shape), keeping first-appearance order."""
    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    for o in objects:
        groups.setdefault((o.color, o.shape), []).append(o)
    return [(c, s, objs) for (c, s), objs in groups.items()]


def _count_phrase(color: str, shape: str, n: int) -> str:
    if n == 1:
        return f"{_article(color)} {color} {shape}"
    return f"{_NUMBERS.get(n, str(n))} {color} {_plural(shape)}"


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: random.Random, *, style: str = "varied") -> str:
    """A caption of ``scene``.

    ``style="varied"`` draws from several templates (attributes such as size or position
    are sometimes left out, as in real captions); ``style="full"`` is deterministic and
    names colour, shape, size and position of every object (useful for evaluation prompts).
    """
    objs = scene.objects
    if style not in ("varied", "full"):
        raise ValueError(f"caption style must be 'varied' or 'full', got {style!r}")
    if not objs:
        return "an empty dark background" if style == "full" else rng.choice(["an empty dark background", "nothing"])
    if style == "full":
        return _join([f"{describe(o, with_size=True)} {position_phrase(*o.cell)}" for o in objs])

    prefix = rng.choice(["", "", "", "a picture of ", "an image of ", "there is "])
    if prefix == "there is " and (len(objs) > 1 and len(_group(objs)) == 1):
        prefix = "there are "
    if len(objs) == 1:
        o = objs[0]
        text = describe(o, with_size=rng.random() < 0.5)
        if rng.random() < 0.75:
            text += " " + position_phrase(*o.cell, rng)
        return prefix + text

    groups = _group(objs)
    if len(groups) == 1 and rng.random() < 0.6:
        # a pure counting caption: "two green triangles"
        c, s, g = groups[0]
        text = _count_phrase(c, s, len(g))
        if len(g) == 2 and rng.random() < 0.5:
            (ra, ca), (rb, cb) = g[0].cell, g[1].cell
            text += " side by side" if ra == rb else " one above the other" if ca == cb else " diagonally"
        return prefix + text
    if len(objs) == 2:
        a, b = objs if rng.random() < 0.5 else objs[::-1]
        mode = rng.random()
        if mode < 0.6:
            return prefix + f"{describe(a, with_size=rng.random() < 0.3)} {_relation(a, b, rng)} {describe(b)}"
        if mode < 0.85:
            return prefix + _join([f"{describe(o)} {position_phrase(*o.cell, rng)}" for o in (a, b)])
        return prefix + _join([describe(o, with_size=rng.random() < 0.3) for o in (a, b)])
    # 3+ objects: either counted groups or an enumeration with positions
    if rng.random() < 0.5:
        return prefix + _join([_count_phrase(c, s, len(g)) for c, s, g in groups])
    return prefix + _join([f"{describe(o)} {position_phrase(*o.cell, rng)}" for o in objs])


# ---------------------------------------------------------------------------------------
# edits

EDIT_TYPES: tuple[str, ...] = ("recolor", "move", "add", "remove", "resize")


def _refer(scene: Scene, i: int, rng: random.Random) -> str:
    """'the red circle' when unique by colour+shape, else add its position."""
    o = scene.objects[i]
    same = [p for p in scene.objects if p.color == o.color and p.shape == o.shape]
    base = f"the {o.color} {o.shape}"
    if len(same) > 1 or rng.random() < 0.25:
        base += " " + position_phrase(*o.cell)
    return base


def _free_cells(scene: Scene) -> list[tuple[int, int]]:
    used = {o.cell for o in scene.objects}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]


def make_edit(
    scene: Scene,
    rng: random.Random,
    *,
    kinds: Sequence[str] = EDIT_TYPES,
    max_objects: int = 4,
    shapes: Sequence[str] = SHAPES,
    colors: Sequence[str] | None = None,
    held_out: HeldOut | None = HELD_OUT,
) -> tuple[str, Scene, dict[str, Any]]:
    """Draw an edit applicable to ``scene``: ``(instruction, target_scene, edit_record)``.

    ``edit_record`` has ``type`` (one of :data:`EDIT_TYPES`), ``index`` of the affected
    object (in the source for recolor/move/remove/resize, in the target for add) and the
    before/after values. The source scene is not modified. No edit creates a composition
    of ``held_out`` (default :data:`HELD_OUT`; ``None`` allows everything): recolours,
    moves and additions that would are never drawn.
    """
    colors = list(colors) if colors is not None else list(COLORS)
    n = len(scene.objects)
    free = _free_cells(scene)

    def others(i: int) -> list[ShapeObject]:
        return scene.objects[:i] + scene.objects[i + 1 :]

    def allowed(objects: list[ShapeObject]) -> bool:
        return held_out is None or held_out.allows(objects)

    def recolors(i: int) -> list[str]:
        o = scene.objects[i]
        return [c for c in colors if c != o.color and allowed([*others(i), ShapeObject(o.shape, c, o.size, o.x, o.y)])]

    def moves(i: int) -> list[tuple[int, int]]:
        # only cells where the object fits: a large object next to a large neighbour would overlap it
        o = scene.objects[i]
        return [
            (r, c)
            for r, c in free
            if not _crowded(others(i), r, c, o.size)
            and allowed([*others(i), ShapeObject(o.shape, o.color, o.size, *cell_center(r, c))])
        ]

    def can_add(r: int, c: int) -> bool:
        x, y = cell_center(r, c)
        return any(allowed([*scene.objects, ShapeObject(s, k, 0.0, x, y)]) for s in shapes for k in colors)

    # without held-out compositions in play every object / free cell qualifies (and the
    # draws below are the same as they always were)
    recolorable = [i for i in range(n) if recolors(i)]
    movable = [i for i in range(n) if moves(i)]
    addable = [rc for rc in free if can_add(*rc)]

    # growing an object next to a large neighbour would make them overlap
    resizable = [
        i
        for i, o in enumerate(scene.objects)
        if o.size_name == "large" or not _crowded(others(i), *o.cell, SIZES["large"])
    ]
    possible = []
    for k in kinds:
        if k not in EDIT_TYPES:
            raise ValueError(f"Unknown edit type {k!r}; valid types are: {', '.join(EDIT_TYPES)}")
        if k == "recolor" and recolorable:
            possible.append(k)
        elif k == "resize" and resizable:
            possible.append(k)
        elif k == "move" and movable:
            possible.append(k)
        elif k == "add" and n < max_objects and addable:
            possible.append(k)
        elif k == "remove" and n >= 2:  # never leave an empty canvas
            possible.append(k)
    if not possible:
        raise ValueError(f"no edit of kinds {list(kinds)} applies to a scene with {n} objects")
    kind = rng.choice(possible)
    target = copy.deepcopy(scene)

    if kind == "add":
        r, c = rng.choice(addable)
        x, y = cell_center(r, c)
        size = SIZES[rng.choice(list(SIZES))]
        if _crowded(scene.objects, r, c, size):
            size = min(SIZES.values())
        shape, color = rng.choice(list(shapes)), rng.choice(colors)
        if held_out is not None:
            shape, color = _allowed_draw(rng, scene.objects, (shape, color), x, y, shapes, colors, held_out)
        obj = ShapeObject(shape, color, size, x, y)
        target.objects.append(obj)
        what = describe(obj, with_size=rng.random() < 0.5)
        where = position_phrase(r, c, rng)
        verb = rng.choice(["add", "put", "draw", "insert"])
        return f"{verb} {what} {where}", target, {"type": "add", "index": n, "object": asdict(obj)}

    if kind == "resize":
        i = rng.choice(resizable)
    elif kind == "recolor" and len(recolorable) < n:
        i = rng.choice(recolorable)
    elif kind == "move" and len(movable) < n:
        i = rng.choice(movable)
    else:
        i = rng.randrange(n)
    ref = _refer(scene, i, rng)
    obj = target.objects[i]
    if kind == "recolor":
        new = rng.choice(recolors(i))
        old, obj.color = obj.color, new
        tmpl = rng.choice(["make {r} {c}", "change the color of {r} to {c}", "turn {r} {c}", "recolor {r} {c}"])
        return tmpl.format(r=ref, c=new), target, {"type": "recolor", "index": i, "from": old, "to": new}
    if kind == "move":
        r, c = rng.choice(moves(i))
        old_cell = obj.cell
        obj.x, obj.y = cell_center(r, c)
        name = position_name(r, c)
        if rng.random() < 0.5:
            text = f"put {ref} {position_phrase(r, c, rng)}"
        else:
            dest = name if name in ("left", "right", "top", "bottom", "center") else f"{name} corner"
            text = f"{rng.choice(['move', 'shift'])} {ref} to the {dest}"
        rec = {"type": "move", "index": i, "from": list(old_cell), "to": [r, c]}
        return text, target, rec
    if kind == "remove":
        del target.objects[i]
        tmpl = rng.choice(["remove {r}", "delete {r}", "take away {r}", "erase {r}"])
        return tmpl.format(r=ref), target, {"type": "remove", "index": i, "object": asdict(scene.objects[i])}
    # resize: toggle between the two named sizes
    old_name = obj.size_name
    new_name = "large" if old_name == "small" else "small"
    obj.size = SIZES[new_name]
    if new_name == "large":
        tmpl = rng.choice(["make {r} bigger", "make {r} larger", "enlarge {r}", "make {r} large"])
    else:
        tmpl = rng.choice(["make {r} smaller", "shrink {r}", "make {r} small"])
    return tmpl.format(r=ref), target, {"type": "resize", "index": i, "from": old_name, "to": new_name}
