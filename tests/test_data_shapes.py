"""The procedural shapes world: palette, rendering, sampling, captions and edits."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from unifusion.data import shapes
from unifusion.data.shapes import (
    BACKGROUND,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    cell_center,
    make_edit,
    random_scene,
    render,
)


def _obj(shape: str, color: str, row: int, col: int, size: str = "large") -> ShapeObject:
    x, y = cell_center(row, col)
    return ShapeObject(shape=shape, color=color, size=SIZES[size], x=x, y=y)


def test_palette_is_well_separated_and_readable_on_the_background():
    assert len(COLORS) >= 6
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert set(SIZES) >= {"small", "large"} and SIZES["small"] < SIZES["large"]
    rgb = {k: np.array(v, dtype=float) for k, v in COLORS.items()}
    min_pair = min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(rgb, 2))
    assert min_pair > 120, "a nearest-palette judge needs well separated colours"
    bg = np.array(BACKGROUND, dtype=float)
    assert min(np.linalg.norm(v - bg) for v in rgb.values()) > 150


def test_render_pixels_match_the_scene():
    scene = Scene([_obj("square", "red", 1, 1)])
    img = render(scene, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == BACKGROUND
    assert tuple(img[16, 16]) == COLORS["red"]
    # area of each shape relative to a square of the same extent: 1, pi/4, 1/2
    areas = {}
    for shape in ("square", "circle", "triangle"):
        im = render(Scene([_obj(shape, "green", 1, 1)]), 64).astype(float)
        # fractional coverage from the green channel (antialiased edges count partially)
        cov = (im[..., 1] - BACKGROUND[1]) / (COLORS["green"][1] - BACKGROUND[1])
        areas[shape] = cov.sum()
    assert areas["circle"] / areas["square"] == pytest.approx(np.pi / 4, abs=0.03)
    assert areas["triangle"] / areas["square"] == pytest.approx(0.5, abs=0.03)
    # antialias=1 gives only palette colours
    hard = render(Scene([_obj("circle", "blue", 0, 0)]), 16, antialias=1)
    assert {tuple(p) for p in hard.reshape(-1, 3)} == {BACKGROUND, COLORS["blue"]}


def test_position_follows_the_grid_cell():
    img = render(Scene([_obj("square", "yellow", 0, 2)]), 48, antialias=1)
    ys, xs = np.nonzero(img[..., 0] > 100)
    assert xs.mean() > 32 and ys.mean() < 16  # top right


def test_unknown_names_raise_with_the_valid_choices():
    with pytest.raises(ValueError, match="valid shapes"):
        render(Scene([_obj("hexagon", "red", 0, 0)]), 16)
    with pytest.raises(ValueError, match="valid colors"):
        render(Scene([_obj("circle", "mauve", 0, 0)]), 16)
    with pytest.raises(ValueError, match="valid shapes"):
        random_scene(random.Random(0), shapes=("blob",))


def test_same_seed_same_scenes_captions_edits_and_pixels():
    def run(seed: int):
        rng = random.Random(seed)
        out = []
        for _ in range(20):
            s = random_scene(rng, 1, 4)
            ins, tgt, rec = make_edit(s, rng)
            out.append((s.to_dict(), caption(s, rng), ins, tgt.to_dict(), rec, render(s, 16).tobytes()))
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_random_scene_respects_counts_grid_and_spacing():
    rng = random.Random(0)
    counts = set()
    for _ in range(300):
        s = random_scene(rng, 1, 4)
        n = len(s.objects)
        counts.add(n)
        assert 1 <= n <= 4
        cells = [o.cell for o in s.objects]
        assert len(set(cells)) == n, "one object per grid cell keeps relations unambiguous"
        for o in s.objects:
            assert (o.x, o.y) == pytest.approx(cell_center(*o.cell))
            assert o.shape in SHAPES and o.color in COLORS and o.size in SIZES.values()
        for a, b in itertools.combinations(s.objects, 2):
            # neighbours touch at most (a small next to a large one overlaps by 1% of the side)
            gap = max(abs(a.x - b.x), abs(a.y - b.y)) - (a.size + b.size) / 2
            assert gap > -0.015
        for o in s.objects:
            assert o.size / 2 <= min(o.x, o.y, 1 - o.x, 1 - o.y), "no object is clipped by the border"
    assert counts == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="min_objects"):
        random_scene(rng, 3, 2)


def test_scene_dict_roundtrip_through_json():
    s = random_scene(random.Random(3), 2, 4)
    back = Scene.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert np.array_equal(render(back, 16), render(s, 16))


def test_single_object_captions_name_colour_and_shape():
    for seed in range(50):
        rng = random.Random(seed)
        s = random_scene(rng, 1, 1)
        o = s.objects[0]
        for style in ("varied", "full"):
            cap = caption(s, rng, style=style)
            assert f"{o.color} {o.shape}" in cap
        full = caption(s, rng, style="full")
        assert o.size_name in full and shapes.position_phrase(*o.cell) in full


def test_relations_in_captions_are_correct():
    # red circle above blue square, same column
    scene = Scene([_obj("circle", "red", 0, 1), _obj("square", "blue", 2, 1)])
    seen = set()
    for seed in range(300):
        cap = caption(scene, random.Random(seed))
        assert "red circle" in cap and "blue square" in cap
        if " above " in cap:
            seen.add("above")
            assert cap.index("red circle") < cap.index(" above ") < cap.index("blue square")
        if " below " in cap:
            seen.add("below")
            assert cap.index("blue square") < cap.index(" below ") < cap.index("red circle")
        assert "left of" not in cap and "right of" not in cap
    assert seen == {"above", "below"}
    side = Scene([_obj("triangle", "green", 1, 0), _obj("circle", "cyan", 1, 2)])
    caps = [caption(side, random.Random(s)) for s in range(200)]
    for cap in caps:
        if "to the left of" in cap:
            assert cap.index("green triangle") < cap.index("to the left of") < cap.index("cyan circle")
        if "to the right of" in cap:
            assert cap.index("cyan circle") < cap.index("to the right of") < cap.index("green triangle")
    assert any("to the left of" in c for c in caps) and any("to the right of" in c for c in caps)


def test_identical_objects_are_counted_and_templates_vary():
    twins = Scene([_obj("triangle", "green", 0, 0), _obj("triangle", "green", 0, 2)])
    caps = {caption(twins, random.Random(s)) for s in range(100)}
    assert any(c.endswith("two green triangles") or "two green triangles " in c for c in caps)
    assert any("side by side" in c for c in caps)
    rng = random.Random(0)
    many = {caption(random_scene(rng, 1, 4), rng) for _ in range(300)}
    assert len(many) > 250
    prefixes = {c.split(" ")[0] for c in many}
    assert {"a", "an", "there", "two"} & prefixes and len(prefixes) >= 4


def _changed(src: Scene, tgt: Scene) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(src.objects, tgt.objects)) if a != b]


@pytest.mark.parametrize("kind", shapes.EDIT_TYPES)
def test_each_edit_kind_changes_exactly_what_it_says(kind):
    for seed in range(40):
        rng = random.Random(seed)
        src = random_scene(rng, 2, 3)
        before = src.to_dict()
        ins, tgt, rec = make_edit(src, rng, kinds=[kind])
        assert src.to_dict() == before, "make_edit must not modify its input"
        assert rec["type"] == kind and isinstance(ins, str) and ins
        i = rec["index"]
        if kind == "add":
            assert len(tgt.objects) == len(src.objects) + 1 and tgt.objects[:-1] == src.objects
            new = tgt.objects[-1]
            assert f"{new.color} {new.shape}" in ins and new.cell not in {o.cell for o in src.objects}
            continue
        o = src.objects[i]
        assert f"the {o.color} {o.shape}" in ins
        if kind == "remove":
            assert tgt.objects == src.objects[:i] + src.objects[i + 1 :]
            continue
        assert _changed(src, tgt) == [i]
        t = tgt.objects[i]
        if kind == "recolor":
            assert (rec["from"], rec["to"]) == (o.color, t.color) and t.color != o.color and t.color in ins
        elif kind == "move":
            assert list(t.cell) == rec["to"] and t.cell not in {p.cell for p in src.objects}
        elif kind == "resize":
            assert (rec["from"], rec["to"]) == (o.size_name, t.size_name) and o.size != t.size


def test_edits_refer_to_ambiguous_objects_by_position():
    twins = Scene([_obj("square", "red", 0, 0), _obj("square", "red", 2, 2)])
    for seed in range(20):
        ins, _, rec = make_edit(twins, random.Random(seed), kinds=["recolor", "remove", "resize"])
        where = shapes.position_phrase(*twins.objects[rec["index"]].cell)
        assert where in ins


def test_inapplicable_edits_raise():
    single = Scene([_obj("circle", "red", 1, 1)])
    with pytest.raises(ValueError, match="no edit"):
        make_edit(single, random.Random(0), kinds=["remove"])
    with pytest.raises(ValueError, match="Unknown edit type"):
        make_edit(single, random.Random(0), kinds=["explode"])
    # all edit kinds occur on ordinary scenes
    rng = random.Random(1)
    kinds = {make_edit(random_scene(rng, 1, 3), rng)[2]["type"] for _ in range(200)}
    assert kinds == set(shapes.EDIT_TYPES)


def test_edits_keep_objects_apart():
    rng = random.Random(5)
    for _ in range(300):
        src = random_scene(rng, 1, 4)
        _, tgt, _ = make_edit(src, rng)
        for a, b in itertools.combinations(tgt.objects, 2):
            assert a.cell != b.cell
            assert max(abs(a.x - b.x), abs(a.y - b.y)) - (a.size + b.size) / 2 > -0.015


# ---------------------------------------------------------------------------------------
# held-out compositions (ShapesBench's held_out category)


def _held_out_phrases() -> list[str]:
    """Every way a caption or instruction could name a held-out composition."""
    ho = shapes.HELD_OUT
    out = [f"{c} {s}" for c, s in ho.pairs] + [f"{c} {shapes._plural(s)}" for c, s in ho.pairs]
    for a, rel, b in ho.relations:
        out.append(ho.relation_name(a, rel, b))
        out.append(ho.relation_name(b, shapes.inverse_relation(rel), a))
    return out


def test_held_out_constant_is_compositional():
    ho = shapes.HELD_OUT
    assert ho.pairs and ho.relations
    assert len(ho.names()) == len(set(ho.names())) == len(ho.pairs) + len(ho.relations)
    for color, shape in ho.pairs:
        # the parts are seen: the colour with another shape, the shape with another colour
        assert any((color, s) not in ho.pairs for s in SHAPES if s != shape)
        assert any((c, shape) not in ho.pairs for c in COLORS if c != color)
    for a, _, b in ho.relations:
        assert a not in ho.pairs and b not in ho.pairs
    with pytest.raises(ValueError, match="relation"):
        shapes.HeldOut(relations=((("red", "circle"), "inside", ("blue", "square")),))
    with pytest.raises(ValueError, match="color"):
        shapes.HeldOut(pairs=(("mauve", "circle"),))


def test_generator_never_emits_held_out_compositions(tmp_path):
    ho = shapes.HELD_OUT
    phrases = _held_out_phrases()
    seen_pairs, seen_reverse = set(), set()
    rng = random.Random(11)
    for _ in range(4000):
        scene = random_scene(rng, 1, 4)
        assert ho.violations(scene.objects) == [], scene
        cap = caption(scene, rng)
        assert not [p for p in phrases if p in cap], cap
        ins, tgt, _ = make_edit(scene, rng)
        assert ho.violations(tgt.objects) == [], (ins, tgt)
        assert not [p for p in phrases if p in ins], ins
        seen_pairs |= {(o.color, o.shape) for o in scene.objects}
        for a, rel, b in ho.relations:  # the reverse arrangement of a held-out relation does occur
            for oa in scene.objects:
                for ob in scene.objects:
                    if (oa.color, oa.shape) == a and (ob.color, ob.shape) == b and shapes.in_relation(ob, oa, rel):
                        seen_reverse.add((a, rel, b))
    assert seen_pairs == {(c, s) for c in COLORS for s in SHAPES} - set(ho.pairs)
    assert seen_reverse == set(ho.relations)
    # ... and so do the real shards (what `unifusion data shapes` and the quickstart write)
    from unifusion.data.shards import read_samples, write_shapes_shards

    manifest = write_shapes_shards(tmp_path, num=1500, seed=3, edit_fraction=0.4, max_objects=4)
    assert manifest["held_out"] == ho.names()
    n = 0
    for sample in read_samples(tmp_path):
        meta = json.loads(sample["json"])
        text = sample["txt"].decode()
        assert not [p for p in phrases if p in text], text
        for key in ("scene", "source_scene", "target_scene"):
            if key in meta:
                assert ho.violations(Scene.from_dict(meta[key]).objects) == [], meta
        n += 1
    assert n == 1500


def test_held_out_can_be_switched_off_and_fails_clearly_when_nothing_is_left():
    rng = random.Random(0)
    found = set()
    for _ in range(2000):
        s = random_scene(rng, 1, 4, held_out=None)
        found |= set(shapes.HELD_OUT.violations(s.objects))
    assert found == set(shapes.HELD_OUT.names())
    # excluding a held-out pair must not change scenes that never drew one
    a = [random_scene(random.Random(s), 1, 1, colors=["green"]) for s in range(30)]
    b = [random_scene(random.Random(s), 1, 1, colors=["green"], held_out=None) for s in range(30)]
    assert a == b
    with pytest.raises(ValueError, match="held-out"):
        random_scene(random.Random(0), 1, 1, shapes=["triangle"], colors=["red"])
