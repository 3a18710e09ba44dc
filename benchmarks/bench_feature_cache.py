"""Live encoder vs feature cache on a real experiment config (default: the quickstart).

Both modes run the **real training step** of the config's ``UniFusionModel``
(``training_step`` -> backward -> gradient clipping -> optimizer step -> EMA update) on
batches from the **real data module**:

- **live**: the config's data module (PNG decode, captions) and the frozen VLM encoding
  each batch inside ``training_step``;
- **cached**: the same samples written once by ``write_feature_cache`` (what
  ``unifusion cache`` runs) and read back through the data module's cached path —
  memory-mapped (``cached``) and, with ``cache_in_memory: true``, from memory
  (``cached_mem``).

Before timing, one cached batch is checked against a live encode of the same samples
(same tokens, roles and features up to fp16), and every mode trains on the **same batches** in
the same order (one plan drawn from the cached loader; each mode still fetches a batch from its
own loader, so the data column is its real cost). Modes are timed **interleaved** (windows of
``--steps`` steps, the mode order rotating between windows) and the **median** window is
reported, with where the time goes: fetching the batch, the encoder (live only) and the
rest of the step. The machine may be shared: the spread between windows is printed too.

    python benchmarks/bench_feature_cache.py                 # quickstart, ~2-4 min on 2 cores
    python benchmarks/bench_feature_cache.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import write_csv  # noqa: E402
from bench_quickstart_step import endless, experiment_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("live", "cached", "cached_mem")


class _Timer:
    """Accumulates the time spent in the wrapped encoder calls."""

    def __init__(self, encoder: Any) -> None:
        self.seconds = 0.0
        self._encode = encoder.encode
        encoder.encode = self  # instance attribute: the model calls encoder.encode(...)

    def __call__(self, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._encode(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t0


def _check_same_tokens(model: Any, cached_batch: dict[str, Any], captions: dict[str, str]) -> str:
    """A cached batch equals a live encode of the same samples (mask, roles, fp16 features)."""
    keys = list(cached_batch["key"])
    live = model.encoder.encode([captions[k] for k in keys], task="t2i")
    got = cached_batch["features"].select_layers(list(live.layer_ids))
    if not (torch.equal(got.mask, live.mask) and torch.equal(got.roles, live.roles)):
        raise AssertionError("cached and live batches hold different tokens")
    torch.testing.assert_close(got.hidden.float(), live.hidden.float(), rtol=2e-3, atol=2e-3)
    n = live.mask.sum(1).float().mean().item()
    return f"same tokens live and cached: yes ({n:.1f} conditioning tokens per sample, roles {sorted(set(live.roles[live.mask].tolist()))})"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "experiments", "quickstart.yaml"))
    p.add_argument("--samples", type=int, default=3000, help="shapes samples written for the run")
    p.add_argument("--windows", type=int, default=5, help="timed windows per mode (interleaved)")
    p.add_argument("--steps", type=int, default=8, help="training steps per window")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    asked = {m.strip() for m in args.modes.split(",") if m.strip()}
    if asked - set(MODES) or "live" not in asked:
        p.error(f"--modes must include live and come from {MODES}")
    modes = [m for m in MODES if m in asked]
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is a no-op

    from unifusion.cli import lightning_main
    from unifusion.data.datamodule import UniFusionDataModule
    from unifusion.encoders.cache import write_feature_cache

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as work:
        cfg_path = experiment_config(args.config, work, args.samples)
        with open(cfg_path) as f:
            data_args = yaml.safe_load(f)["data"]["init_args"]
        t0 = time.perf_counter()
        cli = lightning_main(["-c", cfg_path], run=False)
        model, live_dm = cli.model, cli.datamodule
        live_dm.prepare_data()
        live_dm.setup("fit")
        model.train()
        setup_s = time.perf_counter() - t0
        shapes_dir = os.path.join(work, "shapes")
        t0 = time.perf_counter()
        summary = write_feature_cache(
            model.encoder, shapes_dir, os.path.join(work, "cache"), batch_size=live_dm.batch_size, task="t2i"
        )
        write_s = time.perf_counter() - t0
        dms: dict[str, Any] = {"live": live_dm}
        for mode, in_mem in (("cached", False), ("cached_mem", True)):
            if mode in modes:
                kw = {k: v for k, v in data_args.items() if k not in ("sources", "generate_shapes")}
                dm = UniFusionDataModule(
                    sources=[{"path": os.path.join(work, "cache"), "task": "t2i", "cached": True}],
                    cache_in_memory=in_mem,
                    **kw,
                )
                dm.setup("fit")
                dms[mode] = dm

        # one optimizer per mode, on a copy of the model per mode: same start, no cross-talk
        models = {m: (model if m == "live" else copy.deepcopy(model)) for m in modes}
        opts = {m: models[m].configure_optimizers() for m in modes}
        opts = {m: (o["optimizer"] if isinstance(o, dict) else o) for m, o in opts.items()}
        timers = {m: _Timer(models[m].encoder) for m in modes}
        clip = cli.trainer.gradient_clip_val
        batches = {m: endless(dms[m].train_dataloader()) for m in modes}

        # Every mode trains on the same batches in the same order: the loaders shuffle and group
        # by length differently (characters live, tokens cached), and 8-step windows of different
        # batches differ by up to 2x in tokens. The k-th step of each mode still fetches its batch
        # from its own loader (the data column is the real cost), then trains on the k-th batch
        # of one plan drawn from the cached loader: live gets its keys' captions and targets,
        # the cached modes its features and targets.
        plan: list[dict[str, Any]] = []
        captions: dict[str, str] = {}
        if len(modes) > 1:  # live alone has nothing to agree with
            from unifusion.data.shards import read_samples

            while len(plan) < args.warmup + args.windows * args.steps + 1:
                plan.extend(dms[modes[1]].train_dataloader())
            captions = {s["__key__"]: s["txt"].decode() for s in read_samples(shapes_dir)}
        taken = {m: 0 for m in modes}

        def planned(mode: str, batch: dict[str, Any]) -> dict[str, Any]:
            if not plan:
                return batch
            want = plan[taken[mode]]
            taken[mode] += 1
            out = {**batch, "key": want["key"], "target": want["target"]}
            if "features" in batch:
                out["features"] = want["features"]
            else:
                out["prompt"] = [captions[k] for k in want["key"]]
                out["images"] = [[] for _ in want["key"]]  # the cache holds t2i samples only
            return out

        def step(mode: str, i: int) -> tuple[float, ...]:
            """Seconds: (total, data, encoder, rest of forward, backward, clip + optimizer + EMA)."""
            m = models[mode]
            t0 = time.perf_counter()
            batch = next(batches[mode])
            t1 = time.perf_counter()
            batch = planned(mode, batch)
            enc0 = timers[mode].seconds
            loss = m.training_step(batch, i)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            if clip:
                torch.nn.utils.clip_grad_norm_([q for q in m.parameters() if q.grad is not None], clip)
            opts[mode].step()
            opts[mode].zero_grad(set_to_none=True)
            if getattr(m, "ema", None) is not None and hasattr(m, "trainable"):
                m.ema.update(m.trainable)  # what UniFusionModel.optimizer_step adds
            t4 = time.perf_counter()
            enc = timers[mode].seconds - enc0
            return t4 - t0, t1 - t0, enc, t2 - t1 - enc, t3 - t2, t4 - t3

        if plan:
            same = _check_same_tokens(model, plan[-1], captions) + "; every mode trains on the same batches"
        else:
            same = "same tokens: not checked (no cached mode)"
        for mode in modes:
            for i in range(args.warmup):
                step(mode, i)
        windows: dict[str, list[tuple[float, ...]]] = {m: [] for m in modes}
        for w in range(args.windows):
            order = modes[w % len(modes) :] + modes[: w % len(modes)]
            for mode in order:
                parts = [step(mode, i) for i in range(args.steps)]
                windows[mode].append(tuple(sum(x[j] for x in parts) / len(parts) for j in range(len(parts[0]))))

    rows = []
    live_ms = None
    for mode in modes:
        ws = sorted(windows[mode])  # by total step time: the median window, not per-column medians
        total, data, enc, fwd, bwd, opt = ws[len(ws) // 2]
        ms = total * 1e3
        live_ms = ms if mode == "live" else live_ms
        rows.append(
            {
                "mode": mode,
                "ms_per_step": round(ms, 1),
                "data_ms": round(data * 1e3, 1),
                "encoder_ms": round(enc * 1e3, 1),
                "forward_ms": round(fwd * 1e3, 1),
                "backward_ms": round(bwd * 1e3, 1),
                "optimizer_ms": round(opt * 1e3, 1),
                "min_ms": round(ws[0][0] * 1e3, 1),
                "max_ms": round(ws[-1][0] * 1e3, 1),
                "speedup_vs_live": round(live_ms / ms, 2) if live_ms else 1.0,
            }
        )
    name = os.path.relpath(args.config, REPO) if args.config.startswith(REPO) else args.config
    print(
        f"# {name}: real training step (training_step + backward + clip + optimizer + EMA) via the real data "
        f"module; batch {live_dm.batch_size}, {torch.get_num_threads()} threads, cpu"
    )
    print(
        f"# setup {setup_s:.1f} s; cache write {write_s:.1f} s for {summary['num_samples']} samples "
        f"({summary['bytes_per_sample']:.0f} bytes/sample); {same}"
    )
    print(
        f"# median of {args.windows} interleaved windows x {args.steps} steps per mode (min..max window shown; "
        f"the machine may be shared)"
    )
    cols = ("data", "encoder", "forward", "backward", "optimizer")
    print(f"{'mode':>10} | {'ms/step':>8} | " + " | ".join(f"{c:>9}" for c in cols) + f" | {'min..max':>15} | speed-up")
    for r in rows:
        span = f"{r['min_ms']}..{r['max_ms']}"
        parts = " | ".join(f"{r[c + '_ms']:>9}" for c in cols)
        print(f"{r['mode']:>10} | {r['ms_per_step']:>8} | {parts} | {span:>15} | {r['speedup_vs_live']:.2f}x")
    print(
        "# columns (ms): data = next batch from the data module; encoder = the frozen VLM inside training_step "
        "(live only); forward = the rest of training_step (conditioner, refiner, DiT, loss); backward; "
        "optimizer = clip + AdamW + EMA"
    )
    live = rows[0]
    live_input = live["data_ms"] + live["encoder_ms"]
    for r in rows[1:]:
        enc_share = live["encoder_ms"] / live["ms_per_step"] if live["ms_per_step"] else 0.0
        print(
            f"# {r['mode']} vs live: {r['speedup_vs_live']:.2f}x (target >= 2x; the encoder is {enc_share:.0%} of "
            f"the live step, so skipping it alone gives ~{1 / max(1 - enc_share, 1e-9):.2f}x; the other columns "
            f"move with the machine between windows)"
        )
        # what the cache itself replaces: the batch plus the VLM's features, read instead of computed
        cached_input = r["data_ms"] + r["encoder_ms"]
        print(
            f"#   conditioning input (data + encoder): live {live_input:.1f} ms -> {r['mode']} {cached_input:.1f} ms "
            f"({live_input / max(cached_input, 1e-9):.1f}x)"
        )
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
