"""The quickstart's training step before and after the speed-ups, interleaved in one process.

Both modes run the **real training step** of the config's ``UniFusionModel``
(``training_step`` -> backward -> gradient clipping -> optimizer step -> EMA update) on live
batches from the config's data module (the quickstart trains live, with the VLM in the loop).

- **before** reproduces the previous code path in this process: the conditioner sees every
  real token of the chat template (``encoder.roles: all``; 16 of ~19 tokens are template),
  the processor is called once per sample, plain (for-loop) AdamW, and the EMA updated one
  parameter at a time;
- **after** is the code as configured: the encoder keeps the paper's default roles (user
  text), one processor call per batch, fused AdamW, a multi-tensor EMA update;
- **after+compile** (``--compile``) adds ``torch.compile`` of the DiT (``model.compile: true``).

Windows of ``--steps`` steps alternate between the modes (rotating order); the median window
per mode is reported with the ratio to ``before``. The machine may be shared: min..max is printed.

    python benchmarks/bench_quickstart_step.py              # ~3-5 min on 2 cores
    python benchmarks/bench_quickstart_step.py --compile    # + compiled DiT (~1 min cold compile)
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path: str, work: str, samples: int) -> str:
    """The experiment config without loggers/callbacks, its data in ``work`` (``samples`` scenes)."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"] = []
    cfg["trainer"]["default_root_dir"] = os.path.join(work, "runs")
    enc = cfg["model"]["encoder"]["init_args"]
    if not os.path.isabs(enc["path"]):
        local = os.path.join(REPO, enc["path"])
        enc["path"] = local if os.path.isfile(os.path.join(local, "config.json")) else os.path.join(work, enc["path"])
    data = cfg["data"]["init_args"]
    gen = dict(data.get("generate_shapes") or {})
    gen.update(num=samples, val_num=0)
    data.update(sources=[{"path": os.path.join(work, "shapes"), "task": "t2i"}], generate_shapes=gen)
    data.pop("val_sources", None)
    out = os.path.join(work, "config.yaml")
    with open(out, "w") as f:
        yaml.safe_dump(cfg, f)
    return out


def _loop_ema_update(ema: Any, module: torch.nn.Module) -> None:
    """The EMA update as it was: one ``lerp_`` per parameter."""
    ema.num_updates += 1
    decay = min(ema.decay, (1 + ema.num_updates) / (10 + ema.num_updates))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ema.shadow:
                ema.shadow[name].lerp_(p.detach().float(), 1 - decay)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "experiments", "quickstart.yaml"))
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time the DiT compiled (after+compile)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")

    from unifusion.lightning_cli import lightning_main

    modes = ["before", "after"] + (["after+compile"] if args.compile else [])
    with tempfile.TemporaryDirectory(prefix="bench-qs-") as work:
        cfg = _config(args.config, work, args.samples)
        after_cli = lightning_main(["-c", cfg], run=False)
        dm = after_cli.datamodule
        dm.prepare_data()
        dm.setup("fit")
        before = lightning_main(["-c", cfg, "--model.encoder.init_args.roles=all"], run=False).model
        before.load_state_dict(after_cli.model.state_dict())
        before.encoder.prepare = functools.partial(before.encoder.prepare, per_sample=True)
        models = {"before": before, "after": after_cli.model}
        if args.compile:
            models["after+compile"] = copy.deepcopy(after_cli.model)
            models["after+compile"].backbone.compile()
        opts: dict[str, torch.optim.Optimizer] = {}
        for mode, m in models.items():
            m.train()
            params = [q for q in m.trainable.parameters() if q.requires_grad]
            if mode == "before":
                lr = after_cli.model.configure_optimizers()
                lr = (lr["optimizer"] if isinstance(lr, dict) else lr).defaults["lr"]
                opts[mode] = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
            else:
                o = m.configure_optimizers()
                opts[mode] = o["optimizer"] if isinstance(o, dict) else o
        clip = after_cli.trainer.gradient_clip_val
        loaders: dict[str, Any] = {}

        def next_batch(mode: str) -> dict[str, Any]:
            batch = next(loaders[mode], None) if mode in loaders else None
            if batch is None:
                loaders[mode] = iter(dm.train_dataloader())
                batch = next(loaders[mode])
            return batch

        def step(mode: str, i: int) -> float:
            m = models[mode]
            t0 = time.perf_counter()
            batch = next_batch(mode)
            loss = m.training_step(batch, i)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([q for q in m.parameters() if q.grad is not None], clip)
            opts[mode].step()
            opts[mode].zero_grad(set_to_none=True)
            if m.ema is not None:
                if mode == "before":
                    _loop_ema_update(m.ema, m.trainable)
                else:
                    m.ema.update(m.trainable)
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        for mode in modes:
            for i in range(args.warmup):
                step(mode, i)
        warm_s = time.perf_counter() - t0
        windows: dict[str, list[float]] = {m: [] for m in modes}
        for w in range(args.windows):
            order = modes[w % len(modes) :] + modes[: w % len(modes)]
            for mode in order:
                windows[mode].append(statistics.fmean(step(mode, i) for i in range(args.steps)))
        tokens = {
            mode: int(models[mode].features({"prompt": ["a red circle"], "task": "t2i"}).mask.sum())
            for mode in ("before", "after")
        }
    base = statistics.median(windows["before"])
    rows = []
    for mode in modes:
        med = statistics.median(windows[mode])
        rows.append(
            {
                "mode": mode,
                "ms_per_step": round(1e3 * med, 1),
                "it_per_s": round(1 / med, 2),
                "min_ms": round(1e3 * min(windows[mode]), 1),
                "max_ms": round(1e3 * max(windows[mode]), 1),
                "speedup_vs_before": round(base / med, 2),
            }
        )
    name = os.path.relpath(args.config, REPO) if args.config.startswith(REPO) else args.config
    print(f"# {name}: real training step, live data, batch {dm.batch_size}, {torch.get_num_threads()} threads")
    print(
        f"# conditioning tokens for 'a red circle': before {tokens['before']}, after {tokens['after']}; "
        f"warm-up {warm_s:.0f} s; median of {args.windows} interleaved windows x {args.steps} steps"
    )
    print(f"{'mode':>14} | {'ms/step':>8} | {'it/s':>6} | {'min..max ms':>15} | speed-up vs before")
    for r in rows:
        span = f"{r['min_ms']}..{r['max_ms']}"
        print(
            f"{r['mode']:>14} | {r['ms_per_step']:>8} | {r['it_per_s']:>6} | {span:>15} | {r['speedup_vs_before']:.2f}x"
        )
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
