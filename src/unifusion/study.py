"""``unifusion study``: a grid of conditioner *arms* x *seeds* trained on an equal budget and
scored with ShapesBench, with a table, a plot and a TensorBoard hparams view of the result.

A study file (``experiments/studies/*.yaml``) names::

    name: conditioners                  # output folder runs/studies/<name>/ (--name overrides)
    base: [experiments/quickstart.yaml, experiments/studies/cpu_budget.yaml]   # -c overlays
    overrides:                          # shared by every arm: the equal budget
      trainer.max_steps: 600            # dotted keys or nested YAML
    seeds: 3                            # seeds 0..2 (or a list); --seeds N
    seed_keys: [seed_everything, data.init_args.seed]   # config keys that get the run's seed
    cache: true                         # encode the training data once (`unifusion cache`)
    eval: {num_per_category: 20, steps: 25, guidance: 4.0, baseline: true}
    estimate: {it_per_s: 3.0, startup_s: 30, eval_s: 45, cache_s: 120}   # for --dry_run
    default_arms: [last_layer, kv_fusion, hsi, lap]
    arms:
      lap: {configs: [experiments/conditioners/lap.yaml]}
      lap_no_refiner: {configs: [experiments/conditioners/lap.yaml], overrides: {model.refiner: null}}

What it runs, in order:

1. ``unifusion cache -c <base> -c shared.yaml --out <study>/cache`` once: the shared
   encoder's features for the training data (skipped when the cache is there). Every run
   then reads them (``cached: true`` sources), so no training step runs the VLM.
2. per arm and seed, an ordinary ``unifusion fit`` in a subprocess with
   ``--run_dir <study>/runs/<arm>/seed<k>`` (TensorBoard logs, ``config.yaml``,
   ``checkpoints/last.ckpt``), the overlays in the order ``base``, the arm's ``configs``,
   the shared overrides, the cached data, the arm's ``overrides``, overrides given on the
   ``unifusion study`` command line, then the seed. A :class:`StudyRecorder` callback
   writes the trainable parameter count, steps and final loss of the run.
3. ShapesBench on each run's ``last.ckpt`` (EMA weights), with its unconditional baseline;
   ``editing`` is left out when the runs never trained on edits (said in the table).
4. ``results.csv`` (one row per run), ``summary.md`` (arm x category: mean ± std over seeds
   and a 95 % bootstrap interval over seeds and prompts; ties with the best arm marked),
   ``summary.png`` (bars with the intervals) and a TensorBoard hparams view in ``hparams/``.

Resumable: a run with results is skipped, a run whose training finished is only
evaluated, and an interrupted run resumes from its ``last.ckpt``. A run folder remembers the
command that made it; a study whose settings changed under existing runs is refused (use
another ``--name``). ``--dry_run`` prints the plan and an estimated time and trains nothing.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import math
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from unifusion.errors import UserError, first_line

__all__ = [
    "Arm",
    "RunPlan",
    "Study",
    "StudyRecorder",  # noqa: F822 (defined on first use: it imports Lightning)
    "build_plan",
    "evaluate_run",
    "load_study",
    "study_command",
    "summarize_study",
    "write_overlays",
]

#: keys a study file may have (anything else is a typo and refused)
_SPEC_KEYS = {
    "name",
    "description",
    "base",
    "overrides",
    "seeds",
    "seed_keys",
    "cache",
    "eval",
    "estimate",
    "default_arms",
    "arms",
    "jobs",
    "threads",
}
_EVAL_KEYS = {"num_per_category", "seed", "steps", "guidance", "batch_size", "baseline", "categories", "device"}
_ESTIMATE_KEYS = {"it_per_s", "startup_s", "eval_s", "cache_s"}
#: files a run folder holds (what makes a run "done", "trained" or resumable)
RUN_FILE = "study_run.json"  # the command that made the run, and its training attempts
TRAIN_FILE = "study_train.json"  # written by StudyRecorder at the end of fit
RESULT_FILE = "study_result.json"  # the run's row of results.csv; present = finished
EVAL_JSON = os.path.join("eval", "shapesbench.json")
INVOCATIONS_FILE = "invocations.json"  # wall time of every `unifusion study` invocation of the folder
#: the table's columns besides the categories
_HEADLINE = "overall"


@dataclass
class Arm:
    """One arm: ``-c`` overlays and ``--key=value`` overrides on top of the shared config."""

    name: str
    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    """A parsed study file (see the module docstring)."""

    path: str
    name: str
    base: list[str]
    overrides: dict[str, Any]
    arms: dict[str, Arm]
    default_arms: list[str]
    seeds: list[int]
    seed_keys: list[str]
    cache: bool
    eval: dict[str, Any]
    estimate: dict[str, float]
    description: str = ""
    #: fits at once, and torch threads per fit (None: torch's default); see study_command
    jobs: int = 1
    threads: int | None = None
    #: `unifusion study` command-line overrides (``--trainer.max_steps=5``), applied to every run
    cli_overrides: list[str] = field(default_factory=list)


@dataclass
class RunPlan:
    """One arm x seed: its folder and its ``unifusion fit`` arguments (without ``--ckpt_path``)."""

    arm: str
    seed: int
    run_dir: str
    args: list[str]
    #: contents of the generated overlay files the arguments name (shared overrides, cached data)
    settings: dict[str, Any] = field(default_factory=dict)
    state: str = "new"  # new | resume | evaluate | done

    @property
    def key(self) -> str:
        return f"{self.arm}/seed{self.seed}"


# ---------------------------------------------------------------------------------------
# the study file


def _read_yaml(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path!r} is not valid YAML: {first_line(e)}") from None


def _resolve_path(path: str, study_file: str, what: str) -> str:
    """``path`` as given when it exists from the working directory, else relative to the study
    file's folder or one of its parents (so a study runs from the repository root or elsewhere)."""
    if os.path.isabs(path) or os.path.exists(path):
        if not os.path.exists(path):
            raise UserError(f"{what} {path!r} does not exist")
        return path
    d = os.path.dirname(os.path.abspath(study_file))
    while True:
        cand = os.path.join(d, path)
        if os.path.exists(cand):
            return os.path.relpath(cand) if not os.path.relpath(cand).startswith("..") else cand
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    raise UserError(f"{what} {path!r} does not exist (looked in the working directory and above {study_file})")


def _as_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{what} must be a file or a list of files, got {value!r}")


