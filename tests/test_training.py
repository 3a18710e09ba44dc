"""Issue 7: resume, atomic checkpoints, non-finite losses, EMA, weights-only init, T5 -> VLM handoff, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from unifusion.callbacks import AtomicCheckpointIO
from unifusion.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.yaml")


def small(extra: list[str] | None = None) -> list[str]:
    return [
        "--model.sampling.steps=2",
        "--data.init_args.batch_size=4",
        "--data.init_args.shuffle_buffer=16",
        "--data.init_args.generate_shapes.num=96",
        "--data.init_args.generate_shapes.val_num=16",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *(extra or []),
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("training"))


def losses(path: str) -> dict[int, float]:
    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def ckpt_callback(every: int) -> list[str]:
    return [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath=ckpts_{every}",
        "--trainer.callbacks.save_last=true",
        f"--trainer.callbacks.every_n_train_steps={every}",
    ]


def test_killed_and_resumed_run_reproduces_the_uninterrupted_losses(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    common = ["fit", "-c", QUICKSTART, *small()]
    # uninterrupted: 8 steps
    main(
        [
            *common,
            "--trainer.max_steps=8",
            "--trainer.callbacks+=unifusion.callbacks.LossHistory",
            "--trainer.callbacks.path=full.jsonl",
        ]
    )
    # interrupted after 4 steps (its last checkpoint is what a kill would leave) ...
    main(
        [
            *common,
            "--trainer.max_steps=4",
            "--trainer.callbacks+=unifusion.callbacks.LossHistory",
            "--trainer.callbacks.path=part.jsonl",
            *ckpt_callback(4),
        ]
    )
    assert os.path.exists("ckpts_4/last.ckpt")
    ckpt = torch.load("ckpts_4/last.ckpt", weights_only=False)
    assert "ema_state_dict" in ckpt and ckpt["global_step"] == 4
    # ... and resumed to 8
    main(
        [
            *common,
            "--trainer.max_steps=8",
            "--trainer.callbacks+=unifusion.callbacks.LossHistory",
            "--trainer.callbacks.path=resumed.jsonl",
            "--ckpt_path=ckpts_4/last.ckpt",
        ]
    )
    full, part, resumed = losses("full.jsonl"), losses("part.jsonl"), losses("resumed.jsonl")
    assert sorted(resumed) == [5, 6, 7, 8]
    for s in range(1, 5):
        assert part[s] == pytest.approx(full[s], rel=1e-5, abs=1e-6)
    for s in range(5, 9):
        assert resumed[s] == pytest.approx(full[s], rel=1e-4, abs=1e-5), (s, resumed[s], full[s])


def test_atomic_checkpoint_survives_a_crash_during_save(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = str(tmp_path / "last.ckpt")
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind


def test_nonfinite_loss_raises_with_step_or_skips(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    args = [
        "fit",
        "-c",
        QUICKSTART,
        *small(),
        "--trainer.max_steps=2",
        "--model.optimizer.init_args.lr=1e30",
        "--trainer.gradient_clip_val=null",
    ]
    # the `unifusion` command reports it in one line (exit status 1), naming the step
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: non-finite training loss" in err and "global step" in err
    # skipping keeps the run alive, LossHistory included (it read outputs["loss"] and crashed)
    history = [
        "--trainer.callbacks+=unifusion.callbacks.LossHistory",
        "--trainer.callbacks.path=skipped_losses.jsonl",
    ]
    assert main([*args, "--model.nonfinite_loss=skip", *history]) == 0
    if os.path.exists("skipped_losses.jsonl"):
        assert all(math.isfinite(v) for v in losses("skipped_losses.jsonl").values())


def test_loss_history_ignores_skipped_batches(tmp_path):
    from types import SimpleNamespace

    from unifusion.callbacks import LossHistory

    path = tmp_path / "h.jsonl"
    cb = LossHistory(str(path))
    trainer = SimpleNamespace(is_global_zero=True, global_step=3, current_epoch=0)
    batch = {"task": "t2i", "key": ["k0"]}
    for skipped in (None, {}, {"loss": None}):  # what a skipped (non-finite) step may return
        cb.on_train_batch_end(trainer, None, skipped, batch, 0)
    assert not path.exists()
    cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, batch, 0)
    cb.on_train_batch_end(trainer, None, torch.tensor(0.25), batch, 1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["loss"] for r in rows] == [0.5, 0.25] and rows[0]["epoch"] == 0 and rows[0]["first_key"] == "k0"


def test_t5_to_vlm_handoff_reports_fresh_keys(workdir, monkeypatch, caplog):
    monkeypatch.chdir(workdir)
    t5 = os.path.join(ROOT, "experiments", "encoders", "t5.yaml")
    main(["fit", "-c", QUICKSTART, "-c", t5, *small(), "--trainer.max_steps=2", *ckpt_callback(2)])
    ckpt = "ckpts_2/last.ckpt"
    assert os.path.exists(ckpt)
    caplog.clear()
    caplog.set_level(logging.INFO)
    handoff = os.path.join(ROOT, "experiments", "stages", "t5_handoff.yaml")
    cli = main_no_run(["fit", "-c", QUICKSTART, "-c", handoff, *small(), f"--model.init_from={ckpt}"])
    report = cli.model.init_report
    assert report["loaded"] and all(k.startswith("backbone.") for k in report["loaded"])
    assert report["fresh"], "the new LAP + refiner must be reported as fresh"
    assert all(k.startswith(("conditioner.", "refiner.")) for k in report["fresh"]), report["fresh"]
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    own = cli.model.state_dict()
    for k in report["loaded"]:
        assert torch.equal(own[k], state[k])
    # reported once, through Lightning's rank-zero logging (INFO)
    reports = [r.getMessage() for r in caplog.records if "initialised fresh" in r.getMessage()]
    assert len(reports) == 1, reports


def main_no_run(args):
    from unifusion.cli import lightning_main

    return lightning_main(args[1:], run=False)


@pytest.mark.slow
def test_ddp_two_cpu_processes_fast_dev_run(workdir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "unifusion.cli",
            "fit",
            "-c",
            QUICKSTART,
            *small(),
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.fast_dev_run=true",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "distributed_backend=gloo" in (r.stdout + r.stderr)
    assert (
        "All distributed processes registered" in (r.stdout + r.stderr)
        or "world_size: 2" in (r.stdout + r.stderr)
        or "GLOBAL_RANK: 1" in (r.stdout + r.stderr)
    )


# ------------------------------------------------------------------ issue 13/15: a real kill, a requeue
RESUME_OVERLAY = """
trainer:
  max_steps: 20
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: 6, save_top_k: -1}}
    - class_path: unifusion.callbacks.LossHistory
      init_args: {{path: {history}}}
