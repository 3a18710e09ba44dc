"""The quickstart's training step before and after the speed-ups, windows interleaved.

Every mode runs the **real training step** of the config's ``UniFusionModel``
(``training_step`` -> backward -> gradient clipping -> optimizer step -> EMA update) on live
batches from the config's data module (the quickstart trains live, with the VLM in the loop).

- **before** reproduces the previous code path: the conditioner sees every real token of the
  chat template (``encoder.roles: all``; 16 of ~19 tokens are template, and the whole template
  runs through the VLM), the processor is called once per sample, plain (for-loop) AdamW, the
  EMA updated one parameter at a time, glibc's default allocator, batches of any caption
  lengths (``data.group_by_length: 0``), and the DiT's SwiGLU at its unaligned width
  (``ffn_multiple_of: 1``: 341 for width 128);
- **after** is the code as configured and as the ``unifusion`` command runs it: the paper's
  default roles (user text), the VLM stopped after the last kept token, one processor call per
  batch, fused AdamW, a multi-tensor EMA update, freed memory kept for reuse
  (:mod:`unifusion.allocator`: no page faults on the next step's activations), the
  config's length-grouped batches (``data.group_by_length``: each padded to about its own
  longest caption), and the config's aligned SwiGLU width (``ffn_multiple_of``);
- **after+compile** (``--compile``) adds ``model.compile: true``: ``torch.compile`` of the DiT and the
  refiner, applied where ``fit`` applies it (``on_fit_start``);
- **after+cache** (``--cache``) is *after* trained from the feature cache instead of the live VLM:
  the same samples written once by ``write_feature_cache`` (what ``unifusion cache`` runs) and
  read back through the data module's cached path from memory (``cache_in_memory: true``), as a
  researcher trains once the features are cached (``bench_feature_cache.py`` compares live and
  cached at the same code on the same batches; this row is the whole before -> after). With both
  ``--compile`` and ``--cache``, **after+compile+cache** has every speed-up at once.

The allocator is a per-process setting, so by default each mode runs in its own worker
process and the parent alternates windows of ``--steps`` steps between them (rotating order),
one process at a time: machine drift hits every mode alike. ``--one_process`` runs all
modes in this process instead (the code paths only; the allocator is then shared). The
median window per mode is reported with its ratio to ``before``'s, and ``paired`` is the
median of the per-round ratios (windows adjacent in time); min..max shows the noise of a
shared machine.

    python benchmarks/bench_quickstart_step.py              # ~3 min on 2 cores
    python benchmarks/bench_quickstart_step.py --compile    # + compiled DiT and refiner (~1 min cold compile)
    python benchmarks/bench_quickstart_step.py --cache      # + trained from the in-memory feature cache
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import write_csv  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_config(path: str, work: str, samples: int) -> str:
    """The experiment config at ``path`` for a benchmark: no loggers or callbacks, its data a new
    ``samples``-scene shapes set in ``work`` (encoder, conditioner, DiT, batch size and optimizer
    as configured); returns the written config's path. ``bench_feature_cache.py`` uses it too."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"] = []
    cfg["trainer"]["default_root_dir"] = os.path.join(work, "runs")
    enc = cfg["model"]["encoder"]["init_args"]
    if not os.path.isabs(enc["path"]):
        # the tiny VLM is built in the scratch folder unless the repo already has it
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


#: the cached modes' config, beside the live one (written by :func:`_write_cached_config`)
CACHED_CONFIG = "config_cached.yaml"


def _write_cached_config(cfg: str, encoder: Any) -> str:
    """``cfg`` trained from a feature cache of its data (written here by ``encoder``), read from memory."""
    from unifusion.encoders.cache import write_feature_cache

    with open(cfg) as f:
        c = yaml.safe_load(f)
    data = c["data"]["init_args"]
    cache = os.path.join(os.path.dirname(cfg), "cache")
    write_feature_cache(encoder, data["sources"][0]["path"], cache, batch_size=data["batch_size"], task="t2i")
    data.update(sources=[{"path": cache, "task": "t2i", "cached": True}], cache_in_memory=True)
    data.pop("generate_shapes", None)
    out = os.path.join(os.path.dirname(cfg), CACHED_CONFIG)
    with open(out, "w") as f:
        yaml.safe_dump(c, f)
    return out


