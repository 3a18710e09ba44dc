"""`unifusion study`: study files, the plan, the report, resumability, and a 2-arm x 2-seed
study through the real CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from unifusion import study as st
from unifusion.cli import main
from unifusion.errors import UserError
from unifusion.eval.shapesbench import CATEGORIES

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "experiments" / "studies"
PAPER_ARMS = ["last_layer", "kv_fusion", "hsi", "lap"]
ABLATION_ARMS = ["lap_no_refiner", "lap_per_layer"]


def _cli(*args: str, cwd: str | os.PathLike | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unifusion.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


# ---------------------------------------------------------------------------------------
# the shipped study files


@pytest.mark.parametrize("name", ["conditioners.yaml", "conditioners_gpu.yaml"])
def test_shipped_study_files_plan_the_paper_arms(name: str, tmp_path: Path) -> None:
    study = st.load_study(str(STUDIES / name))
    assert study.default_arms == PAPER_ARMS
    assert set(ABLATION_ARMS) <= set(study.arms) and {"parauni", "scalar_mix", "krea2"} <= set(study.arms)
    assert len(study.seeds) >= 3 and "seed_everything" in study.seed_keys
    assert study.cache and study.eval["baseline"]
    plan = st.build_plan(study, list(study.arms), study.seeds[:2], str(tmp_path / "s"))
    assert plan["cache_cmd"][0] == "cache" and plan["cache_cmd"][-2:] == ["--out", plan["cache_dir"]]
    assert len(plan["runs"]) == 2 * len(study.arms)
    for run in plan["runs"]:
        arm = study.arms[run.arm]
        a = run.args
        assert a[0] == "fit" and f"--run_dir={run.run_dir}" in a
        assert run.run_dir == str(tmp_path / "s" / "runs" / run.arm / f"seed{run.seed}")
        # the order that makes the budget equal: base, the arm's overlays, shared, cached data, the arm's overrides
        files = [a[i + 1] for i, x in enumerate(a) if x == "-c"]
        assert files == [*study.base, *arm.configs, plan["shared_yaml"], plan["cache_yaml"]]
        assert f"--seed_everything={run.seed}" in a and "--trainer.callbacks+=unifusion.study.StudyRecorder" in a
        for k in arm.overrides:
            assert any(x.startswith(f"--{k}=") for x in a)
    no_refiner = next(r for r in plan["runs"] if r.arm == "lap_no_refiner")
    assert "--model.refiner=null" in no_refiner.args
    # the equal budget: same steps and schedule for every arm
    cfg = plan["config"]
    assert st._get(cfg, "trainer.max_steps") == st._get(cfg, "model.lr_scheduler.init_args.total_steps")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conditioners.yaml", "conditioners_gpu.yaml"])
def test_every_arm_parses_through_the_real_cli(name: str, tmp_path: Path, capsys) -> None:
    """Each arm's exact `fit` arguments resolve in LightningCLI (classes, keys, overlay order)."""
    study = st.load_study(str(STUDIES / name))
    plan = st.build_plan(study, list(study.arms), [0], str(tmp_path / "s"))
    st.write_overlays(plan)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the study files name experiments/... relative to the repository
    try:
        for run in plan["runs"]:
            with pytest.raises(SystemExit) as e:
                main([*run.args, "--print_config"])
            assert e.value.code in (0, None), run.arm
            printed = yaml.safe_load(capsys.readouterr().out)
            assert printed["trainer"]["max_steps"] == st._get(plan["config"], "trainer.max_steps")
            assert printed["data"]["init_args"]["sources"][0]["cached"] is True
            names = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
            assert "StudyRecorder" in names, run.arm
            if run.arm == "lap_no_refiner":
                assert printed["model"]["refiner"] is None
    finally:
        os.chdir(cwd)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    r = _cli(
        "study",
        "-c",
        str(STUDIES / "conditioners.yaml"),
        "--dry_run=true",
        "--out",
        str(tmp_path / "studies"),
        "--seeds",
        "2",
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "4 arms x 2 seeds = 8 runs" in out
    for arm in PAPER_ARMS:
        assert f"arm {arm}: experiments/conditioners/{arm}.yaml" in out
        for seed in (0, 1):
            assert f"[new] {arm}/seed{seed}: unifusion fit -c experiments/quickstart.yaml" in out
    assert "feature cache (to build): unifusion cache" in out and "estimated time:" in out
    assert "trainer.max_steps=" in out and "--seed_everything=1" in out
    assert not (tmp_path / "studies").exists()
    # the ablation pass is selected by name
    r = _cli(
        "study",
        "-c",
        "experiments/studies/conditioners.yaml",
        "--dry_run=true",
        "--arms",
        "lap_no_refiner,lap_per_layer",
        # its own --out: the checkout's runs/studies/ may hold a developer's earlier study,
        # whose folders a changed study file rightly refuses to reuse
        "--out",
        str(tmp_path / "studies"),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "2 arms x 3 seeds = 6 runs" in r.stdout and "--model.refiner=null" in r.stdout
    assert not (tmp_path / "studies").exists()


def test_mistakes_fail_with_one_clear_line(tmp_path: Path, capsys) -> None:
    spec = STUDIES / "conditioners.yaml"
    assert main(["study", "-c", str(spec), "--arms", "lap,lapp", "--dry_run=true"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown arm(s) lapp" in err and "lap_per_layer" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"base": [str(ROOT / "experiments/quickstart.yaml")], "arms": {"x": {"configs": ["nope.yaml"]}}})
    )
    assert main(["study", "-c", str(bad), "--dry_run=true"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.yaml" in err and "does not exist" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"base": [str(ROOT / "experiments/quickstart.yaml")], "seed": 3, "arms": {"x": {}}}))
    assert main(["study", "-c", str(typo), "--dry_run=true"]) == 1
    assert "unknown keys ['seed']" in capsys.readouterr().err
    assert main(["study", "-c", str(ROOT / "experiments/quickstart.yaml"), "--dry_run=true"]) == 1
    assert "exactly one study file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# resumability and the run-folder bookkeeping (no training)


def _tiny_study(tmp_path: Path, **extra) -> st.Study:
    spec = {
        "name": "t",
        "base": [str(ROOT / "experiments/quickstart.yaml")],
        "overrides": {"trainer.max_steps": 3},
        "seeds": 2,
        "arms": {"a": {}, "b": {"overrides": {"model.refiner": None}}},
        **extra,
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    return st.load_study(str(path))


def test_run_states_follow_the_files_and_changed_settings_are_refused(tmp_path: Path) -> None:
    study = _tiny_study(tmp_path)
    root = str(tmp_path / "out")
    plan = st.build_plan(study, ["a"], [0], root)
    run = plan["runs"][0]
    assert st._run_state(run) == "new"
    ckpt = Path(run.run_dir) / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert st._run_state(run) == "resume"
    (Path(run.run_dir) / st.TRAIN_FILE).write_text(json.dumps({"finished": False}))
    assert st._run_state(run) == "resume"  # interrupted: fit resumes from last.ckpt
    (Path(run.run_dir) / st.TRAIN_FILE).write_text(json.dumps({"finished": True}))
    assert st._run_state(run) == "evaluate"  # trained: only ShapesBench is left
    (Path(run.run_dir) / st.RESULT_FILE).write_text("{}")
    assert st._run_state(run) == "done"
    (Path(run.run_dir) / st.RUN_FILE).write_text(json.dumps({"args": run.args, "settings": run.settings}))
    st._check_unchanged(run)
    changed = st.build_plan(_tiny_study(tmp_path, overrides={"trainer.max_steps": 4}), ["a"], [0], root)["runs"][0]
    with pytest.raises(UserError, match="other settings"):
        st._check_unchanged(changed)


def test_shards_written_before_the_held_out_split_are_refused(tmp_path: Path) -> None:
    from unifusion.data import shapes as sw

    data = tmp_path / "old_shapes"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"generator": "shapes", "counts": {"t2i": 10}}))
    study = _tiny_study(tmp_path, overrides={"data.init_args.sources": [{"path": str(data), "task": "t2i"}]})
    plan = st.build_plan(study, ["a"], [0], str(tmp_path / "out"))
    with pytest.raises(UserError, match="held-out"):
        st._check_source_data(study, plan)
    (data / "manifest.json").write_text(json.dumps({"generator": "shapes", "held_out": sw.HELD_OUT.names()}))
    st._check_source_data(study, plan)  # current shards pass


def test_concurrent_fits_share_the_cores(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU slots: CPU threads are shared
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert st._job_envs(1, None) == [{}]  # one fit: torch's own default
    assert st._job_envs(2, None) == [{"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}] * 2
    assert st._job_envs(1, 1) == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}]
    spec = st.load_study(str(STUDIES / "conditioners.yaml"))
    assert spec.jobs == 2 and spec.threads == 1


# ---------------------------------------------------------------------------------------
# the report, from synthetic finished runs


def _fake_runs(study: st.Study, root: str, quality: dict[str, float], n: int = 10) -> None:
    """Finished run folders whose per-prompt correctness is drawn with the given accuracy."""
    cats = [c for c in CATEGORIES if c != "editing"]
    rng = np.random.default_rng(0)
    for arm, q in quality.items():
        for seed in study.seeds:
            run_dir = Path(root) / "runs" / arm / f"seed{seed}"
            items = [
                {"category": c, "correct": float(rng.random() < q), "constraint_score": 1.0}
                for c in cats
                for _ in range(n)
            ]
            from unifusion.eval.shapesbench import summarize

            result = summarize(items, cats, trained_on_edits=False)
            base = summarize([{**it, "correct": 0.0} for it in items], cats, trained_on_edits=False)
            result["baseline"] = {"overall": base["overall"], **{c: 0.0 for c in cats}}
            result["items"] = items
            result["editing_note"] = "editing not evaluated: the run never trained on edit samples"
            st._write_json(str(run_dir / st.EVAL_JSON), result)
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / st.TRAIN_FILE).write_text(
                json.dumps(
                    {
                        "finished": True,
                        "global_step": 3,
                        "trainable_params": 1000 + len(arm),
                        "params_by_part": {"conditioner": 10, "refiner": 5, "backbone": 985},
                        "final_loss": 0.5,
                        "batch_size": 4,
                        "it_per_s": 2.0,
                    }
                )
            )
            plan_run = st.RunPlan(arm, seed, str(run_dir), [])
            row = st._result_row(study, plan_run, result, eval_s=1.0)
            st._write_json(str(run_dir / st.RESULT_FILE), row)


def test_summary_table_plot_csv_and_hparams(tmp_path: Path) -> None:
    study = _tiny_study(tmp_path, seeds=3, arms={"good": {}, "close": {}, "bad": {}})
    root = str(tmp_path / "out")
    _fake_runs(study, root, {"good": 0.9, "close": 0.85, "bad": 0.1})
    out = st.summarize_study(study, root)
    assert out["rows"] == 9
    with open(out["results_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["arm"] for r in rows} == {"good", "close", "bad"}
    cats = [c for c in CATEGORIES if c != "editing"]
    for field in ["arm", "seed", "trainable_params", "steps", "final_loss", "train_s", "eval_s", "overall", *cats]:
        assert field in rows[0], field
    md = Path(out["summary_md"]).read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["arm", "params", "overall"] and header[3 : 3 + len(cats)] == cats
    body = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert set(body) == {"`good`", "`close`", "`bad`", "unconditional baseline"}
    assert body["`good`"].split("|")[3].strip().startswith("**")  # best overall in bold
    assert body["`close`"].split("|")[3].strip().startswith("≈")  # its interval overlaps: a tie
    bad_cell = body["`bad`"].split("|")[3].strip()
    assert not bad_cell.startswith(("≈", "**")) and "±" in bad_cell and "[" in bad_cell
    assert "editing excluded" in md and "Editing not evaluated: the run never trained on edit" in md
    assert "Equal budget: 3 steps" in md
    img = Image.open(out["summary_png"])
    assert img.size[0] >= 500 and img.size[1] >= 300
    events = list(Path(out["hparams"]).rglob("events.out.tfevents.*"))
    assert len(events) >= 9
    # rewriting keeps one hparams entry per run
    st.summarize_study(study, root)
    assert len(list(Path(out["hparams"]).rglob("events.out.tfevents.*"))) == len(events)


def test_arm_interval_is_seeded_and_covers_seeds_and_prompts() -> None:
    rng = np.random.default_rng(1)
    runs = [{"counting": list((rng.random(20) < p).astype(float))} for p in (0.3, 0.5, 0.7)]
    lo, hi = st.arm_interval(runs, ["counting"])
    assert (lo, hi) == st.arm_interval(runs, ["counting"])
    mean = np.mean([np.mean(r["counting"]) for r in runs])
    assert lo < mean < hi
    one_seed_lo, one_seed_hi = st.arm_interval(runs[1:2], ["counting"])
    assert one_seed_hi - one_seed_lo > 0.1  # prompts alone already spread


# ---------------------------------------------------------------------------------------
# a whole study through the real CLI

TINY_BUDGET = {
    "trainer": {
        "log_every_n_steps": 1,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": 0},
            }
        ],
    }
}


@pytest.mark.slow
@pytest.mark.cli
def test_two_arms_two_seeds_through_the_cli_and_resume(tmp_path: Path) -> None:
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump(TINY_BUDGET))
    spec = {
        "name": "tiny",
        "base": [str(ROOT / "experiments/quickstart.yaml"), "budget.yaml"],
        "overrides": {
            "trainer.max_steps": 2,
            "model.lr_scheduler.init_args": {"warmup_steps": 1, "total_steps": 2},
            "model.backbone.init_args.width": 32,
            "model.sampling.steps": 2,
            "data.init_args": {
                "batch_size": 4,
                "shuffle_buffer": 8,
                "sources": [{"path": "artifacts/shapes/tiny", "task": "t2i"}],
                "generate_shapes": {"num": 24},
            },
        },
        "seeds": 2,
        "eval": {"num_per_category": 1, "batch_size": 16},
        "arms": {
            "last_layer": {"configs": [str(ROOT / "experiments/conditioners/last_layer.yaml")]},
            "lap": {"configs": [str(ROOT / "experiments/conditioners/lap.yaml")]},
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    # two fits at a time (the 2 cores of CI); the study itself is the same either way
    r = _cli("study", "-c", "tiny.yaml", "--jobs", "2", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = tmp_path / "runs" / "studies" / "tiny"
    assert (root / "cache" / "cache_meta.json").is_file()
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["arm"], r["seed"]) for r in rows) == [
        ("lap", "0"),
        ("lap", "1"),
        ("last_layer", "0"),
        ("last_layer", "1"),
    ]
    params = {r["arm"]: int(r["trainable_params"]) for r in rows}
    assert params["lap"] > params["last_layer"] > 0  # "more parameters" is visible
    for row in rows:
        assert int(row["steps"]) == 2 and float(row["train_s"]) > 0 and float(row["eval_s"]) > 0
        assert 0.0 <= float(row["overall"]) <= 1.0 and row["held_out"] != "" and row["baseline_overall"] != ""
        run = Path(tmp_path / row["run_dir"])
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
        assert list(run.glob("events.out.tfevents.*")) and (run / "eval" / "shapesbench.json").is_file()
    md = (root / "summary.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    cats = [c for c in CATEGORIES if c != "editing"]
    assert [c.strip() for c in lines[0].strip("|").split("|")][2 : 3 + len(cats)] == ["overall", *cats]
    assert {line.split("|")[1].strip() for line in lines[2:]} == {"`last_layer`", "`lap`", "unconditional baseline"}
    assert (root / "summary.png").is_file() and list((root / "hparams").rglob("events.out.tfevents.*"))
    # a second invocation trains nothing: every run is skipped, the table is rewritten
    logs = {p: p.stat().st_mtime for p in root.rglob("fit.log")}
    r = _cli("study", "-c", "tiny.yaml", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("finished earlier, skipped") == 4 and "0 trained" in r.stdout
    assert {p: p.stat().st_mtime for p in root.rglob("fit.log")} == logs
    r = _cli("study", "-c", "tiny.yaml", "--dry_run=true", cwd=tmp_path)
    assert r.stdout.count("[done]") == 4 and "feature cache (there)" in r.stdout