model:
  sampling: {{steps: 2}}
data:
  init_args:
    batch_size: 4
    shuffle_buffer: 16
    generate_shapes: {{num: 48, val_num: 8}}
"""


def _unifusion(args: list[str], cwd: str) -> subprocess.Popen:
    # the console script's code path, one thread: the runs compared must do the same float arithmetic
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "unifusion.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_after(proc: subprocess.Popen, periodic, timeout: float = 900) -> None:
    """SIGKILL ``proc`` as soon as the periodic checkpoint ``periodic`` and then ``last.ckpt`` were
    written (ModelCheckpoint saves them one after the other): no clean-up of any kind, as on a
    pre-empted node."""
    last = periodic.parent / "last.ckpt"

    def saved() -> bool:
        try:
            return last.stat().st_mtime_ns >= periodic.stat().st_mtime_ns
        except FileNotFoundError:
            return False

    deadline = time.time() + timeout
    while not saved() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed:\n" + out[-3000:]


@pytest.mark.slow
def test_sigkilled_run_requeued_with_the_same_command_continues_exactly(tmp_path):
    """A run (12 batches per epoch, shuffle buffer on, a checkpoint every 6 steps) is killed with
    SIGKILL after the step-6 checkpoint (mid-epoch), requeued with the same command (``--run_dir`` +
    ``--ckpt_path=last``, as SLURM does), killed again after the step-12 checkpoint (the epoch's
    last batch) and requeued again: every recorded loss, epoch and batch equals the uninterrupted
    run's, and the checkpoint written after the second resume records the right data position."""
    work = str(tmp_path)
    for name in ("full", "requeue"):
        (tmp_path / f"{name}.yaml").write_text(RESUME_OVERLAY.format(history=f"{name}.jsonl"))
    # the data first, so the runs below start from the same files
    prep = _unifusion(["data", "shapes", "--out", "artifacts/shapes/train", "--num", "48", "--size", "16"], work)
    assert prep.wait(timeout=600) == 0, prep.stdout.read()
    full = _unifusion(["fit", "-c", QUICKSTART, "-c", "full.yaml", "--run_dir", "runs/full"], work)
    command = ["fit", "-c", QUICKSTART, "-c", "requeue.yaml", "--run_dir", "runs/requeue", "--ckpt_path=last"]
    ckpts = tmp_path / "runs" / "requeue" / "checkpoints"
    _kill_after(_unifusion(command, work), ckpts / "epoch=0-step=6.ckpt")
    _kill_after(_unifusion(command, work), ckpts / "epoch=0-step=12.ckpt")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12
    third = _unifusion(command, work)
    out, _ = third.communicate(timeout=900)
    assert third.returncode == 0, out[-4000:]
    assert f"Restoring states from the checkpoint path at {ckpts / 'last.ckpt'}" in out, out[-4000:]
    assert "fit done: step 20" in out, out[-4000:]
    out_full, _ = full.communicate(timeout=900)
    assert full.returncode == 0, out_full[-4000:]

    with open(tmp_path / "full.jsonl") as f:
        reference = {r["step"]: r for r in map(json.loads, f)}
    assert sorted(reference) == list(range(1, 21))
    assert [reference[s]["epoch"] for s in (12, 13)] == [0, 1]
    with open(tmp_path / "requeue.jsonl") as f:  # all attempts appended; steps after a kill appear twice
        attempts = [json.loads(line) for line in f]
    assert {r["step"] for r in attempts} == set(reference)
    for r in attempts:
        ref = reference[r["step"]]
        assert (r["loss"], r["epoch"], r["first_key"]) == (ref["loss"], ref["epoch"], ref["first_key"]), (r, ref)
    # the step-18 checkpoint, written after resuming at the epoch boundary: 6 batches into epoch 1
    state = torch.load(ckpts / "epoch=1-step=18.ckpt", weights_only=True)
    assert state["UniFusionDataModule"]["epoch"] == 1
    assert state["UniFusionDataModule"]["batches_in_epoch"] == 6
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 6


