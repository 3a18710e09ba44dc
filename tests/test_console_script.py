"""Every ``unifusion`` command through the installed console script, in a subprocess.

For each command: a success (exit status 0 and a short summary on stdout) and one user error
(non-zero exit status, one ``error:`` line or the argument parser's message, no traceback).
One tiny model is trained once (module fixture); the other commands then run two at a time.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.yaml")
STUDY = os.path.join(ROOT, "experiments", "studies", "conditioners.yaml")
EXE = shutil.which("unifusion")
# a tiny run of the quickstart (2 DiT steps to sample, 32 training scenes, 8 validation scenes)
SMALL = [
    "--model.sampling.steps=2",
    "--data.init_args.batch_size=4",
    "--data.init_args.shuffle_buffer=8",
    "--data.init_args.generate_shapes.num=32",
    "--data.init_args.generate_shapes.val_num=8",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
VAL = "--data.init_args.val_sources=[{path: artifacts/shapes/val, task: t2i}]"

pytestmark = pytest.mark.skipif(
    EXE is None, reason="the `unifusion` console script is not installed (pip install -e .)"
)


@dataclass
class Result:
    args: list[str]
    rc: int
    out: str
    err: str
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"unifusion {shlex.join(self.args)} -> {self.rc} ({self.seconds:.0f} s)\n"
            f"--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"
        )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "UNIFUSION_DEBUG"}
    # two commands run at once on a small machine: one thread each
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run(args: list[str], cwd: str, timeout: int = 900, and_echo_ok: bool = False) -> Result:
    """The installed console script in a subprocess; ``and_echo_ok``: as ``unifusion ... && echo ok``."""
    t0 = time.time()
    if and_echo_ok:
        cmd = ["bash", "-c", f"{shlex.quote(EXE)} {shlex.join(args)} && echo ok"]
    else:
        cmd = [EXE, *args]
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return Result(args, r.returncode, r.stdout, r.stderr, time.time() - t0)


def assert_user_error(r: Result, *needles: str, rc: int = 1) -> None:
    """Non-zero exit with the expected status, one clear line naming the problem, no traceback."""
    assert r.rc == rc, r
    assert "Traceback" not in r.err, r
    if rc == 1:  # our own errors: exactly one `error:` line
        lines = [line for line in r.err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, r
        for needle in needles:
            assert needle in lines[0], (needle, r)
    else:  # the argument parser's message
        for needle in needles:
            assert needle in r.err, (needle, r)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> str:
    """A working directory with a few input files."""
    d = str(tmp_path_factory.mktemp("console"))
    import numpy as np
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(os.path.join(d, "ref.png"))
    with open(os.path.join(d, "prompts.txt"), "w") as f:
        f.write("a red circle\na blue square\n")
    with open(os.path.join(d, "random.pt"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    open(os.path.join(d, "empty.ckpt"), "wb").close()
    # the data and the tiny VLM the configs would build on first use, built once here so the
    # commands running side by side do not all build them at the same time
    from unifusion.data.shards import write_shapes_shards
    from unifusion.encoders.tiny import ensure_tiny_vlm

    write_shapes_shards(os.path.join(d, "artifacts", "shapes", "train"), num=32, seed=0, size=16)
    write_shapes_shards(os.path.join(d, "artifacts", "shapes", "val"), num=8, seed=1, size=16)
    ensure_tiny_vlm(os.path.join(d, "artifacts", "tiny", "llava"), "llava")
    return d


CKPT = os.path.join("runs", "tiny", "checkpoints", "last.ckpt")
PIPELINE = os.path.join("runs", "tiny", "pipeline")


def independent_cases() -> dict[str, list[str]]:
    """Commands that do not need the trained model (they run while it trains)."""
    lightning = ["-c", QUICKSTART, *SMALL]
    return {
        "fit_error": ["fit", *lightning, "-c", "no_such_overlay.yaml"],
        "validate_error": ["validate", *lightning, VAL, "--ckpt_path=random.pt"],
        "test_error": ["test", *lightning, VAL, "--ckpt_path=missing.ckpt"],
        "predict_error": ["predict", *lightning, "--ckpt_path=empty.ckpt"],
        "generate_error": ["generate", "--ckpt", "random.pt", "--prompt", "a red circle"],
        "generate_missing_model": ["generate", "--model", "runs/no_such_run/pipeline", "--prompt", "a red circle"],
        "edit_error": ["edit", "--ckpt", CKPT, "--image", "missing.png", "--instruction", "make it blue"],
        "eval_error": ["eval", "dpg", "--ckpt", CKPT, "--prompts_file", "missing.csv", "--judge", "no_judge"],
        "eval_typed_error": ["eval", "recon", "--ckpt", CKPT, "--lpips_net", "squeeze"],
        "analyze_error": ["analyze", "--analysis", "layer-weigths", "--ckpt", CKPT],
        "cache": ["cache", f"--config={QUICKSTART}", *SMALL, "--out", "cache", "--batch_size", "8"],
        "cache_error": ["cache", "--out", "cache_without_config"],
        "data": ["data", "shapes", "--out", "more_shapes", "--num", "8", "--seed", "3"],
        "data_error": ["data", "convert", "--kind", "image_folder", "--src", "no_such_folder", "--out", "x"],
        "profile": ["profile", "-c", QUICKSTART, *SMALL, "--steps", "1", "--out", "prof"],
        "profile_error": ["profile", "--steps", "1"],
        "export_error": ["export", "--ckpt", "empty.ckpt", "--out", "exported_empty"],
        "study": ["study", "-c", STUDY, "--dry_run", "true"],
        "study_error": ["study", "-c", QUICKSTART, "--dry_run", "true"],
    }


def model_cases() -> dict[str, list[str]]:
    """Commands on the tiny trained model."""
    lightning = ["-c", QUICKSTART, *SMALL]
    return {
        "validate": ["validate", *lightning, VAL, f"--ckpt_path={CKPT}"],
        "test": ["test", *lightning, VAL, f"--ckpt_path={CKPT}"],
        "predict": [
            "predict",
            *lightning,
            f"--ckpt_path={CKPT}",
            "--data=unifusion.inference.PromptDataModule",
            "--data.prompts_file=prompts.txt",
            "--trainer.callbacks+=unifusion.inference.ImageWriter",
            "--trainer.callbacks.out_dir=pred",
        ],
        "generate": ["generate", "--ckpt", CKPT, "--prompt", "a red circle", "--out", "gen/one.png", "--steps", "2"],
        "edit": [
            *("edit", "--model", PIPELINE, "--image", "ref.png", "--instruction", "make it blue"),
            *("--out", "edited.png", "--steps", "2"),
        ],
        "eval": [
            *("eval", "shapes", "--model", PIPELINE, "--out", "ev"),
            *("--num_per_category", "1", "--steps", "2", "--baseline", "false"),
        ],
        "analyze": ["analyze", "--analysis", "layer-weights", "--ckpt", CKPT, "--out", "an"],
        "export": ["export", "--ckpt", CKPT, "--out", "exported"],
    }


@pytest.fixture(scope="module")
def results(work) -> dict[str, Result]:
    """Every case, two at a time: the tiny model trains (``fit ... && echo ok``, through a shell)
    while the independent commands run; then the commands that use it."""
    fit_args = ["fit", "-c", QUICKSTART, *SMALL, "--trainer.max_steps=2", "--run_dir", "runs/tiny"]
    out: dict[str, Result] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        fit = pool.submit(run, fit_args, work, 900, True)
        independent = {name: pool.submit(run, args, work) for name, args in independent_cases().items()}
        out["fit"] = fit.result()
        if out["fit"].rc == 0:
            dependent = {name: pool.submit(run, args, work) for name, args in model_cases().items()}
        else:
            dependent = {}
        out.update({name: f.result() for name, f in {**independent, **dependent}.items()})
    # seen with `pytest -s`: where the time goes
    print(
        "\n"
        + "\n".join(f"{r.seconds:6.1f} s  {name}" for name, r in sorted(out.items(), key=lambda kv: -kv[1].seconds))
    )
    return out


# ------------------------------------------------------------------------------ fit
def test_fit_exits_0_prints_a_summary_and_ok(results, work):
    fitted = results["fit"]
    assert fitted.rc == 0, fitted
    lines = fitted.out.strip().splitlines()
    assert lines[-1] == "ok", fitted
    assert any(line.startswith("fit done: step 2") and CKPT in line for line in lines), fitted
    assert os.path.isfile(os.path.join(work, CKPT))
    assert "UniFusionCLI object" not in fitted.out
    # the LightningCLI "args and sys.argv" warning is gone
    assert "not recommended to provide both args" not in fitted.err
    # library INFO messages are visible by default (here: the data module's realised task mix)
    assert "realised task mix" in fitted.err, fitted


def test_fit_with_a_missing_config_file(results):
    assert_user_error(results["fit_error"], "no_such_overlay.yaml", "does not exist")
    assert results["fit_error"].seconds < 30  # found before Lightning is imported


# ------------------------------------------------------------------------------ validate / test / predict
def test_validate(results):
    r = results["validate"]
    assert r.rc == 0, r
    assert "validate done: val/loss=" in r.out, r


def test_validate_with_a_corrupt_checkpoint(results):
    assert_user_error(results["validate_error"], "random.pt", "not a PyTorch checkpoint")


def test_test(results):
    r = results["test"]
    assert r.rc == 0, r
    assert "test done:" in r.out and "test/loss" in r.out, r


def test_test_with_a_missing_checkpoint(results):
    assert_user_error(results["test_error"], "missing.ckpt", "does not exist")


def test_predict(results, work):
    r = results["predict"]
    assert r.rc == 0, r
    assert "predict done:" in r.out and "pred" in r.out, r
    assert len([f for f in os.listdir(os.path.join(work, "pred")) if f.endswith(".png")]) == 2


def test_predict_with_an_empty_checkpoint(results):
    assert_user_error(results["predict_error"], "empty.ckpt", "empty")


# ------------------------------------------------------------------------------ tools
def test_generate(results, work):
    r = results["generate"]
    assert r.rc == 0, r
    assert r.out.strip() == "generate: wrote gen/one.png (+ JSON sidecar)", r
    assert os.path.isfile(os.path.join(work, "gen", "one.json"))


def test_generate_with_a_random_file_as_checkpoint(results):
    assert_user_error(results["generate_error"], "random.pt")


def test_generate_with_a_missing_model_folder(results):
    # the message names the missing folder, not huggingface_hub's rules for repo ids
    r = results["generate_missing_model"]
    assert_user_error(r, "runs/no_such_run/pipeline", "does not exist")
    assert "Repo id" not in r.err, r


def test_edit(results, work):
    r = results["edit"]
    assert r.rc == 0, r
    assert "edit: wrote edited.png" in r.out, r
    assert os.path.isfile(os.path.join(work, "edited.png"))


def test_edit_with_a_missing_image(results):
    assert_user_error(results["edit_error"], "missing.png")


def test_eval(results, work):
    r = results["eval"]
    assert r.rc == 0, r
    assert r.out.startswith("eval shapes: overall "), r
    # the model was exported by a t2i-only fit, so editing is left out of overall, and said so
    assert "editing excluded from overall" in r.out and "single_object" in r.out, r
    assert os.path.isfile(os.path.join(work, "ev", "shapes.json"))


def test_eval_errors(results):
    assert_user_error(results["eval_error"], "missing.csv", "does not exist")
    assert_user_error(results["eval_typed_error"], "alex", "vgg", rc=2)


def test_analyze(results, work):
    r = results["analyze"]
    assert r.rc == 0, r
    assert r.out.startswith("analyze: wrote"), r
    assert os.path.isfile(os.path.join(work, "an", "layer_weights.png"))


def test_analyze_lists_its_choices(results):
    assert_user_error(results["analyze_error"], "layer-weigths", "all", rc=2)


def test_cache_with_config_equals(results, work):
    r = results["cache"]
    assert r.rc == 0, r
    assert r.out.startswith("cache: 32 samples"), r
    assert os.path.isfile(os.path.join(work, "cache", "cache_meta.json"))


def test_cache_without_config(results):
    assert_user_error(results["cache_error"], "-c CONFIG")


def test_data(results):
    r = results["data"]
    assert r.rc == 0, r
    assert r.out.strip() == "data shapes: wrote more_shapes: t2i 8, recon 0, edit 0, shards 1", r


def test_data_error(results):
    assert_user_error(results["data_error"], "no_such_folder")


def test_profile(results, work):
    r = results["profile"]
    assert r.rc == 0, r
    assert "profile: trace written to prof" in r.out, r
    assert any(f.endswith(".pt.trace.json") for f in os.listdir(os.path.join(work, "prof")))


def test_profile_without_config(results):
    assert_user_error(results["profile_error"], "-c CONFIG")


def test_export(results, work):
    r = results["export"]
    assert r.rc == 0, r
    assert r.out.startswith("export: wrote pipeline folder exported"), r
    assert os.path.isfile(os.path.join(work, "exported", "config.json"))


def test_export_of_an_empty_checkpoint(results):
    assert_user_error(results["export_error"], "empty.ckpt", "empty")


def test_study_dry_run(results):
    r = results["study"]
    assert r.rc == 0, r
    assert r.out.startswith("study conditioners:"), r


def test_study_without_a_study_file(results):
    assert_user_error(results["study_error"], "study file")


def test_top_level_help_and_unknown_command(work):
    from unifusion.cli import LIGHTNING_COMMANDS, TOOL_COMMANDS

    r = run(["--help"], work)
    assert r.rc == 0 and all(c in r.out for c in (*LIGHTNING_COMMANDS, *TOOL_COMMANDS)), r
    r = run(["nonsense"], work)
    assert r.rc == 2 and "unknown command" in r.err, r
