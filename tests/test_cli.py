"""Every YAML in experiments/ runs through the real CLI (`fit --trainer.fast_dev_run=true`)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from unifusion.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.yaml")
OVERLAYS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "experiments", "**", "*.yaml"), recursive=True)
    if os.path.abspath(p) != QUICKSTART
    # study files (a top-level `arms:`) are not fit overlays; tests/test_study.py parses each of their arms
    and "\narms:" not in open(p, encoding="utf-8").read()
)


def tiny_args() -> list[str]:
    """Overrides that make any experiment tiny; run inside a temporary working directory so
    the configs' relative artifacts/ and runs/ paths land there."""
    return [
        "--trainer.fast_dev_run=true",
        "--model.sampling.steps=3",
        "--data.init_args.batch_size=4",
        "--data.init_args.shuffle_buffer=8",
        "--data.init_args.generate_shapes.num=64",
        "--data.init_args.generate_shapes.val_num=16",
    ]


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cli_shared"))


@pytest.fixture
def in_shared_dir(shared_dir, monkeypatch) -> str:
    monkeypatch.chdir(shared_dir)
    return shared_dir


def run_cli(args: list[str]) -> None:
    main(args)


def test_top_level_help(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("fit", "generate", "data", "cache", "eval", "profile", "analyze"):
        assert cmd in out


@pytest.mark.parametrize(
    "args, needles",
    [
        (["analyze", "--help"], ["layer-weights", "layer-similarity", "layer-dropout", "all"]),
        (["profile", "--help"], ["-c CONFIG, --config CONFIG", "--steps", "Literal['torch', 'triton', 'auto']"]),
        (["cache", "--help"], ["-c CONFIG, --config CONFIG", "--out", "{float16,bfloat16,float32}"]),
        (
            ["data", "convert", "--help"],
            ["input_image", "edit_prompt", "edited_image", "source_img", "instruction", "target_img"],
        ),
        (["eval", "--help"], ["shapes", "recon", "dpg", "vqascore"]),
        (["eval", "recon", "--help"], ["--lpips_weights", "{alex,vgg}", "--max_tiles", "--dreamsim_model"]),
        (["eval", "dpg", "--help"], ["--judge_mode {logits,cot}", "--prompts_file"]),
    ],
)
def test_tool_help_shows_typed_choices(args, needles, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    for needle in needles:
        assert " ".join(needle.split()) in out, (needle, out)
    assert "--experiment" not in out


def test_experiment_arguments_are_split_like_fit():
    from unifusion.cli import split_experiment_args

    exp, rest = split_experiment_args(
        [
            "-c",
            "a.yaml",
            "--out",
            "x",
            "--config=b.yaml",
            "--data.init_args.batch_size",
            "8",
            "--model.x=1",
            "--steps",
            "2",
        ]
    )
    assert exp == ["-c", "a.yaml", "-c", "b.yaml", "--data.init_args.batch_size", "8", "--model.x=1"]
    assert rest == ["--out", "x", "--steps", "2"]


def test_a_bad_config_value_is_one_error_line(capsys):
    """A constructor's ValueError (wrapped by jsonargparse in a multi-line union error) is one line."""
    assert main(["fit", "-c", QUICKSTART, "--data.init_args.batch_size=0", "--trainer.max_steps=1"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: UniFusionDataModule.batch_size must be >= 1, got 0"], err
    assert "Traceback" not in err


def test_a_bare_boolean_flag_means_true():
    from unifusion.cli import _complete_bool_flags, eval_shapes, generate_command

    assert _complete_bool_flags(eval_shapes, ["--baseline", "--out", "x"]) == ["--baseline", "true", "--out", "x"]
    assert _complete_bool_flags(eval_shapes, ["--baseline", "false"]) == ["--baseline", "false"]
    assert _complete_bool_flags(generate_command, ["--verifi"]) == ["--verifi", "true"]  # bool | None


def test_fit_help_offers_run_dir(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--run_dir" in capsys.readouterr().out


def test_console_script_help_and_fit_help():
    exe = [sys.executable, "-m", "unifusion.cli"]
    r = subprocess.run([*exe, "fit", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--model.conditioner" in r.stdout and "--trainer" in r.stdout


def test_print_config_of_quickstart(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", QUICKSTART, "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "LayerwiseAttentionPooling" in out and "HFEncoder" in out and "DiT" in out


def test_unknown_key_fails_with_jsonargparse_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", QUICKSTART, "--model.conditioner.init_args.num_blokcs=3"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "num_blokcs" in err


def test_wrong_class_path_fails_with_jsonargparse_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  conditioner:\n    class_path: unifusion.conditioners.NoSuchConditioner\n")
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", QUICKSTART, "-c", str(bad)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "NoSuchConditioner" in err
    assert "Traceback" not in err


@pytest.mark.cli
def test_quickstart_fast_dev_run(in_shared_dir):
    before = set(glob.glob("runs/**/samples/*.png", recursive=True))
    run_cli(["fit", "-c", QUICKSTART, *tiny_args()])
    samples = set(glob.glob("runs/**/samples/*.png", recursive=True)) - before
    assert samples, "the SampleGrid callback wrote no PNG"


@pytest.mark.cli
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_fast_dev_run(overlay, in_shared_dir, capsys):
    args = ["fit", "-c", QUICKSTART, "-c", os.path.join(ROOT, overlay)]
    if overlay.split(os.sep)[1] == "gpu" and not torch.cuda.is_available():
        # GPU strategies can't run here: check they parse and resolve through the real CLI
        with pytest.raises(SystemExit) as e:
            run_cli([*args, "--print_config"])
        assert e.value.code in (0, None)
        assert "strategy" in capsys.readouterr().out
        return
    run_cli([*args, *tiny_args()])


@pytest.mark.cli
def test_tiny_vae_overlay_trains_in_latent_space_through_the_cli(in_shared_dir, capsys):
    """The latent-space overlay sets no DiT size: the DiT follows the tiny VAE's 4x8x8 latents."""
    vae = os.path.join(ROOT, "experiments", "autoencoders", "tiny_vae.yaml")
    run_dir = "runs/tiny_vae"
    args = ["fit", "-c", QUICKSTART, "-c", vae, *tiny_args()[1:], "--trainer.max_steps=2", "--run_dir", run_dir]
    assert main(args) == 0
    assert "fit done: step 2" in capsys.readouterr().out
    assert os.path.isfile("artifacts/tiny/vae/config.json")  # built offline on first use
    from unifusion.pipeline import load_pipeline

    pipeline = load_pipeline(ckpt=os.path.join(run_dir, "checkpoints", "last.ckpt"), device="cpu")
    assert pipeline.latent_shape() == (4, 8, 8)
    images = pipeline.generate(["a red circle"], steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16)
    samples = glob.glob(os.path.join(run_dir, "samples", "*.png"))
    assert samples, "the sample grid (decoded through the VAE) was not written"


def test_repository_root_does_not_shadow_installed_packages():
    """Commands run from the repository root (`python -m unifusion.cli`, `python -m pytest`) put
    it first on sys.path; a top-level folder there named like a dependency's import name (the
    kernels used to live in ./kernels, which hid Hugging Face's `kernels` package that
    transformers >= 5.2x imports) breaks `transformers` and `diffusers` at import time."""
    code = "import transformers.modeling_utils, diffusers.loaders.peft, unifusion.kernels; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    shadowing = [
        name
        for name in os.listdir(ROOT)
        if os.path.isdir(os.path.join(ROOT, name, "")) and os.path.isfile(os.path.join(ROOT, name, "__init__.py"))
    ]
    assert not shadowing, f"importable top-level folders in the repository root: {shadowing}"