def test_epoch_end_checkpoint_resumes_as_a_new_epoch():
    """The loop state of a checkpoint saved on the last batch of epoch 0 (12 batches), as Lightning
    2.6 writes it, becomes the state after the epoch ended."""
    from unifusion.resume import normalize_epoch_end_checkpoint

    def counts(ready, started, processed, completed):
        return {"ready": ready, "started": started, "processed": processed, "completed": completed}

    fit = {
        "epoch_progress": {"total": counts(1, 1, 0, 0), "current": counts(1, 1, 0, 0)},
        "epoch_loop.batch_progress": {
            "total": counts(12, 12, 12, 11),
            "current": counts(12, 12, 12, 11),
            "is_last_batch": True,
        },
        "epoch_loop.scheduler_progress": {
            "total": {"ready": 12, "completed": 12},
            "current": {"ready": 12, "completed": 12},
        },
        "epoch_loop.automatic_optimization.optim_progress": {
            "optimizer": {
                "step": {"total": {"ready": 12, "completed": 12}, "current": {"ready": 12, "completed": 12}},
                "zero_grad": {"total": counts(12, 12, 0, 12), "current": counts(12, 12, 0, 12)},
            }
        },
        "epoch_loop.val_loop.batch_progress": {
            "total": counts(0, 0, 0, 0),
            "current": counts(0, 0, 0, 0),
            "is_last_batch": False,
        },
        "epoch_loop.state_dict": {"_batches_that_stepped": 11},
    }
    ckpt = {"epoch": 0, "loops": {"fit_loop": fit}}
    assert normalize_epoch_end_checkpoint(ckpt)
    assert fit["epoch_progress"]["total"] == counts(1, 1, 1, 1) and ckpt["epoch"] == 1
    bp = fit["epoch_loop.batch_progress"]
    assert bp["total"] == counts(12, 12, 12, 12) and bp["current"] == counts(0, 0, 0, 0) and not bp["is_last_batch"]
    assert fit["epoch_loop.state_dict"]["_batches_that_stepped"] == 12
    assert not normalize_epoch_end_checkpoint(ckpt)  # idempotent; mid-epoch checkpoints are untouched
    mid = {"loops": {"fit_loop": {**fit, "epoch_loop.batch_progress": {**bp, "is_last_batch": False}}}}
    assert not normalize_epoch_end_checkpoint(mid)


