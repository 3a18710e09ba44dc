"""The tool commands on a tiny trained checkpoint: generate, edit, eval, analyze, predict, cache, data."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion.cli import load_pipeline, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.yaml")
SMALL = [
    "--model.sampling.steps=2",
    "--data.init_args.batch_size=4",
    "--data.init_args.shuffle_buffer=16",
    "--data.init_args.generate_shapes.num=64",
    "--data.init_args.generate_shapes.val_num=16",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    work = str(tmp_path_factory.mktemp("commands"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["fit", "-c", QUICKSTART, *SMALL, "--trainer.max_steps=3", "--run_dir", "runs/commands"]) == 0
    finally:
        os.chdir(cwd)
    ckpt = os.path.join(work, "runs", "commands", "checkpoints", "last.ckpt")
    assert os.path.isfile(ckpt), "fit wrote no last.ckpt"
    return work, ckpt


def test_checkpoint_reloads_with_its_config(trained):
    _, ckpt = trained
    pipeline = load_pipeline(ckpt=ckpt, device="cpu")
    assert type(pipeline.conditioner).__name__ == "LayerwiseAttentionPooling"
    assert pipeline.provenance["weights"] == "ema" and pipeline.provenance["global_step"] == 3
    state = torch.load(ckpt, weights_only=True)  # plain tensors and data: no pickle needed
    assert "ema_state_dict" in state and "encoder_metadata" in state
    # the frozen VLM is not stored in the checkpoint
    assert not any(k.startswith("encoder.") for k in state["state_dict"])


def test_generate_writes_png_and_sidecar_deterministically(trained, tmp_path, monkeypatch):
    work, ckpt = trained
    monkeypatch.chdir(work)
    out = tmp_path / "gen"
    code = main(
        [
            "generate",
            "--ckpt",
            ckpt,
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--out",
            str(out),
            "--seed",
            "7",
            "--steps",
            "3",
        ]
    )
    assert code == 0
    pngs = sorted(glob.glob(str(out / "*.png")))
    assert len(pngs) == 2
    side = json.loads(open(pngs[0].replace(".png", ".json")).read())
    assert side["prompt"] == "a red circle" and side["seed"] == 7 and side["steps"] == 3 and side["source"] == ckpt
    again = tmp_path / "again.png"
    args = ["generate", "--ckpt", ckpt, "--prompt", "a red circle", "--out", str(again), "--seed", "7", "--steps", "3"]
    assert main(args) == 0
    assert np.array_equal(np.asarray(Image.open(pngs[0])), np.asarray(Image.open(again)))


def test_edit_with_several_reference_images(trained, tmp_path, monkeypatch):
    work, ckpt = trained
    monkeypatch.chdir(work)
    refs = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        p = tmp_path / f"ref{i}.png"
        Image.new("RGB", (16, 16), color).save(p)
        refs += ["--image", str(p)]
    out = tmp_path / "edit.png"
    assert (
        main(["edit", "--ckpt", ckpt, *refs, "--instruction", "make it green", "--out", str(out), "--steps", "2"]) == 0
    )
    assert out.exists()
    side = json.loads((tmp_path / "edit.json").read_text())
    assert side["prompt"] == "make it green" and len(side["images"]) == 2


def test_eval_shapes_writes_json_csv_and_baseline(trained, tmp_path, monkeypatch):
    work, ckpt = trained
    monkeypatch.chdir(work)
    out = tmp_path / "eval"
    assert main(["eval", "shapes", "--ckpt", ckpt, "--out", str(out), "--num_per_category", "2", "--steps", "2"]) == 0
    res = json.loads((out / "shapes.json").read_text())
    assert 0.0 <= res["overall"] <= 1.0 and "baseline" in res
    assert (out / "shapes.csv").read_text().startswith("bench,group,metric,value")
    assert glob.glob(str(out / "events.out.tfevents.*"))


def test_analyses_write_images(trained, tmp_path, monkeypatch):
    work, ckpt = trained
    monkeypatch.chdir(work)
    out = tmp_path / "analysis"
    code = main(
        [
            "analyze",
            "--analysis",
            "all",
            "--ckpt",
            ckpt,
            "--out",
            str(out),
            "--prompts",
            "[a red circle, a blue square]",
        ]
    )
    assert code == 0
    for name in ("layer_weights", "layer_similarity", "layer_dropout"):
        img = Image.open(out / f"{name}.png")
        assert img.width > 50 and img.height > 30
    weights = np.loadtxt(out / "layer_weights.csv", delimiter=",")
    assert weights.size == len(load_pipeline(ckpt=ckpt, device="cpu").conditioner.layer_ids)
    sim = np.loadtxt(out / "layer_similarity.csv", delimiter=",")
    assert np.allclose(np.diag(sim), 1.0, atol=1e-4)


def test_predict_writes_images_for_a_prompt_file(trained, tmp_path, monkeypatch):
    work, ckpt = trained
    monkeypatch.chdir(work)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green triangle\na blue square\n")
    out = tmp_path / "pred"
    code = main(
        [
            "predict",
            "-c",
            QUICKSTART,
            *SMALL,
            f"--ckpt_path={ckpt}",
            "--data=unifusion.inference.PromptDataModule",
            f"--data.prompts_file={prompts}",
            "--data.batch_size=2",
            "--trainer.callbacks+=unifusion.inference.ImageWriter",
            f"--trainer.callbacks.out_dir={out}",
        ]
    )
    assert code == 0
    assert len(glob.glob(str(out / "*.png"))) == 3


def test_cache_command_then_train_from_cache_without_loading_the_vlm(trained, tmp_path, monkeypatch, capsys):
    work, ckpt = trained
    monkeypatch.chdir(work)
    cache = tmp_path / "cache"
    # -c and --config= mean the same as for fit, and fit's overrides pass through
    args = ["cache", f"--config={QUICKSTART}", "--data.init_args.generate_shapes.num=64", "--out", str(cache)]
    assert main([*args, "--batch_size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("cache: 64 samples (0 skipped)") == 1, out  # one summary, not the result twice
    meta = json.loads((cache / "cache_meta.json").read_text())
    assert meta["layer_ids"]
    cached_src = f"--data.init_args.sources=[{{path: {cache}, task: t2i, cached: true}}]"
    # no sample grid: sampling from prompts is the one thing that needs the live VLM
    cli = main_no_run(
        [
            *SMALL,
            cached_src,
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks=[]",
        ]
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert not cli.model.encoder.loaded, "training from the cache must not load the VLM"
    # a subset of the cached layers is selected from the cache ...
    sub = main_no_run(
        [
            *SMALL,
            cached_src,
            "--model.encoder.init_args.layers=[0, 2]",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks=[]",
        ]
    )
    sub.before_fit()
    sub.trainer.fit(sub.model, sub.datamodule)
    # ... while a cache made by another encoder configuration is refused, not silently used
    with pytest.raises(ValueError, match="model_dtype"):
        main_no_run([*SMALL, cached_src, "--model.encoder.init_args.dtype=bfloat16"]).before_fit()


def main_no_run(extra: list[str]):
    from unifusion.cli import lightning_main

    return lightning_main(["-c", QUICKSTART, *extra], run=False)


def test_data_shapes_command(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--num", "20", "--seed", "3", "--edit_fraction", "0.5"]) == 0
    tars = glob.glob(str(out / "*.tar"))
    assert tars and json.loads((out / "manifest.json").read_text())["counts"]["edit"] == 10


def test_eval_recon_reaches_lpips_with_local_weights(trained, tmp_path, monkeypatch, capsys):
    """`--lpips_weights PATH` (a torchvision AlexNet state dict here, random) reaches LPIPS."""
    from unifusion.eval.recon import _ALEX_SLICES, LPIPS

    work, ckpt = trained
    monkeypatch.chdir(work)
    # torchvision's layout: features.<index>.weight/bias
    backbone = LPIPS("alex").net
    weights = {}
    for k, (a, b) in enumerate(_ALEX_SLICES, start=1):
        for i in range(a, b):
            layer = getattr(backbone, f"slice{k}")._modules[str(i)]
            for name, value in layer.state_dict().items():
                weights[f"features.{i}.{name}"] = value
    path = tmp_path / "alexnet.pth"
    torch.save(weights, path)
    out = tmp_path / "recon"
    args = ["eval", "recon", "--ckpt", ckpt, "--out", str(out), "--num_images", "2", "--steps", "2"]
    assert main([*args, "--lpips_weights", str(path), "--ms_ssim_small", "skip"]) == 0
    res = json.loads((out / "recon.json").read_text())
    assert {"psnr", "ssim", "lpips"} <= set(res) and "ms_ssim" not in res
    assert "lpips=" in capsys.readouterr().out
    # a missing weights file fails before the model is even loaded
    assert main([*args, "--lpips_weights", str(tmp_path / "nope.pth")]) == 1
    assert "--lpips_weights" in capsys.readouterr().err