def endless(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``loader``'s batches pass after pass: one loader, iterated once per epoch, as Lightning's fit
    loop does (its workers persist). Ends only if a pass yields nothing."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


def _loop_ema_update(ema: Any, module: torch.nn.Module) -> None:
    """The EMA update as it was: one ``lerp_`` per parameter."""
    ema.num_updates += 1
    decay = min(ema.decay, (1 + ema.num_updates) / (10 + ema.num_updates))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ema.shadow:
                ema.shadow[name].lerp_(p.detach().float(), 1 - decay)


def _build(cfg: str, mode: str, compile_model: bool = False) -> tuple[Any, Any, torch.optim.Optimizer, float | None]:
    """``(model, datamodule, optimizer, clip)`` of one mode, built through the real CLI."""
    from unifusion.lightning_cli import lightning_main

    extra = ["--model.compile=true"] if compile_model else []
    if mode == "before":
        extra += [
            "--model.encoder.init_args.roles=all",
            "--data.init_args.group_by_length=0",
            "--model.backbone.init_args.ffn_multiple_of=1",
        ]
    cli = lightning_main(["-c", cfg, *extra], run=False)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    m = cli.model
    if mode == "before":
        m.encoder.prepare = functools.partial(m.encoder.prepare, per_sample=True)
    m.on_fit_start()  # what `fit` does first: compiles the model's `compile` parts
    m.train()
    o = m.configure_optimizers()
    opt = o["optimizer"] if isinstance(o, dict) else o
    if mode == "before":
        params = [q for q in m.trainable.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=opt.defaults["lr"], weight_decay=0.0, foreach=False)
    return m, dm, opt, cli.trainer.gradient_clip_val


class _Stepper:
    """The real training step of one mode on its own live batches; ``__call__`` times one step."""

    def __init__(self, cfg: str, mode: str) -> None:
        self.mode = mode
        if "cache" in mode:
            cfg = os.path.join(os.path.dirname(cfg), CACHED_CONFIG)
        self.model, self.dm, self.opt, self.clip = _build(
            cfg, "before" if mode == "before" else "after", compile_model="compile" in mode
        )
        self.batches = endless(self.dm.train_dataloader())
        self.i = 0

    def __call__(self) -> float:
        m = self.model
        t0 = time.perf_counter()
        batch = next(self.batches)
        loss = m.training_step(batch, self.i)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_([q for q in m.parameters() if q.grad is not None], self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if m.ema is not None:
            if self.mode == "before":
                _loop_ema_update(m.ema, m.trainable)
            else:
                m.ema.update(m.trainable)
        self.i += 1
        return time.perf_counter() - t0

    def window(self, steps: int) -> float:
        return statistics.fmean(self() for _ in range(steps))

    def tokens(self) -> int:
        return int(self.model.features({"prompt": ["a red circle"], "task": "t2i"}).mask.sum())


def _worker(cfg: str, mode: str, warmup: int, steps: int, threads: int | None) -> None:
    """One mode in its own process: ``@@ ready TOKENS``, then one ``@@ <seconds>`` per ``window`` line."""
    if threads:
        torch.set_num_threads(threads)
    if mode != "before":
        from unifusion.allocator import retain_freed_memory

        retain_freed_memory()  # as the `unifusion` command does at start-up
    warnings.filterwarnings("ignore", message=".*self.log.*")
    stepper = _Stepper(cfg, mode)
    for _ in range(warmup):
        stepper()
    print(f"@@ ready {stepper.tokens()}", flush=True)
    for line in sys.stdin:
        if line.strip() != "window":
            break
        print(f"@@ {stepper.window(steps)}", flush=True)


class _Remote:
    """The parent's handle on a :func:`_worker` process."""

    def __init__(self, cfg: str, mode: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", mode, "--_cfg", cfg]
        cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.mode = mode
        self.tokens = int(self._reply().split()[1])

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return line[3:].strip()
        raise RuntimeError(f"the {self.mode!r} worker exited with status {self.proc.wait()} (see its output above)")

    def window(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("window\n")
        self.proc.stdin.flush()
        return float(self._reply())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def timed_modes(compile_model: bool = False, cache: bool = False) -> list[str]:
    """The modes a run times: ``before``, ``after``, then the opt-in variants of ``after``."""
    modes = ["before", "after"] + (["after+compile"] if compile_model else []) + (["after+cache"] if cache else [])
    return modes + (["after+compile+cache"] if compile_model and cache else [])  # every speed-up at once


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "experiments", "quickstart.yaml"))
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--windows", type=int, default=9)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time model.compile: true (after+compile)")
    p.add_argument("--cache", action="store_true", help="also time after trained from the in-memory feature cache")
    p.add_argument(
        "--one_process",
        action="store_true",
        help="all modes in this process (code paths only: the allocator setting is then shared)",
    )
    p.add_argument("--csv", default=None)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_cfg", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        _worker(args._cfg, args._worker, args.warmup, args.steps, args.threads)
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")

    modes = timed_modes(compile_model=args.compile, cache=args.cache)
    with tempfile.TemporaryDirectory(prefix="bench-qs-") as work:
        cfg = experiment_config(args.config, work, args.samples)
        t0 = time.perf_counter()
        from unifusion.lightning_cli import lightning_main

        # the data, the tiny VLM (and the feature cache) are written once, before any mode starts
        cli = lightning_main(["-c", cfg], run=False)
        cli.datamodule.prepare_data()
        if args.cache:
            _write_cached_config(cfg, cli.model.encoder)
        del cli
        runners: dict[str, Any] = {}
        try:
            if args.one_process:
                for mode in modes:
                    runners[mode] = _Stepper(cfg, mode)
                    for _ in range(args.warmup):
                        runners[mode]()
                tokens = {mode: runners[mode].tokens() for mode in ("before", "after")}
                windows_of = {mode: (lambda r=r: r.window(args.steps)) for mode, r in runners.items()}
            else:
                for mode in modes:  # one at a time: warm-ups do not compete for the cores
                    runners[mode] = _Remote(cfg, mode, args)
                tokens = {mode: runners[mode].tokens for mode in ("before", "after")}
                windows_of = {mode: r.window for mode, r in runners.items()}
            warm_s = time.perf_counter() - t0
            windows: dict[str, list[float]] = {m: [] for m in modes}
            for w in range(args.windows):
                order = modes[w % len(modes) :] + modes[: w % len(modes)]
                for mode in order:
                    windows[mode].append(windows_of[mode]())
        finally:
            for r in runners.values():
                if isinstance(r, _Remote):
                    r.close()
        batch_size = yaml.safe_load(open(cfg))["data"]["init_args"]["batch_size"]
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
                # the ratio within each round of windows (adjacent in time), median over rounds
                "paired_speedup": round(statistics.median(b / x for b, x in zip(windows["before"], windows[mode])), 2),
            }
        )
    name = os.path.relpath(args.config, REPO) if args.config.startswith(REPO) else args.config
    where = "all modes in one process" if args.one_process else "one process per mode, windows interleaved"
    data = "live data" + (" (after+cache: the in-memory feature cache of the same samples)" if args.cache else "")
    print(f"# {name}: real training step, {data}, batch {batch_size}, {torch.get_num_threads()} threads; {where}")
    print(
        f"# conditioning tokens for 'a red circle': before {tokens['before']}, after {tokens['after']}; "
        f"set-up + warm-up {warm_s:.0f} s; median of {args.windows} interleaved windows x {args.steps} steps"
    )
    print(f"{'mode':>19} | {'ms/step':>8} | {'it/s':>6} | {'min..max ms':>15} | speed-up vs before | paired")
    for r in rows:
        span = f"{r['min_ms']}..{r['max_ms']}"
        print(
            f"{r['mode']:>19} | {r['ms_per_step']:>8} | {r['it_per_s']:>6} | {span:>15} | "
            f"{r['speedup_vs_before']:>17.2f}x | {r['paired_speedup']:.2f}x"
        )
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
