"""ShapesBench: deterministic prompts, and a scorer that is ~100% on ground truth and ~chance on shuffles."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import Tensor

from unifusion.data import shapes as sw
from unifusion.eval.shapesbench import (
    CATEGORIES,
    ShapeParser,
    ShapesBench,
    run_shapesbench,
    trained_on_edits_from_config,
    trained_on_edits_from_run,
    unconditional_baseline,
)


@pytest.fixture(scope="module")
def bench() -> ShapesBench:
    return ShapesBench(image_size=16, num_per_category=8, seed=0)


def test_prompt_set_is_deterministic_and_complete(bench: ShapesBench) -> None:
    again = ShapesBench(image_size=16, num_per_category=8, seed=0)
    other = ShapesBench(image_size=16, num_per_category=8, seed=1)
    assert [p.prompt for p in bench.prompts] == [p.prompt for p in again.prompts]
    assert [p.constraints for p in bench.prompts] == [p.constraints for p in again.prompts]
    assert [p.prompt for p in bench.prompts] != [p.prompt for p in other.prompts]
    assert len(bench) == 8 * len(CATEGORIES)
    for cat in CATEGORIES:
        assert sum(p.category == cat for p in bench.prompts) == 8
    for p in bench.prompts:
        assert p.constraints, p.id
        if p.category == "editing":
            assert p.task == "edit" and len(p.ref_images) == 1
            assert p.ref_images[0].shape == (16, 16, 3) and p.ref_images[0].dtype == np.uint8
            ref = p.ref_tensors()[0]
            assert ref.shape == (3, 16, 16) and 0.0 <= float(ref.min()) and float(ref.max()) <= 1.0
        else:
            assert p.task == "t2i" and p.ref_images == []
    counting = [p for p in bench.prompts if p.category == "counting"]
    assert all(p.prompt.split()[0] in ("two", "three", "four") for p in counting)


def test_parser_recovers_rendered_scene() -> None:
    parser = ShapeParser()
    rng = random.Random(3)
    for _ in range(20):
        scene = sw.random_scene(rng, 1, 4)
        got = parser.parse(sw.render(scene, 32))
        want = sorted((o.color, o.shape, o.cell, o.size_name) for o in scene.objects)
        assert sorted((o.color, o.shape, o.cell, o.size_name) for o in got) == want


@pytest.mark.parametrize("size", [16, 32])
def test_ground_truth_scores_near_100(bench: ShapesBench, size: int) -> None:
    result = bench.score(bench.target_images(size))
    assert result["overall"] >= 0.97, result
    assert result["overall_micro"] >= 0.97
    for cat, vals in result["categories"].items():
        assert vals["accuracy"] >= 0.9, (cat, vals)
        assert vals["n"] == 8


def test_tensor_inputs_equal_uint8_inputs(bench: ShapesBench) -> None:
    imgs = bench.target_images()
    as_tensor = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in imgs])
    assert bench.score(as_tensor)["categories"] == bench.score(imgs)["categories"]


def test_noisy_ground_truth_still_scores_high(bench: ShapesBench) -> None:
    rng = np.random.default_rng(0)
    noisy = [np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8) for im in bench.target_images()]
    assert bench.score(noisy)["overall"] >= 0.9


def test_shuffled_pairs_score_near_chance(bench: ShapesBench) -> None:
    imgs = bench.target_images()
    n = len(imgs)
    shuffled = [imgs[(i + 5) % n] for i in range(n)]  # derangement across categories
    result = bench.score(shuffled)
    assert result["overall"] <= 0.25, result
    blank = [np.zeros((16, 16, 3), np.uint8) + np.array(sw.BACKGROUND, np.uint8) for _ in range(n)]
    assert bench.score(blank)["overall"] == 0.0


def test_wrong_binding_and_wrong_count_fail(bench: ShapesBench) -> None:
    item = next(p for p in bench.prompts if p.category == "color_binding")
    a, b = item.target.objects
    swapped = sw.Scene(
        [sw.ShapeObject(a.shape, b.color, a.size, a.x, a.y), sw.ShapeObject(b.shape, a.color, b.size, b.x, b.y)]
    )
    assert bench.score_item(item, sw.render(swapped, 16))["correct"] == 0.0
    assert bench.score_item(item, sw.render(item.target, 16))["correct"] == 1.0
    item = next(p for p in bench.prompts if p.category == "counting")
    fewer = sw.Scene(item.target.objects[:-1])
    assert bench.score_item(item, sw.render(fewer, 16))["correct"] == 0.0


def _oracle(bench: ShapesBench, calls: list[tuple[int, bool]]):
    table = {(p.prompt, p.ref_images[0].tobytes() if p.ref_images else b""): p.target for p in bench.prompts}

    def generate(prompts: list[str], images: list[list[Tensor]] | None) -> Tensor:
        calls.append((len(prompts), images is not None))
        out = []
        for i, prompt in enumerate(prompts):
            key = b""
            if images is not None:
                assert len(images[i]) == 1 and images[i][0].shape == (3, 16, 16)
                key = (images[i][0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy().tobytes()
            scene = table.get((prompt, key), sw.Scene([]))
            out.append(torch.from_numpy(sw.render(scene, 16)).permute(2, 0, 1).float() / 255)
        return torch.stack(out)

    return generate


def test_run_shapesbench_with_oracle_and_baseline(bench: ShapesBench) -> None:
    calls: list[tuple[int, bool]] = []
    result = run_shapesbench(_oracle(bench, calls), bench, batch_size=10)
    assert result["overall"] >= 0.97
    assert all(n <= 10 for n, _ in calls)
    assert sum(n for n, has in calls if has) == 8  # editing batches carry references, t2i ones do not
    assert sum(n for n, has in calls if not has) == 8 * (len(CATEGORIES) - 1)
    base = unconditional_baseline(_oracle(bench, []), bench, batch_size=16)
    assert base["overall"] == 0.0  # empty prompts: the oracle draws an empty canvas


# ---------------------------------------------------------------------------------------
# held-out compositions, confidence intervals, overall with/without editing


def test_held_out_prompts_are_exactly_the_generators_held_out_compositions(bench: ShapesBench) -> None:
    ho = sw.HELD_OUT
    held = [p for p in bench.prompts if p.category == "held_out"]
    assert len(held) == 8 and all(p.task == "t2i" for p in held)
    assert {p.meta["held_out"] for p in held} == set(ho.names())
    for p in held:
        # the target shows exactly the composition the prompt names, nothing else held out
        assert sw.HELD_OUT.violations(p.target.objects) == [p.meta["held_out"]], p
    # both phrasings of a held-out arrangement ("A left of B" and "B right of A") are asked for
    words = sw._RELATION_WORDS
    ten = ShapesBench(image_size=16, num_per_category=2 * len(ho.names()), seed=0, categories=["held_out"])
    for a, rel, b in ho.relations:
        got = {p.prompt for p in ten.prompts if p.meta["held_out"] == ho.relation_name(a, rel, b)}
        inv = sw.inverse_relation(rel)
        assert got == {f"a {a[0]} {a[1]} {words[rel]} a {b[0]} {b[1]}", f"a {b[0]} {b[1]} {words[inv]} a {a[0]} {a[1]}"}
    # no other prompt names or shows a held-out composition
    big = ShapesBench(image_size=16, num_per_category=60, seed=2)
    names = [f"{c} {s}" for c, s in ho.pairs] + [f"{c} {s}es" for c, s in ho.pairs] + [f"{c} {s}s" for c, s in ho.pairs]
    for p in big.prompts:
        if p.category == "held_out":
            continue
        assert not [n for n in names if n in p.prompt], p.prompt
        for scene in [p.target, *p.ref_scenes]:
            assert sw.HELD_OUT.violations(scene.objects) == [], p
    # a vocabulary without any held-out composition cannot have the category
    with pytest.raises(ValueError, match="held_out"):
        ShapesBench(num_per_category=2, colors=["green", "blue"], held_out=sw.HeldOut(pairs=(("red", "circle"),)))
    assert "held_out" not in {p.category for p in ShapesBench(num_per_category=2, categories=["counting"]).prompts}


def _score_pairs(result: dict) -> None:
    """Every category (and both overalls) carries a CI that contains its point estimate."""
    for cat, v in result["categories"].items():
        assert {"accuracy", "constraint_score", "n", "ci_low", "ci_high"} <= set(v), cat
        assert 0.0 <= v["ci_low"] <= v["accuracy"] <= v["ci_high"] <= 1.0, (cat, v)
    for name in ("overall", "overall_all", "overall_no_editing"):
        assert result[f"{name}_ci_low"] <= result[name] <= result[f"{name}_ci_high"], name


def test_category_cis_with_ground_truth_and_shuffled_images(bench: ShapesBench) -> None:
    truth = bench.score(bench.target_images())
    assert set(truth["categories"]) == set(CATEGORIES)
    _score_pairs(truth)
    assert truth["categories"]["held_out"]["accuracy"] == 1.0
    assert truth["held_out_kinds"] == {"pair": 1.0, "relation": 1.0}
    assert truth["ci"] == 0.95
    imgs = bench.target_images()
    shuffled = bench.score([imgs[(i + 5) % len(imgs)] for i in range(len(imgs))])
    _score_pairs(shuffled)
    assert shuffled["overall"] <= 0.25 and shuffled["overall_ci_high"] < truth["overall_ci_low"]
    # seeded: the same scores give the same intervals; a wider level gives a wider interval
    again = bench.score([imgs[(i + 5) % len(imgs)] for i in range(len(imgs))])
    assert again == shuffled
    half = [imgs[i] if i % 2 else imgs[(i + 5) % len(imgs)] for i in range(len(imgs))]
    r95, r50 = bench.score(half), bench.score(half, ci=0.5)
    for cat in CATEGORIES:
        lo95, hi95 = r95["categories"][cat]["ci_low"], r95["categories"][cat]["ci_high"]
        lo50, hi50 = r50["categories"][cat]["ci_low"], r50["categories"][cat]["ci_high"]
        assert lo95 <= lo50 <= hi50 <= hi95
    assert r95["overall_ci_high"] - r95["overall_ci_low"] > 0.05


def test_overall_leaves_out_editing_for_a_model_that_never_trained_on_edits(bench: ShapesBench) -> None:
    imgs = bench.target_images()
    blank = np.zeros_like(imgs[0]) + np.array(sw.BACKGROUND, np.uint8)
    no_edit = [blank if p.category == "editing" else im for p, im in zip(bench.prompts, imgs)]
    unknown = bench.score(no_edit)
    assert unknown["overall"] == unknown["overall_all"] < 0.9 and unknown["overall_excludes"] == []
    assert unknown["overall_no_editing"] >= 0.97
    t2i_only = bench.score(no_edit, trained_on_edits=False)
    assert t2i_only["overall"] == t2i_only["overall_no_editing"] >= 0.97
    assert t2i_only["overall_excludes"] == ["editing"] and "never trained on edit" in t2i_only["overall_note"]
    assert t2i_only["overall_all"] == unknown["overall_all"]  # both numbers are always there
    assert bench.score(no_edit, trained_on_edits=True)["overall"] == unknown["overall_all"]


def test_run_shapesbench_reports_the_baseline_and_stays_csv_readable(bench: ShapesBench) -> None:
    from unifusion.eval.commands import result_rows

    result = run_shapesbench(_oracle(bench, []), bench, batch_size=16, baseline=True, trained_on_edits=False)
    assert result["overall"] >= 0.97 and result["overall_excludes"] == ["editing"]
    base = result["baseline"]
    assert set(base) == {"overall", "overall_all", "overall_no_editing", *CATEGORIES}
    assert base["overall"] == 0.0
    assert all(r["prompt"] for r in result["items"])
    rows = result_rows("shapes", result)
    got = {(r["group"], r["metric"]) for r in rows}
    # the old rows are still there, the new fields are added beside them
    assert {("all", "overall"), ("all", "overall_micro"), ("all", "constraint_score")} <= got
    assert {(f"categories/{c}", m) for c in CATEGORIES for m in ("accuracy", "n", "ci_low", "ci_high")} <= got
    assert {("all", "overall_ci_low"), ("all", "overall_all"), ("baseline", "held_out")} <= got


def test_trained_on_edits_is_read_from_the_run_config(tmp_path) -> None:
    t2i = {"data": {"init_args": {"sources": [{"path": "a", "task": "t2i"}]}}}
    mixed = {"data": {"init_args": {"sources": [{"path": "a", "task": "t2i"}, {"path": "a", "task": "edit"}]}}}
    assert trained_on_edits_from_config(t2i) is False
    assert trained_on_edits_from_config(mixed) is True
    assert trained_on_edits_from_config({"model": {}}) is None
    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(mixed))
    assert trained_on_edits_from_run(str(run / "checkpoints" / "last.ckpt")) is True
    assert trained_on_edits_from_run(str(run)) is True
    assert trained_on_edits_from_run(str(tmp_path / "elsewhere.ckpt")) is None