def _as_overrides(value: Any, what: str) -> dict[str, Any]:
    """A mapping of dotted keys (``trainer.max_steps``) or nested YAML, flattened to dotted keys."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{what} must be a mapping of config keys to values, got {type(value).__name__}")
    flat: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        # a mapping is walked into, except class_path/init_args pairs, which are one value
        if isinstance(v, dict) and v and "class_path" not in v:
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        else:
            flat[prefix] = v

    for k, v in value.items():
        walk(str(k), v)
    return flat


def load_study(path: str, cli_overrides: Sequence[str] = (), extra_configs: Sequence[str] = ()) -> Study:
    """Parse and check a study file; every referenced overlay must exist."""
    spec = _read_yaml(path, "study file")
    if not isinstance(spec, dict) or "arms" not in spec:
        raise UserError(f"{path!r} is not a study file: it needs a top-level `arms:` mapping (see unifusion.study)")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise UserError(f"study file {path!r}: unknown keys {unknown}; valid: {sorted(_SPEC_KEYS)}")
    arms_spec = spec.get("arms")
    if not isinstance(arms_spec, dict) or not arms_spec:
        raise UserError(f"study file {path!r}: `arms:` must map arm names to {{configs, overrides}}")
    arms: dict[str, Arm] = {}
    for name, a in arms_spec.items():
        a = a or {}
        if not isinstance(a, dict) or set(a) - {"configs", "overrides"}:
            raise UserError(f"study file {path!r}: arm {name!r} takes `configs:` (files) and `overrides:` (a mapping)")
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise UserError(f"study file {path!r}: arm name {name!r} must be letters, digits, '_' or '-'")
        configs = [_resolve_path(c, path, f"arm {name!r}: overlay") for c in _as_list(a.get("configs"), f"arm {name}")]
        arms[str(name)] = Arm(str(name), configs, _as_overrides(a.get("overrides"), f"arm {name!r}: overrides"))
    base = [_resolve_path(c, path, "base config") for c in _as_list(spec.get("base"), "base")]
    base += [_resolve_path(c, path, "config") for c in extra_configs]
    if not base:
        raise UserError(f"study file {path!r}: `base:` must name the experiment config(s) every run starts from")
    default_arms = _as_list(spec.get("default_arms"), "default_arms") or list(arms)
    bad = [a for a in default_arms if a not in arms]
    if bad:
        raise UserError(f"study file {path!r}: default_arms {bad} are not arms; arms: {', '.join(arms)}")
    seeds_spec = spec.get("seeds", 3)
    if isinstance(seeds_spec, int) and seeds_spec >= 1:
        seeds = list(range(seeds_spec))
    elif isinstance(seeds_spec, list) and seeds_spec and all(isinstance(s, int) for s in seeds_spec):
        seeds = list(seeds_spec)
    else:
        raise UserError(f"study file {path!r}: `seeds:` must be a count >= 1 or a list of ints, got {seeds_spec!r}")
    eval_spec = dict(spec.get("eval") or {})
    bad = sorted(set(eval_spec) - _EVAL_KEYS)
    if bad:
        raise UserError(f"study file {path!r}: unknown eval keys {bad}; valid: {sorted(_EVAL_KEYS)}")
    estimate = dict(spec.get("estimate") or {})
    bad = sorted(set(estimate) - _ESTIMATE_KEYS)
    if bad:
        raise UserError(f"study file {path!r}: unknown estimate keys {bad}; valid: {sorted(_ESTIMATE_KEYS)}")
    name = str(spec.get("name") or os.path.splitext(os.path.basename(path))[0])
    return Study(
        path=path,
        name=name,
        base=base,
        overrides=_as_overrides(spec.get("overrides"), "overrides"),
        arms=arms,
        default_arms=default_arms,
        seeds=seeds,
        seed_keys=_as_list(spec.get("seed_keys", ["seed_everything"]), "seed_keys"),
        cache=bool(spec.get("cache", True)),
        eval={
            "num_per_category": 20,
            "seed": 0,
            "steps": None,
            "guidance": None,
            "batch_size": 64,
            "baseline": True,
            "categories": "auto",
            "device": None,
            **eval_spec,
        },
        estimate={"it_per_s": 3.0, "startup_s": 30.0, "eval_s": 45.0, "cache_s": 120.0, **estimate},
        description=str(spec.get("description") or ""),
        jobs=_positive_int(spec.get("jobs", 1), "jobs", path),
        threads=None if spec.get("threads") is None else _positive_int(spec["threads"], "threads", path),
        cli_overrides=list(cli_overrides),
    )


def _positive_int(v: Any, key: str, path: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"study file {path!r}: `{key}:` must be an integer >= 1, got {v!r}")
    return v


def _split_config_args(config: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """(study file, other ``-c`` files, ``--key=value`` overrides) from ``unifusion study``'s
    LightningCLI-style arguments. The study file is the ``-c`` YAML with a top-level ``arms:``."""
    files: list[str] = []
    overrides: list[str] = []
    i, args = 0, list(config)
    while i < len(args):
        a = args[i]
        if a in ("-c", "--config") and i + 1 < len(args):
            files.append(args[i + 1])
            i += 2
            continue
        if a.startswith(("-c=", "--config=")):
            files.append(a.split("=", 1)[1])
        elif a.startswith("--") and "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--"):
            overrides.append(f"{a}={args[i + 1]}")
            i += 1
        else:
            overrides.append(a)
        i += 1
    studies, others = [], []
    for f in files:
        spec = _read_yaml(f, "config")
        (studies if isinstance(spec, dict) and "arms" in spec else others).append(f)
    if len(studies) != 1:
        found = f"got {len(studies)}: {studies}" if studies else "none of the -c files has a top-level `arms:`"
        raise UserError(f"give exactly one study file: unifusion study -c experiments/studies/NAME.yaml ({found})")
    return studies[0], others, overrides


# ---------------------------------------------------------------------------------------
# the plan


def _cli_value(v: Any) -> str:
    """A value as jsonargparse reads it on the command line (YAML/JSON flow style)."""
    if isinstance(v, str):
        return v
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = d.get(p)
            if not isinstance(nxt, dict):
                nxt = d[p] = {}
            d = nxt
        d[parts[-1]] = v
    return out


def _merge(a: Any, b: Any) -> Any:
    """``b`` over ``a`` like stacked ``-c`` files (mappings merge; a new class_path replaces)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if "class_path" in b and b.get("class_path") != a.get("class_path"):
            return b
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(a.get(k), v) if k in a else v
        return out
    return b


def _parse_cli_override(arg: str) -> tuple[str, Any]:
    key, _, value = arg.partition("=")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    return key.lstrip("-"), parsed


def merged_config(files: Sequence[str], overrides: dict[str, Any], cli: Sequence[str] = ()) -> dict[str, Any]:
    """An approximate merged config (YAML files + overrides) for planning: data sources, steps,
    batch size. The runs themselves are configured by LightningCLI, never by this."""
    cfg: dict[str, Any] = {}
    for f in files:
        cfg = _merge(cfg, _read_yaml(f, "config") or {})
    cfg = _merge(cfg, _nested(overrides))
    cfg = _merge(cfg, _nested(dict(_parse_cli_override(a) for a in cli if a.startswith("--") and "=" in a)))
    return cfg


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    d: Any = cfg
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def study_dir(study: Study, out: str = os.path.join("runs", "studies")) -> str:
    return os.path.join(out, study.name)