@pytest.mark.slow
def test_stage_recipe_runs_twice_after_a_failed_start_and_loads_the_right_weights(tmp_path, monkeypatch, capsys):
    """The README's stage recipe (fixed run folders from the stage configs, --ckpt_path=last) run twice
    in a row, with a failed start of stage 2 before the first good one; stage 3 starts from stage 2's weights."""
    monkeypatch.chdir(tmp_path)
    stages = os.path.join(ROOT, "experiments", "stages")
    tiny = [
        "--model.sampling.steps=2",
        "--data.init_args.batch_size=4",
        "--data.init_args.shuffle_buffer=8",
        "--data.init_args.generate_shapes.num=24",
        "--data.init_args.generate_shapes.val_num=8",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--ckpt_path=last",
    ]
    # the quickstart's checkpointing without its sample grids: only the weights matter here
    (tmp_path / "no_grid.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true, every_n_train_steps: 700, save_top_k: -1}\n"
    )

    def stage(name: str, init_from: str | None = None, extra: tuple[str, ...] = ()) -> int:
        args = [
            "fit",
            "-c",
            QUICKSTART,
            "-c",
            os.path.join(stages, f"{name}.yaml"),
            "-c",
            "no_grid.yaml",
            *tiny,
            *extra,
        ]
        if init_from:
            args.append(f"--model.init_from={init_from}")
        return main(args)

    t2i_last = "runs/stage_t2i/checkpoints/last.ckpt"
    mixed_last = "runs/stage_mixed/checkpoints/last.ckpt"
    for attempt in range(2):
        assert stage("t2i") == 0
        if attempt == 0:  # a failed start: wrong data path, stops after the run folder exists
            bad = (
                "--data.init_args.sources=[{path: no_such_shards, task: t2i}]",
                "--data.init_args.generate_shapes=null",
            )
            assert stage("mixed", t2i_last, bad) == 1
            assert "no_such_shards" in capsys.readouterr().err
        assert stage("mixed", t2i_last) == 0
        assert stage("edit", mixed_last) == 0
        for run in ("stage_t2i", "stage_mixed", "stage_edit"):
            assert os.listdir(f"runs/{run}/checkpoints") == ["last.ckpt"], run  # one folder, no version_N
            assert torch.load(f"runs/{run}/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert not [d for d in os.listdir("runs") if d.startswith("version_")]
    # stage 3 is initialised from stage 2's final weights
    from unifusion.cli import lightning_main

    cli = lightning_main(
        [
            *("-c", QUICKSTART, "-c", os.path.join(stages, "edit.yaml"), "-c", "no_grid.yaml"),
            *tiny[:-1],
            f"--model.init_from={mixed_last}",
        ],
        run=False,
    )
    mixed = torch.load(mixed_last, weights_only=True)["state_dict"]
    own = cli.model.state_dict()
    loaded = cli.model.init_report["loaded"]
    assert loaded and all(torch.equal(own[k], mixed[k]) for k in loaded)


def test_progress_bar_counts_steps_on_a_step_limited_run():
    """Lightning's bar read "Epoch 0/-2" on a step-limited run and "20/10" after a mid-epoch resume."""
    from types import SimpleNamespace

    from unifusion.callbacks import StepRichProgressBar, StepTQDMProgressBar

    # resumed at step 17 of a 27-step run, batch 19 of an epoch of unknown length
    trainer = SimpleNamespace(max_epochs=-1, max_steps=27, global_step=17, num_training_batches=float("inf"))
    for cls in (StepRichProgressBar, StepTQDMProgressBar):
        bar = cls()
        bar._trainer = trainer
        assert bar.total_train_batches == 27
        assert bar._position(trainer, batch_idx=19) + 1 == 17  # the bar shows global_step / max_steps
    rich = StepRichProgressBar()
    rich._trainer = trainer
    assert rich._get_train_description(0).strip() == "Epoch 0"
    trainer.max_epochs, trainer.max_steps, trainer.num_training_batches = 3, -1, 10
    assert rich._get_train_description(1).strip() == "Epoch 1/2"
    assert rich.total_train_batches == 10 and rich._position(trainer, 4) == 4


class _Evil:
    """Unpickling this would run code (here: create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_fit_ckpt_path_refuses_a_malicious_pickle(tmp_path, monkeypatch, capsys):
    """Held (issue 13): resuming reads checkpoints with weights_only, so a crafted pickle is refused
    with one line and never runs."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "global_step": 1, "payload": _Evil(str(marker))}, tmp_path / "evil.ckpt")
    assert main(["fit", "-c", QUICKSTART, *small(), "--trainer.max_steps=1", "--ckpt_path=evil.ckpt"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "evil.ckpt" in lines[0] and "Traceback" not in err
    assert not marker.exists()


def test_sample_grid_cells_carry_their_prompts(tmp_path):
    """Each cell of a sample grid is labelled with its prompt in the PNG, and the TensorBoard
    image carries the prompts as its description."""
    import glob

    import numpy as np
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    from unifusion.callbacks import add_image_with_description, captioned_grid

    images = torch.zeros(3, 3, 16, 16)  # black cells on a white canvas
    prompts = ["a red circle", "two blue squares on the left of a green triangle", "x"]
    grid = captioned_grid(images, prompts, nrow=3, upscale=4)
    arr = np.asarray(grid.convert("L"))
    cell_w = (grid.width - 2) // 3
    for c in range(3):  # below every cell there is text (dark pixels on the white strip)
        strip = arr[64 + 4 :, 2 + c * cell_w : (c + 1) * cell_w]
        assert (strip < 128).any(), c
    long_rows = (arr[64 + 4 :, 2 + cell_w : 2 * cell_w] < 128).any(axis=1).nonzero()[0]
    assert long_rows.max() - long_rows.min() > 12  # the long prompt wraps onto a second line
    writer = SummaryWriter(str(tmp_path))
    add_image_with_description(writer, "samples", grid, 5, "0: a red circle")
    writer.close()
    (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    values = [v for e in EventFileLoader(events).Load() for v in e.summary.value if v.tag == "samples"]
    assert values and values[0].metadata.summary_description == "0: a red circle"
    assert values[0].metadata.plugin_data.plugin_name == "images"


def test_checkpoint_rng_state_carries_cuda_and_restores_it(monkeypatch, tmp_path):
    """Resume restores every RNG Lightning collects, CUDA included, and the saved state is plain
    data that ``torch.load(weights_only=True)`` reads (no GPU here: the CUDA generator is faked)."""
    import lightning.fabric.utilities.seed as seed_utils

    from unifusion import models

    fake_cuda = [torch.ByteTensor([1, 2, 3]), torch.ByteTensor([4, 5, 6])]  # one state per device
    real_collect = seed_utils._collect_rng_states

    def collect(include_cuda: bool = True):
        states = real_collect(include_cuda=False)
        if include_cuda:
            states["torch.cuda"] = list(fake_cuda)
        return states

    monkeypatch.setattr(models, "_collect_rng_states", collect)
    saved = models._rng_state_plain()
    assert [t.tolist() for t in saved["torch.cuda"]] == [[1, 2, 3], [4, 5, 6]]
    path = tmp_path / "rng.pt"
    torch.save({"rng_state": saved}, path)
    loaded = torch.load(path, weights_only=True)["rng_state"]

    restored = {}
    monkeypatch.setattr(models, "_set_rng_states", lambda states: restored.update(states))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.rand(3)  # move the CPU generator on: the restore must bring it back
    models._restore_rng_state(loaded)
    assert [t.tolist() for t in restored["torch.cuda"]] == [[1, 2, 3], [4, 5, 6]]
    assert torch.equal(restored["torch"], saved["torch"])
    assert set(restored) >= {"torch", "torch.cuda", "numpy", "python"}
