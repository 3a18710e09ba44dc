"""Exact resume: repairs to the loop state Lightning saves in a checkpoint.

Lightning's ``ModelCheckpoint(every_n_train_steps=...)`` saves in ``on_train_batch_end``. When
that batch is the *last* batch of an epoch, the checkpoint says "mid-epoch, last batch done",
and Lightning (2.6) resumes from it in a half-way state: the new epoch starts without
``on_train_epoch_start``, its epoch counters run one behind (``ready``/``started`` are never
incremented for it), and, when the training loader has no length (an iterable stream such as
``UniFusionDataModule`` without ``epoch_length``), the batch counter of the new epoch continues
at the old epoch's length instead of 0. The visible effects are a progress bar showing "20/10",
a data position saved from the wrong count (the next resume skips data it never trained on, so
losses stop matching an uninterrupted run) and an epoch number that jumps on a later resume.

:func:`normalize_epoch_end_checkpoint` rewrites such a checkpoint's loop state into the state
of a checkpoint saved right after the epoch ended, which Lightning resumes cleanly: the next
epoch starts at batch 0 with its hooks, as in the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

__all__ = ["normalize_epoch_end_checkpoint"]


def _zero(progress: dict[str, Any]) -> None:
    for key in progress:
        progress[key] = 0


def normalize_epoch_end_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Turn an "on_train_batch_end of the epoch's last batch" loop state into "epoch finished".

    Returns True when the checkpoint was changed. Other checkpoints (mid-epoch, end of epoch,
    end of training, validation) are left alone.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict):
        return False
    epochs = fit.get("epoch_progress")
    batches = fit.get("epoch_loop.batch_progress")
    if not isinstance(epochs, dict) or not isinstance(batches, dict) or not batches.get("is_last_batch"):
        return False
    et, bt = epochs["total"], batches["total"]
    mid_epoch = et["started"] == et["ready"] and et["processed"] == et["started"] - 1
    saved_on_batch_end = bt["ready"] == bt["started"] == bt["processed"] and bt["completed"] == bt["processed"] - 1
    if not (mid_epoch and saved_on_batch_end):
        return False
    # the last batch is done: count it as completed, and the epoch as processed and completed
    bt["completed"] = bt["processed"]
    for part in (et, epochs["current"]):
        part["processed"] += 1
        part["completed"] = part["processed"]
    # the next epoch starts from zero, as Lightning's own reset between epochs leaves it
    _zero(batches["current"])
    batches["is_last_batch"] = False
    scheduler = fit.get("epoch_loop.scheduler_progress")
    if isinstance(scheduler, dict):
        _zero(scheduler["current"])
    optim = fit.get("epoch_loop.automatic_optimization.optim_progress")
    if isinstance(optim, dict):
        for counter in optim.get("optimizer", {}).values():
            _zero(counter["current"])
    val = fit.get("epoch_loop.val_loop.batch_progress")
    if isinstance(val, dict):
        _zero(val["total"])
        _zero(val["current"])
        val["is_last_batch"] = False
    # Lightning adds the step it counts only on_advance_end (after the save) when it resumes
    # "on train batch end"; this state is resumed as a fresh epoch, so add it here
    state = fit.get("epoch_loop.state_dict")
    if isinstance(state, dict) and "_batches_that_stepped" in state:
        state["_batches_that_stepped"] += 1
    checkpoint["epoch"] = int(epochs["current"]["completed"])
    return True