def _sources(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    sources = _get(cfg, "data.init_args.sources") or []
    return [s for s in sources if isinstance(s, dict)]


def build_plan(study: Study, arms: Sequence[str], seeds: Sequence[int], root: str) -> dict[str, Any]:
    """The commands of a study (nothing runs): the cache command, the overlay files it writes
    and one :class:`RunPlan` per arm x seed."""
    shared_yaml = os.path.join(root, "shared.yaml")
    cache_yaml = os.path.join(root, "cached_data.yaml")
    cache_dir = os.path.join(root, "cache")
    base_cfg = merged_config(study.base, study.overrides, study.cli_overrides)
    sources = _sources(base_cfg)
    cache_cmd: list[str] | None = None
    cache_overlay: dict[str, Any] | None = None
    # what the overlay files written at run time hold: part of a run's identity, like its arguments
    settings: dict[str, Any] = {"shared": _nested(study.overrides)}
    if study.cache:
        if not sources:
            raise UserError(
                f"study {study.name}: the base config has no data.init_args.sources to cache; set `cache: false`"
            )
        cache_cmd = ["cache", *_c(study.base), "-c", shared_yaml, *study.cli_overrides, "--out", cache_dir]
        # `unifusion cache` writes one folder per source when there are several
        cached = [
            {
                "path": cache_dir
                if len(sources) == 1
                else os.path.join(cache_dir, f"source{i}_{s.get('task', 't2i')}"),
                "task": s.get("task", "t2i"),
                "weight": s.get("weight", 1.0),
                "cached": True,
            }
            for i, s in enumerate(sources)
        ]
        cache_overlay = {"data": {"init_args": {"sources": cached}}}
        settings["cached_data"] = cache_overlay
    runs = []
    for arm_name in arms:
        arm = study.arms[arm_name]
        for seed in seeds:
            run_dir = os.path.join(root, "runs", arm_name, f"seed{seed}")
            args = ["fit", *_c(study.base), *_c(arm.configs), "-c", shared_yaml]
            if cache_overlay is not None:
                args += ["-c", cache_yaml]
            args += [f"--{k}={_cli_value(v)}" for k, v in arm.overrides.items()]
            args += list(study.cli_overrides)
            args += [f"--{k}={seed}" for k in study.seed_keys]
            args += [f"--run_dir={run_dir}", "--trainer.callbacks+=unifusion.study.StudyRecorder"]
            runs.append(RunPlan(arm_name, seed, run_dir, args, settings))
    return {
        "root": root,
        "shared_yaml": shared_yaml,
        "shared": _nested(study.overrides),
        "cache_yaml": cache_yaml,
        "cache_overlay": cache_overlay,
        "cache_dir": cache_dir,
        "cache_cmd": cache_cmd,
        "sources": sources,
        "config": base_cfg,
        "runs": runs,
    }


def write_overlays(plan: dict[str, Any]) -> None:
    """Write the overlay files the plan's commands name (shared overrides, cached data)."""
    os.makedirs(plan["root"], exist_ok=True)
    with open(plan["shared_yaml"], "w", encoding="utf-8") as f:
        f.write("# written by `unifusion study`: the overrides every arm shares (the equal budget)\n")
        yaml.safe_dump(plan["shared"] or {}, f, sort_keys=False)
    if plan["cache_overlay"] is not None:
        with open(plan["cache_yaml"], "w", encoding="utf-8") as f:
            f.write("# written by `unifusion study`: train from the shared feature cache\n")
            yaml.safe_dump(plan["cache_overlay"], f, sort_keys=False)


def _c(files: Sequence[str]) -> list[str]:
    return [a for f in files for a in ("-c", f)]


def _display(args: Sequence[str]) -> str:
    return "unifusion " + shlex.join(list(args))


def _run_state(run: RunPlan) -> str:
    if os.path.isfile(os.path.join(run.run_dir, RESULT_FILE)):
        return "done"
    train = _read_json(os.path.join(run.run_dir, TRAIN_FILE))
    if train and train.get("finished") and os.path.isfile(_last_ckpt(run.run_dir)):
        return "evaluate"
    if os.path.isfile(_last_ckpt(run.run_dir)):
        return "resume"
    return "new"


def _last_ckpt(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "last.ckpt")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _check_unchanged(run: RunPlan) -> None:
    """A run folder made by other settings must not be mixed into this study's table."""
    rec = _read_json(os.path.join(run.run_dir, RUN_FILE))
    if rec and (rec.get("args") != run.args or _jsonable(rec.get("settings")) != _jsonable(run.settings)):
        raise UserError(
            f"{run.run_dir} was made with other settings than this study now gives (the study file or "
            f"command-line overrides changed); use another --name, or delete that folder to redo it"
        )


# ---------------------------------------------------------------------------------------
# the callback that records what only the training process knows


def _recorder_class() -> type:
    import lightning.pytorch as pl

    from unifusion.callbacks import output_dir

    class StudyRecorder(pl.Callback):
        """Writes ``<run>/study_train.json`` at the end of ``fit``: trainable parameters (in
        total and per part), the global step, whether ``max_steps`` was reached, the mean loss
        of the last ``window`` steps and the training loop's it/s (this attempt)."""

        def __init__(self, filename: str = TRAIN_FILE, window: int = 50) -> None:
            self.filename = filename
            self.window = int(window)
            self._losses: list[float] = []
            self._t0: float | None = None
            self._step0 = 0

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._t0, self._step0 = time.perf_counter(), int(trainer.global_step)

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:
                self._losses = (self._losses + [float(loss)])[-self.window :]

        def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.is_global_zero:
                return
            seconds = time.perf_counter() - self._t0 if self._t0 is not None else float("nan")
            steps = int(trainer.global_step) - self._step0
            parts = {
                name: sum(p.numel() for p in m.parameters() if p.requires_grad)
                for name, m in pl_module.named_children()
            }
            dm = trainer.datamodule
            max_steps = int(trainer.max_steps)
            _write_json(
                output_dir(trainer, self.filename),
                {
                    "global_step": int(trainer.global_step),
                    "max_steps": max_steps,
                    "finished": bool(max_steps > 0 and trainer.global_step >= max_steps and not trainer.interrupted),
                    "trainable_params": int(sum(p.numel() for p in pl_module.parameters() if p.requires_grad)),
                    "params_by_part": {k: int(v) for k, v in parts.items() if v},
                    "final_loss": float(np.mean(self._losses)) if self._losses else float("nan"),
                    "loss_window": len(self._losses),
                    "batch_size": getattr(dm, "batch_size", None),
                    "steps_this_attempt": steps,
                    "loop_seconds": seconds,
                    "it_per_s": steps / seconds if seconds and seconds > 0 else float("nan"),
                },
            )

    StudyRecorder.__module__ = __name__
    StudyRecorder.__qualname__ = "StudyRecorder"
    return StudyRecorder


def __getattr__(name: str) -> Any:
    # defined lazily: Lightning is slow to import and `unifusion study --help` / --dry_run need none of it
    if name == "StudyRecorder":
        cls = _recorder_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'unifusion.study' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------
# running


def _cli(args: Sequence[str]) -> list[str]:
    """How a ``unifusion`` command is started: the same interpreter, so a study works from any
    environment (``python -m unifusion.cli`` is the console script's entry point)."""
    return [sys.executable, "-m", "unifusion.cli", *args]


#: running ``unifusion`` children, so an interrupted study stops them (worker threads get no signals)
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def _run_logged(args: Sequence[str], log_path: str, env: dict[str, str] | None = None) -> tuple[int, float]:
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {_display(args)}\n")
        log.flush()
        proc = subprocess.Popen(_cli(args), stdout=log, stderr=subprocess.STDOUT, env=full_env)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM of the study: stop this fit too
            _stop([proc])
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    return rc, time.perf_counter() - t0


def _stop_children() -> None:
    with _CHILDREN_LOCK:
        procs = list(_CHILDREN)
    _stop(procs)


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM (Lightning stops cleanly), then SIGKILL what is still running after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _failure(rc: int, log_path: str) -> str:
    """``exited N: <last error line of the log>`` or ``was killed (signal N)``, in one line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        lines = []
    errors = [line for line in lines if line.startswith("error:") or "Error:" in line or "Exception:" in line]
    what = f"was killed (signal {-rc})" if rc < 0 else f"exited {rc}"
    return what + (f": {errors[-1][:300]}" if errors else "")


def _check_source_data(study: Study, plan: dict[str, Any]) -> None:
    """Shapes shards written before the held-out compositions existed would leak them into training."""
    from unifusion.data import shapes as sw
    from unifusion.data.shards import read_manifest

    for s in plan["sources"]:
        path = str(s.get("path", ""))
        if s.get("cached") or not os.path.isdir(path):
            continue
        manifest = read_manifest(path) or {}
        if manifest.get("generator") == "shapes" and manifest.get("held_out") != sw.HELD_OUT.names():
            raise UserError(
                f"{path} holds shapes shards written without today's held-out compositions (ShapesBench's "
                f"held_out category would be in the training data); delete the folder to regenerate it"
            )


def _ensure_cache(study: Study, plan: dict[str, Any], log: str) -> float:
    """Build the feature cache once; returns the seconds it took (0 when it was there)."""
    cmd = plan["cache_cmd"]
    if cmd is None:
        return 0.0
    stamp = os.path.join(plan["cache_dir"], "study_cache.json")
    rec = _read_json(stamp)
    shared = _jsonable(plan["shared"])
    if rec is not None:
        if rec.get("args") != cmd or rec.get("shared") != shared:
            raise UserError(
                f"the feature cache {plan['cache_dir']} was made by another command (the study's base config "
                f"or shared overrides changed); use another --name, or delete the cache to rebuild it"
            )
        return 0.0
    print(f"feature cache: {_display(cmd)}", flush=True)
    rc, seconds = _run_logged(cmd, log, _job_envs(1, study.threads)[0])
    metas = [os.path.join(s["path"], "cache_meta.json") for s in plan["cache_overlay"]["data"]["init_args"]["sources"]]
    missing = [m for m in metas if not os.path.isfile(m)]
    if rc != 0 or missing:
        raise UserError(f"the feature cache command {_failure(rc, log)} (log: {log})")
    _write_json(stamp, {"args": cmd, "shared": shared, "seconds": seconds})
    print(f"feature cache: done in {seconds:.0f} s -> {plan['cache_dir']}", flush=True)
    return seconds


def _train(run: RunPlan, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Train (or resume) one run; returns (ok, failure message)."""
    rec = _read_json(os.path.join(run.run_dir, RUN_FILE)) or {"arm": run.arm, "seed": run.seed, "args": run.args}
    attempts = list(rec.get("attempts", []))
    args = list(run.args)
    ckpt = _last_ckpt(run.run_dir)
    resumed = os.path.isfile(ckpt)
    if resumed:
        args.append(f"--ckpt_path={ckpt}")
    _write_json(os.path.join(run.run_dir, RUN_FILE), {**rec, "attempts": attempts})
    train_file = os.path.join(run.run_dir, TRAIN_FILE)
    if os.path.exists(train_file):
        os.remove(train_file)  # a stale record must not vouch for this attempt
    log = os.path.join(run.run_dir, "fit.log")
    rc, seconds = _run_logged(args, log, env)
    attempts.append({"seconds": seconds, "exit_status": rc, "resumed": resumed})
    _write_json(os.path.join(run.run_dir, RUN_FILE), {**rec, "attempts": attempts})
    train = _read_json(train_file)
    if rc != 0:
        return False, f"{run.key}: fit {_failure(rc, log)} (log: {log})"
    if not train or not train.get("finished") or not os.path.isfile(ckpt):
        return False, f"{run.key}: fit ended before max_steps or wrote no last.ckpt (log: {log})"
    return True, ""


def _generator(ckpt: str, opts: dict[str, Any]) -> tuple[Any, int]:
    """ShapesBench's ``generate_fn`` for a checkpoint (EMA weights, read with weights_only)."""
    import torch

    from unifusion.pipeline import load_pipeline

    try:  # one "Loading weights" bar per run would bury the study's own progress lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    pipe = load_pipeline(ckpt=ckpt, device=opts.get("device"))

    def generate(prompts: list[str], images: list[list[torch.Tensor]] | None) -> torch.Tensor:
        out = pipe.generate(
            prompts, images, steps=opts.get("steps"), guidance=opts.get("guidance"), seed=0, output_type="pt"
        )
        return out.images

    return generate, int(pipe.image_size)


def evaluate_run(run_dir: str, opts: dict[str, Any]) -> dict[str, Any]:
    """ShapesBench (+ unconditional baseline) on ``<run_dir>/checkpoints/last.ckpt``; writes
    ``<run_dir>/eval/shapesbench.json`` and ``.csv`` (the ``unifusion eval`` formats)."""
    from unifusion.eval.commands import result_rows
    from unifusion.eval.shapesbench import CATEGORIES, ShapesBench, run_shapesbench, trained_on_edits_from_run

    trained_on_edits = trained_on_edits_from_run(run_dir)
    cats = opts.get("categories", "auto")
    if cats in (None, "auto"):
        cats = [c for c in CATEGORIES if not (c == "editing" and trained_on_edits is False)]
    generate, size = _generator(_last_ckpt(run_dir), opts)
    bench = ShapesBench(
        image_size=size, num_per_category=int(opts["num_per_category"]), seed=int(opts["seed"]), categories=cats
    )
    result = run_shapesbench(
        generate,
        bench,
        batch_size=int(opts["batch_size"]),
        trained_on_edits=trained_on_edits,
        baseline=bool(opts["baseline"]),
    )
    result["trained_on_edits"] = trained_on_edits
    if "editing" not in cats:
        result["editing_note"] = "editing not evaluated: the run never trained on edit samples"
    result["settings"] = {k: opts.get(k) for k in ("num_per_category", "seed", "steps", "guidance")}
    out = os.path.join(run_dir, EVAL_JSON)
    _write_json(out, result)
    with open(os.path.splitext(out)[0] + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["bench", "group", "metric", "value"])
        writer.writeheader()
        writer.writerows(result_rows("shapes", result))
    return result


def _result_row(study: Study, run: RunPlan, result: dict[str, Any], eval_s: float) -> dict[str, Any]:
    train = _read_json(os.path.join(run.run_dir, TRAIN_FILE)) or {}
    rec = _read_json(os.path.join(run.run_dir, RUN_FILE)) or {}
    row: dict[str, Any] = {
        "study": study.name,
        "arm": run.arm,
        "seed": run.seed,
        "trainable_params": train.get("trainable_params"),
        "conditioner_params": sum(
            v for k, v in (train.get("params_by_part") or {}).items() if k in ("conditioner", "refiner")
        ),
        "steps": train.get("global_step"),
        "batch_size": train.get("batch_size"),
        "final_loss": train.get("final_loss"),
        "it_per_s": train.get("it_per_s"),
        "train_s": round(sum(a.get("seconds", 0.0) for a in rec.get("attempts", [])), 1),
        "eval_s": round(eval_s, 1),
        "overall": result["overall"],
        "overall_ci_low": result["overall_ci_low"],
        "overall_ci_high": result["overall_ci_high"],
        "overall_excludes": ",".join(result.get("overall_excludes") or []),
        # why editing is missing from the table (not evaluated, or left out of overall)
        "editing_note": result.get("editing_note") or result.get("overall_note") or "",
    }
    for cat, v in result["categories"].items():
        row[cat] = v["accuracy"]
    for k, v in (result.get("baseline") or {}).items():
        row[f"baseline_{k}"] = v
    row["run_dir"] = run.run_dir
    return row


# ---------------------------------------------------------------------------------------
# the report


def _load_rows(study: Study, root: str) -> list[dict[str, Any]]:
    """Every finished run of the study folder (all arms, also those of an earlier pass)."""
    rows = []
    for arm in study.arms:
        arm_dir = os.path.join(root, "runs", arm)
        if not os.path.isdir(arm_dir):
            continue
        for d in sorted(os.listdir(arm_dir), key=lambda s: (len(s), s)):
            row = _read_json(os.path.join(arm_dir, d, RESULT_FILE))
            if row:
                rows.append(row)
    return rows


def _categories(rows: Sequence[dict[str, Any]]) -> list[str]:
    from unifusion.eval.shapesbench import CATEGORIES

    present = {c for r in rows for c in CATEGORIES if r.get(c) is not None}
    return [c for c in CATEGORIES if c in present]


def _items(run_dir: str) -> dict[str, list[float]]:
    """Per-category correctness of every prompt of a run, in prompt order."""
    data = _read_json(os.path.join(run_dir, EVAL_JSON)) or {}
    out: dict[str, list[float]] = {}
    for it in data.get("items") or []:
        out.setdefault(it["category"], []).append(float(it["correct"]))
    return out


def arm_interval(
    runs: Sequence[dict[str, list[float]]],
    categories: Sequence[str],
    num_bootstrap: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % interval of an arm's macro accuracy over ``categories``: resample seeds, and the
    prompts of each category (the same prompts for every seed: paired), with replacement."""
    runs = [r for r in runs if all(r.get(c) for c in categories)]
    if not runs or not categories:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    s = len(runs)
    seed_idx = rng.integers(0, s, size=(num_bootstrap, s))
    total = np.zeros(num_bootstrap)
    for cat in categories:
        c = np.asarray([r[cat] for r in runs], dtype=np.float64)  # (seeds, prompts)
        n = c.shape[1]
        prompt_idx = rng.integers(0, n, size=(num_bootstrap, n))
        per_seed = c[:, prompt_idx].mean(axis=-1).T  # (B, seeds)
        total += np.take_along_axis(per_seed, seed_idx, axis=1).mean(axis=1)
    reps = total / len(categories)
    lo, hi = np.percentile(reps, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return float(lo), float(hi)


def _table(study: Study, rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Per arm and column: mean, std over seeds, 95 % interval, per-seed values."""
    cats = _categories(rows)
    overall_cats = [c for c in cats if c != "editing"] if any(r.get("overall_excludes") for r in rows) else cats
    columns = [_HEADLINE, *cats]
    table = []
    for arm in study.arms:
        arm_rows = [r for r in rows if r["arm"] == arm]
        if not arm_rows:
            continue
        items = [_items(r["run_dir"]) for r in arm_rows]
        cells = {}
        for col in columns:
            vals = np.asarray([float(r[col]) for r in arm_rows if r.get(col) is not None])
            lo, hi = arm_interval(items, overall_cats if col == _HEADLINE else [col])
            cells[col] = {
                "mean": float(vals.mean()) if vals.size else float("nan"),
                "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                "lo": lo,
                "hi": hi,
                "values": vals.tolist(),
            }
        base = {
            col: float(np.mean([r.get(f"baseline_{col}") for r in arm_rows if r.get(f"baseline_{col}") is not None]))
            for col in columns
            if any(r.get(f"baseline_{col}") is not None for r in arm_rows)
        }
        table.append(
            {
                "arm": arm,
                "n": len(arm_rows),
                "cells": cells,
                "baseline": base,
                "params": int(np.median([r["trainable_params"] or 0 for r in arm_rows])),
                "conditioner_params": int(np.median([r.get("conditioner_params") or 0 for r in arm_rows])),
                "steps": sorted({r["steps"] for r in arm_rows}),
                "train_s": float(np.mean([r["train_s"] for r in arm_rows])),
                "eval_s": float(np.mean([r["eval_s"] for r in arm_rows])),
                "it_per_s": float(np.nanmean([_f(r.get("it_per_s")) for r in arm_rows])),
                "final_loss": float(np.nanmean([_f(r.get("final_loss")) for r in arm_rows])),
            }
        )
    return columns, table


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _best_and_ties(table: Sequence[dict[str, Any]], col: str) -> tuple[str | None, set[str]]:
    """The best arm of a column and the arms whose interval overlaps the best one's."""
    scored = [t for t in table if not math.isnan(t["cells"][col]["mean"])]
    if not scored:
        return None, set()
    best = max(scored, key=lambda t: t["cells"][col]["mean"])
    b = best["cells"][col]
    ties = {
        t["arm"]
        for t in scored
        if t is not best and not math.isnan(t["cells"][col]["hi"]) and t["cells"][col]["hi"] >= b["lo"]
    }
    return best["arm"], ties


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def write_summary_md(study: Study, rows: Sequence[dict[str, Any]], path: str, wall: dict[str, float]) -> str:
    columns, table = _table(study, rows)
    marks = {col: _best_and_ties(table, col) for col in columns}
    seeds = sorted({r["seed"] for r in rows})
    notes = sorted({n for r in rows for n in [_editing_note(r)] if n})
    lines = [
        f"# Study `{study.name}`",
        "",
        *([study.description.strip(), ""] if study.description else []),
        f"Command: `unifusion study -c {study.path}`"
        + (f" (command-line overrides: `{' '.join(study.cli_overrides)}`)" if study.cli_overrides else ""),
        "",
        f"{len(rows)} runs: {len(table)} arms x seeds {seeds}. Wall time of `unifusion study` on this machine: "
        f"{wall.get('study_s', 0) / 60:.1f} min in all (feature cache {wall.get('cache_s', 0) / 60:.1f} min; "
        f"summed over runs: training {wall.get('train_s', 0) / 60:.1f} min, ShapesBench "
        f"{wall.get('eval_s', 0) / 60:.1f} min).",
        "",
        "ShapesBench accuracy per arm: **mean ± std over seeds** and [95 % interval] from a bootstrap "
        "over seeds and prompts. Per column **bold** = best arm, ≈ = a tie with it (the intervals overlap). "
        f"`{_HEADLINE}` is the mean over the categories shown"
        + (" (editing excluded: the runs never trained on edits)." if notes else ".")
        + " Params = trainable parameters (conditioner + refiner in brackets).",
        "",
    ]
    head = ["arm", "params", *columns, "loss", "it/s", "train s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for t in table:
        cells = [f"`{t['arm']}`", f"{_fmt_params(t['params'])} ({_fmt_params(t['conditioner_params'])})"]
        for col in columns:
            c = t["cells"][col]
            best, ties = marks[col]
            txt = f"{c['mean']:.2f} ± {c['std']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]"
            if t["arm"] == best:
                txt = f"**{txt}**"
            elif t["arm"] in ties:
                txt = f"≈ {txt}"
            cells.append(txt)
        cells += [f"{t['final_loss']:.3f}", f"{t['it_per_s']:.2f}", f"{t['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    base_cells = ["unconditional baseline", ""]
    for col in columns:
        vals = [t["baseline"][col] for t in table if col in t["baseline"]]
        base_cells.append(f"{np.mean(vals):.2f}" if vals else "–")
    lines.append("| " + " | ".join(base_cells + ["", "", ""]) + " |")
    lines.append("")
    steps = {s for t in table for s in t["steps"]}
    batches = {r.get("batch_size") for r in rows}
    if len(steps) > 1 or len(batches) > 1:
        lines.append(f"**Unequal budget**: steps {sorted(steps)}, batch sizes {sorted(map(str, batches))}.")
    else:
        lines.append(f"Equal budget: {next(iter(steps))} steps at batch {next(iter(batches))} for every run.")
    lines += [f"{n}." for n in notes]
    lines += [
        "",
        "Per run: `results.csv`; per prompt: `runs/<arm>/seed<k>/eval/shapesbench.json`. "
        "Plot: `summary.png`. TensorBoard: `tensorboard --logdir " + os.path.dirname(path) + "` (HPARAMS tab).",
        "",
    ]
    text = "\n".join(line for line in lines if line is not None)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def _editing_note(row: dict[str, Any]) -> str:
    note = str(row.get("editing_note") or "")
    return note[:1].upper() + note[1:] if note else ""


_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
]
#: short column labels for the plot
_SHORT = {
    "single_object": "single",
    "color_binding": "binding",
    "relative_position": "position",
    "held_out": "held-out",
}


def write_summary_png(study: Study, rows: Sequence[dict[str, Any]], path: str) -> str:
    """Grouped bars (one group per column, one bar per arm) with 95 % interval whiskers, seed dots
    and the unconditional baseline as a dashed line; drawn with PIL (no plotting library)."""
    from PIL import Image, ImageDraw, ImageFont

    columns, table = _table(study, rows)
    font = ImageFont.load_default()
    n_arms = max(1, len(table))
    bar_w = 14
    group_w = max(n_arms * bar_w + 26, 80)
    left, top, plot_h = 46, 40, 240
    per_row = 4
    legend_h = 18 * ((n_arms + per_row - 1) // per_row + 1)
    w = max(left + group_w * len(columns) + 20, 620)
    h = top + plot_h + 34 + legend_h + 8
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text(
        (8, 8), f"study {study.name}: ShapesBench accuracy, mean over seeds with 95% interval", fill="black", font=font
    )

    def y(v: float) -> float:
        return top + plot_h * (1 - max(0.0, min(1.0, v)))

    for k in range(6):
        v = k / 5
        d.line([left - 4, y(v), w - 10, y(v)], fill=(225, 225, 225))
        d.text((8, y(v) - 6), f"{v:.1f}", fill="black", font=font)
    d.line([left, top, left, top + plot_h], fill="black")
    for g, col in enumerate(columns):
        gx = left + 12 + g * group_w
        x_end = gx + n_arms * bar_w
        for i, t in enumerate(table):
            c = t["cells"][col]
            if math.isnan(c["mean"]):
                continue
            x0 = gx + i * bar_w
            xm = x0 + (bar_w - 3) / 2
            d.rectangle([x0, y(c["mean"]), x0 + bar_w - 3, y(0)], fill=_PALETTE[i % len(_PALETTE)])
            if not math.isnan(c["lo"]):
                d.line([xm, y(c["lo"]), xm, y(c["hi"])], fill="black")
                d.line([xm - 3, y(c["lo"]), xm + 3, y(c["lo"])], fill="black")
                d.line([xm - 3, y(c["hi"]), xm + 3, y(c["hi"])], fill="black")
            for v in c["values"]:  # one dot per seed
                d.ellipse([xm - 2, y(v) - 2, xm + 2, y(v) + 2], outline="black", fill="white")
        base = [t["baseline"][col] for t in table if col in t["baseline"]]
        if base:
            yb = y(float(np.mean(base)))
            for x in range(int(gx) - 4, int(x_end) + 2, 7):
                d.line([x, yb, min(x + 4, x_end + 2), yb], fill=(60, 60, 60), width=2)
        label = _SHORT.get(col, col)
        tw = d.textlength(label, font=font)
        d.text((gx + (x_end - gx - tw) / 2, top + plot_h + 6), label, fill="black", font=font)
    ly = top + plot_h + 28
    for i, t in enumerate(table):
        lx = left + (i % per_row) * 150
        yy = ly + 18 * (i // per_row)
        d.rectangle([lx, yy, lx + 10, yy + 10], fill=_PALETTE[i % len(_PALETTE)])
        d.text((lx + 14, yy), f"{t['arm']} (n={t['n']})", fill="black", font=font)
    yy = ly + 18 * ((n_arms + per_row - 1) // per_row)
    for x in range(left, left + 24, 7):
        d.line([x, yy + 5, x + 4, yy + 5], fill=(60, 60, 60), width=2)
    d.text(
        (left + 30, yy),
        "unconditional baseline (empty prompt); whiskers: 95% interval; dots: seeds",
        fill="black",
        font=font,
    )
    img.save(path)
    return path


def write_results_csv(rows: Sequence[dict[str, Any]], path: str) -> str:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    # run_dir last, to keep the numbers together
    fields = [f for f in fields if f != "run_dir"] + (["run_dir"] if "run_dir" in fields else [])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_hparams(rows: Sequence[dict[str, Any]], out_dir: str) -> str:
    """One TensorBoard hparams entry per run (rewritten from the rows each time, so a resumed
    study shows each run once)."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(out_dir, ignore_errors=True)
    cats = _categories(rows)
    writer = SummaryWriter(out_dir)
    try:
        for r in rows:
            hp = {
                "arm": r["arm"],
                "seed": int(r["seed"]),
                "trainable_params": int(r.get("trainable_params") or 0),
                "steps": int(r.get("steps") or 0),
            }
            metrics = {"shapesbench/overall": float(r["overall"])}
            metrics.update({f"shapesbench/{c}": float(r[c]) for c in cats if r.get(c) is not None})
            metrics["train/final_loss"] = _f(r.get("final_loss"))
            writer.add_hparams(hp, metrics, run_name=f"{r['arm']}_seed{r['seed']}")
    finally:
        writer.close()
    return out_dir


def summarize_study(study: Study, root: str) -> dict[str, Any]:
    """(Re)write results.csv, summary.md, summary.png and hparams/ from every finished run."""
    rows = _load_rows(study, root)
    if not rows:
        return {"rows": 0}
    cache = _read_json(os.path.join(root, "cache", "study_cache.json")) or {}
    wall = {
        "train_s": sum(float(r["train_s"]) for r in rows),
        "eval_s": sum(float(r["eval_s"]) for r in rows),
        "cache_s": float(cache.get("seconds", 0.0)),
        "study_s": 60 * sum(float(i.get("minutes", 0)) for i in _read_json(os.path.join(root, INVOCATIONS_FILE)) or []),
    }
    out = {
        "rows": len(rows),
        "results_csv": write_results_csv(rows, os.path.join(root, "results.csv")),
        "summary_md": os.path.join(root, "summary.md"),
        "summary_png": write_summary_png(study, rows, os.path.join(root, "summary.png")),
        "hparams": write_hparams(rows, os.path.join(root, "hparams")),
        "wall": wall,
    }
    write_summary_md(study, rows, out["summary_md"], wall)
    return out


# ---------------------------------------------------------------------------------------
# the command


def _estimate(study: Study, plan: dict[str, Any], todo: Sequence[RunPlan], root: str) -> tuple[float, str]:
    """Seconds the plan will take, from the configured steps and a measured (earlier runs of
    this study) or configured it/s."""
    done = _load_rows(study, root)
    its = [_f(r.get("it_per_s")) for r in done if _f(r.get("it_per_s")) > 0]
    evals = [_f(r.get("eval_s")) for r in done if _f(r.get("eval_s")) > 0]
    it_s = float(np.median(its)) if its else float(study.estimate["it_per_s"])
    source = f"measured over {len(its)} earlier runs" if its else "configured"
    eval_s = float(np.median(evals)) if evals else float(study.estimate["eval_s"])
    steps = int(_get(plan["config"], "trainer.max_steps", 0) or 0)
    train = sum(steps / it_s + float(study.estimate["startup_s"]) for r in todo if r.state in ("new", "resume"))
    # concurrent fits share the machine: it/s measured (or configured) under the same `jobs`
    total = train / max(1, study.jobs) + eval_s * sum(r.state != "done" for r in todo)
    cache_todo = plan["cache_cmd"] is not None and not os.path.isfile(
        os.path.join(plan["cache_dir"], "study_cache.json")
    )
    if cache_todo:
        total += float(study.estimate["cache_s"])
    text = (
        f"{steps} steps / {it_s:.2f} it/s ({source}) + {study.estimate['startup_s']:.0f} s start per run"
        + (f", {study.jobs} at a time" if study.jobs > 1 else "")
        + ", "
        f"{eval_s:.0f} s eval per run" + (f", {study.estimate['cache_s']:.0f} s feature cache" if cache_todo else "")
    )
    return total, text


def _print_plan(study: Study, plan: dict[str, Any], arms: Sequence[str], seeds: Sequence[int], root: str) -> None:
    todo = plan["runs"]
    print(f"study {study.name}: {len(arms)} arms x {len(seeds)} seeds = {len(todo)} runs -> {root}")
    print(f"  arms: {', '.join(arms)}" + (f" (all: {', '.join(study.arms)})" if set(arms) != set(study.arms) else ""))
    print(f"  seeds: {list(seeds)} (set: {', '.join(study.seed_keys)})")
    print(
        f"  fits at a time: {study.jobs}; torch threads per fit: "
        + (str(study.threads) if study.threads else "default" if study.jobs == 1 else "a share of the cores")
    )
    print(f"  base: {' '.join(study.base)}")
    if study.overrides:
        print(
            "  shared overrides ("
            + plan["shared_yaml"]
            + "): "
            + ", ".join(f"{k}={_cli_value(v)}" for k, v in study.overrides.items())
        )
    if study.cli_overrides:
        print(f"  command-line overrides: {' '.join(study.cli_overrides)}")
    for name in arms:
        arm = study.arms[name]
        parts = [*arm.configs, *(f"--{k}={_cli_value(v)}" for k, v in arm.overrides.items())]
        print(f"  arm {name}: {' '.join(parts) or '(the base config)'}")
    if plan["cache_cmd"]:
        state = "there" if os.path.isfile(os.path.join(plan["cache_dir"], "study_cache.json")) else "to build"
        print(f"feature cache ({state}): {_display(plan['cache_cmd'])}")
        print(f"  runs read it through {plan['cache_yaml']}: {json.dumps(plan['cache_overlay'])}")
    print("runs:")
    for r in todo:
        extra = f" --ckpt_path={_last_ckpt(r.run_dir)}" if r.state == "resume" else ""
        print(f"  [{r.state}] {r.key}: {_display(r.args)}{extra}")
    ev = study.eval
    print(
        f"eval: ShapesBench on each run's last.ckpt ({ev['num_per_category']} prompts per category, bench seed "
        f"{ev['seed']}, steps {ev['steps'] or 'as trained'}, guidance {ev['guidance'] or 'as trained'}"
        + (", with the unconditional baseline" if ev["baseline"] else "")
        + "; editing only if the runs trained on edits)"
    )
    seconds, how = _estimate(study, plan, todo, root)
    print(f"estimated time: {seconds / 60:.1f} min ({how})")


def study_command(
    config: list[str],
    arms: str | None = None,
    seeds: int | None = None,
    dry_run: bool = False,
    name: str | None = None,
    out: str = os.path.join("runs", "studies"),
    jobs: int | None = None,
) -> dict[str, Any]:
    """Train and compare conditioner arms x seeds on an equal budget; see :mod:`unifusion.study`.

    Args:
        config: ``-c STUDY.yaml`` (a study file: base configs, shared overrides, arms), plus
            optional extra ``-c`` overlays and ``--trainer.*``/``--model.*``/``--data.*``
            overrides applied to every run (and to the feature cache).
        arms: comma-separated arms to run (default: the file's ``default_arms``).
        seeds: number of seeds per arm (default: the file's ``seeds``).
        dry_run: print the plan (commands, overrides, estimated time) and run nothing.
        name: study name = output folder ``OUT/NAME`` (default: the file's ``name``).
        out: where study folders go.
        jobs: fits to run at once (default: the file's ``jobs``, else 1); each gets its own GPU
            when there are several, else the file's ``threads`` (or an equal share of the CPU
            cores). Wall times and it/s in the table are measured under that sharing: compare
            arms within one study, not across ``jobs`` settings.
    """
    path, extra_configs, cli_overrides = _split_config_args(config)
    study = load_study(path, cli_overrides, extra_configs)
    if name:
        study.name = name
    chosen = [a.strip() for a in arms.split(",") if a.strip()] if arms else list(study.default_arms)
    bad = [a for a in chosen if a not in study.arms]
    if bad:
        raise UserError(f"unknown arm(s) {', '.join(bad)}; arms in {path}: {', '.join(study.arms)}")
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if jobs is not None:
        if jobs < 1:
            raise UserError(f"--jobs must be >= 1, got {jobs}")
        study.jobs = jobs
    seed_list = list(range(seeds)) if seeds is not None else list(study.seeds)
    root = study_dir(study, out)
    plan = build_plan(study, chosen, seed_list, root)
    for r in plan["runs"]:
        r.state = _run_state(r)
        if r.state != "new":
            _check_unchanged(r)
    if dry_run:
        _print_plan(study, plan, chosen, seed_list, root)
        return {"dry_run": True, "runs": len(plan["runs"]), "root": root}

    write_overlays(plan)
    previous = _on_sigterm_interrupt()
    try:
        return _execute(study, plan, root, study.jobs)
    except KeyboardInterrupt:
        # the running fits were stopped; their last.ckpt (written atomically) is kept
        raise UserError(f"study {study.name} interrupted; run the same command again to resume") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm_interrupt() -> Any:
    """Treat SIGTERM (a scheduler's preemption, ``kill``) like Ctrl-C, so the running ``fit`` is
    stopped with the study instead of being left to run on alone; returns the old handler."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _job_envs(jobs: int, threads: int | None) -> list[dict[str, str]]:
    """Environment of each concurrent training slot: its own GPU when there are several, else
    ``threads`` (default: an equal share of the cores) CPU threads per fit."""
    gpus = 0
    if jobs > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        try:
            import torch

            gpus = torch.cuda.device_count()
        except ImportError:
            gpus = 0
    envs: list[dict[str, str]] = [{"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else {} for i in range(jobs)]
    if threads is None and jobs > 1 and not gpus:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    if threads is not None:
        # torch reads these at start-up; more threads than free cores make small CPU ops
        # crawl (OpenMP threads wait for each other), so a share per fit is faster
        for env in envs:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return envs


_SAY_LOCK = threading.Lock()


def _say(line: str) -> None:
    """One progress line, whole: concurrent training slots report from their own threads."""
    with _SAY_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _execute(study: Study, plan: dict[str, Any], root: str, jobs: int = 1) -> dict[str, Any]:
    t_start = time.perf_counter()
    if study.threads is not None:  # ShapesBench runs here, maybe beside running fits
        import torch

        torch.set_num_threads(study.threads)
    _check_source_data(study, plan)
    _ensure_cache(study, plan, os.path.join(root, "cache.log"))
    failures: list[str] = []
    counts = {"done": 0, "trained": 0, "evaluated": 0}
    todo = plan["runs"]
    tags = {id(r): f"[{i}/{len(todo)}] {r.key}" for i, r in enumerate(todo, 1)}
    for run in todo:
        if run.state == "done":
            counts["done"] += 1
            _say(f"{tags[id(run)]}: finished earlier, skipped")

    def evaluate(run: RunPlan) -> None:
        tag = tags[id(run)]
        t0 = time.perf_counter()
        try:
            result = evaluate_run(run.run_dir, study.eval)
        except Exception as e:  # one broken run must not cost the others their results
            msg = f"{run.key}: ShapesBench failed: {first_line(e, with_type=True)}"
            failures.append(msg)
            _say(f"{tag}: FAILED: {msg}")
            return
        eval_s = time.perf_counter() - t0
        row = _result_row(study, run, result, eval_s)
        _write_json(os.path.join(run.run_dir, RESULT_FILE), row)
        counts["evaluated"] += 1
        _say(
            f"{tag}: ShapesBench overall {row['overall']:.3f} [{row['overall_ci_low']:.2f}, "
            f"{row['overall_ci_high']:.2f}] in {eval_s:.0f} s"
        )

    def trained(run: RunPlan, ok: bool, msg: str) -> None:
        tag = tags[id(run)]
        if not ok:
            failures.append(msg)
            _say(f"{tag}: FAILED: {msg}")
            return
        counts["trained"] += 1
        train = _read_json(os.path.join(run.run_dir, TRAIN_FILE)) or {}
        _say(
            f"{tag}: trained {train.get('global_step')} steps ({_f(train.get('it_per_s')):.2f} it/s, "
            f"final loss {_f(train.get('final_loss')):.4f}, {train.get('trainable_params')} trainable params)"
        )
        evaluate(run)

    for run in todo:
        if run.state == "evaluate":
            evaluate(run)
    to_train = [r for r in todo if r.state in ("new", "resume")]
    for run in to_train:
        _write_json(
            os.path.join(run.run_dir, RUN_FILE),
            {
                **(_read_json(os.path.join(run.run_dir, RUN_FILE)) or {}),
                "arm": run.arm,
                "seed": run.seed,
                "args": run.args,
                "settings": run.settings,
            },
        )
    envs = _job_envs(jobs, study.threads)
    slots: queue.Queue[dict[str, str]] = queue.Queue()
    for env in envs:
        slots.put(env)

    def train_in_slot(run: RunPlan) -> tuple[bool, str]:
        env = slots.get()
        try:
            what = "resuming from last.ckpt" if run.state == "resume" else "training"
            _say(f"{tags[id(run)]}: {what} ...")
            return _train(run, env)
        finally:
            slots.put(env)

    if len(envs) == 1:
        for run in to_train:
            trained(run, *train_in_slot(run))
    else:
        # fits run concurrently; ShapesBench runs here, one run at a time, as fits finish
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(envs)) as pool:
            futures = {pool.submit(train_in_slot, r): r for r in to_train}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    trained(futures[fut], *fut.result())
            except BaseException:
                # before the pool's exit, which waits for the running fits
                for f in futures:
                    f.cancel()
                _stop_children()
                raise
    minutes = (time.perf_counter() - t_start) / 60
    log_path = os.path.join(root, INVOCATIONS_FILE)
    invocations = _read_json(log_path) or []
    invocations.append(
        {
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "minutes": round(minutes, 2),
            "jobs": jobs,
            "threads": study.threads,
            "runs": [r.key for r in todo],
            **counts,
            "failed": len(failures),
        }
    )
    _write_json(log_path, invocations)
    summary = summarize_study(study, root)
    print(
        f"study {study.name}: {counts['trained']} trained, {counts['evaluated']} evaluated, {counts['done']} skipped "
        f"(finished earlier), {len(failures)} failed in {minutes:.1f} min; "
        + (
            f"table: {summary['summary_md']}, plot: {summary['summary_png']}"
            if summary.get("rows")
            else "no results yet"
        ),
        flush=True,
    )
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise UserError(f"study {study.name}: {len(failures)} of {len(todo)} runs failed: {failures[0]}{more}")
    return {"root": root, **counts, **summary}
