"""Quality benchmark: MLC-NC against baselines and ablations on the built-in `synthetic_lt`.

Protocol (the paper's, scaled to a 2-core CPU); every run fine-tunes the shipped trunk
(mlcnc_jax/trunks/: pre-trained on 20 *other* classes, the stand-in for ImageNet) with the
default config's data, model and schedule (configs/default.py), changing only what a row
changes:

1. Selection on a validation split carved from the long-tailed training split
   (config.data.val_fraction), seed 0, at the short budget: every row's learning rate
   from a small grid and, for MLC-NC, the initial logit scale (kept for the ablations).
   The test split is never looked at here.
2. The chosen settings on the full training split, evaluated on the test split:
   - part 'main': MLC-NC, BCE class-aware, BCE uniform (and the best other baseline by
     validation mAP, when the 'baselines' part's selection has run), 5 seeds, at a short
     and at a long budget;
   - part 'ablations': the MLC-NC ablations, 3 seeds, long budget;
   - part 'baselines': the other baselines (focal, ASL, DB-focal, two-way; each with
     class-aware and uniform sampling), 3 seeds, long budget.
   - part 'second_split': the main rows on a second, independent split (another generation
     seed; the training split made by lt_builder.py from a balanced pool with more objects
     per image), 3 seeds, long budget, with the settings chosen on the first split;
   - part 'budget': MLC-NC and the class-aware main baselines at 2x and 4x the long
     budget (BCE class-aware also at 8x), 3 seeds: do more steps still help, and do the
     verdicts change?
   - part 'vit': a hybrid ViT trunk (vit_hybrid_cpu32) pre-trained on the 'pretrain' classes by
     configs/pretrain.py, then MLC-NC and BCE class-aware fine-tuned from it, 3 seeds.
   The data set stays the same; the seed changes initialisation, sampling and augmentation.
3. Differences of MLC-NC minus the best sampler-matched baseline with a 95 % Welch
   interval, neural-collapse measures, and a verdict per claim of the paper.

Runs are spread over `--workers` processes, each pinned to one core (on 2 cores two
single-threaded runs side by side do 1.26x the work of one run on both). Finished runs are
cached as one JSON file each, so an interrupted benchmark continues where it stopped and a
later invocation with more parts reuses the runs it shares. Writes quality.md (tables,
verdict, commands, machine), quality.json and quality.png to --out.

    python -m benchmarks.quality --parts main          # the main rows (~75 min, 2 cores)
    python -m benchmarks.quality                       # every part
    python -m benchmarks.quality --quick               # end-to-end smoke test (~3 min)
    python -m benchmarks.quality --parts main,ablations \
        --seed_cache benchmarks/results/quality.json   # a fresh checkout: reuse its runs
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import ROOT
from configs import ablations, pretrain
from mlcnc_jax.groups import COLOURS, GROUPS

METRICS = ("total", *GROUPS, "nc1", "nc2", "mean_angle")
FINDINGS_BEGIN = "<!-- findings: kept when the script rewrites this file -->"
FINDINGS_END = "<!-- end of findings -->"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Budgets, seeds and grids (the same for every row)."""

    short_steps: int = 120  # 10 'epochs' of 12 steps
    long_steps: int = 360  # the default run's 10 x 36
    # Part 'budget': do MLC-NC and the best baselines still improve with 2x, 4x (and BCE
    # class-aware 8x) the long budget?
    double_steps: int = 720
    quadruple_steps: int = 1440
    octuple_steps: int = 2880
    epochs: int = 10  # the steps form this many epochs (prototype updates, FLA warm-up unit)
    main_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    other_seeds: tuple[int, ...] = (0, 1, 2)
    val_fraction: float = 0.25
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    logit_scale_grid: tuple[float, ...] = (8.0, 16.0)
    vit_pretrain_steps: int = 0  # 0: configs/pretrain.py's (10 epochs of the 10,000 images)
    # A trunk below this test mAP on its own classes (chance about 8) has learned too little
    # for fine-tuning from it to show anything: its rows are not run (the ResNet one has 95+).
    min_trunk_map: float = 50.0


QUICK = Protocol(
    short_steps=10,
    long_steps=20,
    double_steps=40,
    quadruple_steps=80,
    octuple_steps=160,
    epochs=2,
    main_seeds=(0,),
    other_seeds=(0,),
    lr_grid=(1e-3,),
    logit_scale_grid=(16.0,),
    vit_pretrain_steps=10,
    min_trunk_map=0.0,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: `name` is an entry of configs/ablations.VARIANTS."""

    name: str
    description: str

    @property
    def is_mlcnc(self) -> bool:
        return ablations.VARIANTS[self.name].get("model.name", "mlcnc") == "mlcnc"

    @property
    def sampling(self) -> str:
        return ablations.VARIANTS[self.name].get("data.sampling", "class_aware")


_LOSSES = {"bce": "BCE", "focal": "focal", "asl": "ASL", "db": "DB-focal", "two_way": "two-way"}
_SAMPLERS = {"aware": "class-aware", "uniform": "uniform"}
BASELINES = [
    Variant(f"{loss}_{s}", f"plain model (global pooling, linear classifier), {label}, {text}")
    for loss, label in _LOSSES.items()
    for s, text in _SAMPLERS.items()
]
ABLATIONS = [
    Variant("no_fla", "MLC-NC without FLA (and its warm-up)"),
    Variant("no_fpc", "MLC-NC without FPC"),
    Variant("linear_classifier", "MLC-NC, trainable linear classifier instead of the ETF"),
    Variant("trainable_etf", "MLC-NC, ETF-initialised classifier left trainable"),
    Variant("cumulative_prototypes", "MLC-NC, prototypes accumulated over the whole run"),
    Variant("cosine_attention", "MLC-NC, parameter-free cosine attention (the paper's text)"),
]
MLCNC = Variant("mlcnc", "MLC-NC (default config), class-aware")
VARIANTS = {v.name: v for v in [MLCNC, *BASELINES, *ABLATIONS]}
MAIN = ("mlcnc", "bce_aware", "bce_uniform")
OTHER_BASELINES = tuple(v.name for v in BASELINES if v.name not in MAIN)
PARTS = ("main", "ablations", "baselines", "second_split", "budget", "vit")
# The second, independent check: the same classes with another generation seed, the training
# split made by the long-tailed split builder (lt_builder.py) over a balanced pool with more
# objects per image, and its own test split.
SECOND_SPLIT = {"data.synthetic_seed": 1, "data.synthetic_train_split": "dbloss"}
BUDGET_TITLES = {
    "long": "long budget",
    "short": "short budget",
    "double": "twice the long budget (part 'budget')",
    "quadruple": "four times the long budget (part 'budget')",
    "octuple": "eight times the long budget (part 'budget')",
    "second": "second split (synthetic_seed 1, lt_builder's long tail), long budget",
    "vit": "hybrid ViT backbone (vit_hybrid_cpu32, its own trunk pre-trained as the ResNet one), long budget",
}
# Part 'vit': a ViT trunk pre-trained on the 'pretrain' classes by configs/pretrain.py (as the
# shipped ResNet trunk was), then these rows fine-tuned from it.
VIT_BACKBONE = "vit_hybrid_cpu32"
VIT_PRETRAIN_LR = 1e-3
VIT_ROWS = ("mlcnc", "bce_aware")
# Part 'budget': MLC-NC and the class-aware baselines of the main rows, trained twice and
# four times as long, show whether the long budget is long enough for them to stop improving
# and whether the verdicts change with more steps; BCE class-aware, the plainest baseline,
# also at eight times.
LADDER = ("long", "double", "quadruple", "octuple")
BUDGET_ROWS = ("mlcnc", "bce_aware")  # and the best of the other baselines, if class-aware
OCTUPLE_ROWS = ("bce_aware",)


def budget_steps(protocol: Protocol) -> dict[str, int]:
    """Training steps of each budget (a table's runs)."""
    p = protocol
    return {
        "long": p.long_steps,
        "short": p.short_steps,
        "double": p.double_steps,
        "quadruple": p.quadruple_steps,
        "octuple": p.octuple_steps,
        "second": p.long_steps,
        "vit": p.long_steps,
    }


# ----------------------------------------------------------------------------- configs


def run_config(
    name: str,
    steps: int,
    protocol: Protocol,
    *,
    data_root: str,
    lr: float,
    logit_scale: float,
    seed: int,
    validation: bool,
    second_split: bool = False,
    vit_trunk: str = "",
):
    """The full config of one run: configs/default.py with the row's and the run's changes.

    `vit_trunk`: fine-tune the ViT backbone from this pre-training workdir instead.
    """
    c = ablations.get_config(name)
    if vit_trunk:
        c.model.backbone = VIT_BACKBONE
        c.model.pretrained = vit_trunk
    for key, value in (SECOND_SPLIT if second_split else {}).items():
        section, field = key.split(".")
        setattr(c[section], field, value)
    c.data.root = data_root
    c.train.num_epochs = protocol.epochs
    c.train.steps_per_epoch = max(1, steps // protocol.epochs)
    # One evaluation and one checkpoint, at the end.
    c.train.eval_every_epochs = 10**6
    c.train.checkpoint_every_steps = 10**9
    c.train.keep_checkpoints = 1
    c.train.log_every_steps = 50
    c.train.learning_rate = float(lr)
    if VARIANTS[name].is_mlcnc:
        c.model.logit_scale_init = float(logit_scale)
    c.seed = int(seed)
    c.data.val_fraction = protocol.val_fraction if validation else 0.0
    return c


# What shapes a run besides its config (set by main): the version of the generated data and
# the trunk's hash, so that a change of either retrains instead of reusing stale runs.
_SALT: dict[str, str | None] = {"synthetic_lt": None, "trunk": None}


# Config fields added after runs were cached, with their value then: left out of the key at
# that value, so that the cached runs stay valid.
_ADDED_FIELDS = {("data", "synthetic_train_split"): "planned", ("eval", "max_images"): 0}


def config_hash(config) -> str:
    """Short hash of the config and of the settings outside it: the key of a cached run.

    Where the checkout and the data are is left out (the salt says what they hold), so the
    keys stay the same in another checkout or on another machine.
    """
    from mlcnc_jax import trunks

    fields = json.loads(config.to_json())
    for (section, field), value in _ADDED_FIELDS.items():
        if fields.get(section, {}).get(field, value) == value:
            fields.get(section, {}).pop(field, None)
    fields["data"]["root"] = "<data root>"
    if fields["model"]["pretrained"] == trunks.SYNTHETIC_PRETRAIN:
        fields["model"]["pretrained"] = "<shipped trunk>"
    text = json.dumps(fields, sort_keys=True) + json.dumps(_SALT, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run: a tag, its config and the key of its cache file.

    The key is made where the job is (in the main process, which knows the salt).
    """

    tag: str
    config: Any
    key: str = ""
    keep_workdir: bool = False  # keep the checkpoints (a trunk); else deleted

    @property
    def config_hash(self) -> str:
        return self.key.rsplit("_", 1)[1]

    @classmethod
    def of(cls, tag: str, config) -> Job:
        return cls(tag, config, f"{tag}_{config_hash(config)}")


def weak_trunk(trunk: dict, protocol: Protocol) -> list[str]:
    """[why its rows are not run] for a pre-trained trunk below protocol.min_trunk_map, else []."""
    trunk_map = max(_num(trunk["map"]["total"]), _num(trunk["map_ema"]["total"]))
    if trunk_map >= protocol.min_trunk_map:
        return []
    return [  # NaN (a trunk without a score) too
        f"the rows of part 'vit': its trunk reached only {trunk_map:.1f} mAP on its own "
        f"classes (below {protocol.min_trunk_map:g}), too little to fine-tune from"
    ]


def vit_pretrain_job(data_root: str, protocol: Protocol) -> Job:
    """configs/pretrain.py with the ViT backbone (its workdir is kept: it is the trunk)."""
    c = pretrain.get_config()
    c.data.root = data_root
    if protocol.vit_pretrain_steps:
        c.train.num_epochs = 1
        c.train.steps_per_epoch = protocol.vit_pretrain_steps
        c.train.eval_every_epochs = 1
    c.model.backbone = VIT_BACKBONE
    c.train.learning_rate = VIT_PRETRAIN_LR
    job = Job.of("pretrain_vit", c)
    return dataclasses.replace(job, keep_workdir=True)


def seed_cache(results_path: str, cache_dir: str, protocol: Protocol, data_root: str) -> int:
    """Fills the run cache from a results file of this script (e.g. the committed quality.json).

    A fresh checkout then adds parts without rerunning the runs that file reports. Each run
    is keyed again from its tag, the file's selection and today's configs; a file of another
    protocol gives nothing. (Its own keys may name another checkout's paths, which older
    versions of this script hashed.) A ViT trunk comes without its checkpoints: enough to
    know it is too weak to fine-tune.

    Returns:
      How many records were written (the ones already cached are left alone).
    """
    with open(results_path) as f:
        payload = json.load(f)
    ours = json.loads(json.dumps(dataclasses.asdict(protocol)))
    # A field the file lacks was added to the protocol later: no run of the file used it.
    if any(payload["protocol"].get(k, v) != v for k, v in ours.items()):
        raise ValueError(
            f"{results_path} follows another protocol ({payload['protocol']}) than this "
            f"invocation ({ours}): none of its runs can stand for today's; run the benchmark "
            "without --seed_cache."
        )
    chosen = payload["selection"]
    steps = budget_steps(protocol)
    records: dict[str, dict] = {}
    for budget, rows in payload["runs"].items():
        if budget == "vit":  # its rows name their trunk's workdir: not kept
            continue
        for name, row in rows.items():
            for r in row:
                seed = int(r["tag"].rsplit("_s", 1)[1])
                (job,) = final_jobs(
                    name, chosen[name], steps[budget], [seed], protocol, data_root, budget
                )
                records[job.key] = {**r, "tag": job.tag, "config_hash": job.config_hash}
    for name, sel in chosen.items():
        for point in sel["grid"]:
            job = val_job(name, point["lr"], point["logit_scale"], protocol, data_root)
            records[job.key] = {
                "tag": job.tag,
                "config_hash": job.config_hash,
                "seconds": point["seconds"],
                "map": point["val_map"],
            }
    if payload.get("vit_trunk"):
        v, job = payload["vit_trunk"], vit_pretrain_job(data_root, protocol)
        records[job.key] = {
            "tag": job.tag,
            "config_hash": job.config_hash,
            "seconds": v["seconds"],
            "map": {"total": v["test_map"]},
            "map_ema": {"total": v["test_map_ema"]},
            "workdir": None,  # not in the file: a strong trunk must be trained again
        }
    os.makedirs(os.path.join(cache_dir, "runs"), exist_ok=True)
    written = 0
    for key, record in records.items():
        path = os.path.join(cache_dir, "runs", f"{key}.json")
        if not os.path.exists(path):
            with open(path, "w") as f:
                json.dump({**record, "seeded_from": results_path}, f, indent=1)
            written += 1
    return written


def _workdir(cache_dir: str, job: Job) -> str:
    return os.path.join(cache_dir, "work", job.key)


def _cache_path(cache_dir: str, job: Job) -> str:
    return os.path.join(cache_dir, "runs", f"{job.key}.json")


def execute(job: Job, cache_dir: str) -> dict:
    """Trains and evaluates one run in this process, caching the result as JSON."""
    from mlcnc_jax import build

    config = job.config
    path = _cache_path(cache_dir, job)
    workdir = _workdir(cache_dir, job)
    shutil.rmtree(workdir, ignore_errors=True)  # a killed run restarts from scratch
    start = time.perf_counter()
    try:
        results, error = build.train_and_evaluate(config, workdir), None
    except FloatingPointError as e:  # a diverged run is a result (of a bad setting)
        results, error = None, str(e).splitlines()[0]
    result = {"tag": job.tag, "config_hash": job.config_hash}
    result["seconds"] = time.perf_counter() - start
    result["load_average"] = os.getloadavg()[0]
    if results is None:
        nan = float("nan")
        result.update(
            map={k: nan for k in ("total", *GROUPS)},
            map_ema={k: nan for k in ("total", *GROUPS)},
            neural_collapse={k: nan for k in ("nc1", "nc2", "mean_angle", "etf_angle")},
            error=error,
        )
    else:
        result.update(
            map=results["raw"]["map"],
            map_ema=results["ema"]["map"],
            neural_collapse=results["raw"]["neural_collapse"],
        )
    if job.keep_workdir:
        result["workdir"] = workdir
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(common.to_json(result), f, indent=1)
    os.replace(tmp, path)
    return result


def _worker_init(cache_dir: str, queue) -> None:
    """A worker process: one core, XLA single-threaded, its console output in a log file."""
    core = queue.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    log = open(os.path.join(cache_dir, f"worker_{core}.log"), "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _setup_jax(cache_dir)


def _setup_jax(cache_dir: str) -> None:
    import jax
    from absl import logging

    # Runs of the same shapes share compiled code.
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logging.set_verbosity(logging.WARNING)


class Runner:
    """Runs jobs (cached, or in `workers` processes pinned to one core each)."""

    def __init__(self, cache_dir: str, workers: int, deadline: float | None = None):
        self.cache_dir = cache_dir
        self.deadline = deadline  # time.time() after which no run starts
        self.workers = max(1, workers)
        os.makedirs(os.path.join(cache_dir, "runs"), exist_ok=True)
        self._pool = None

    def _cached(self, job: Job) -> dict | None:
        path = _cache_path(self.cache_dir, job)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            record = json.load(f)
        if (
            job.keep_workdir
            and record.get("workdir") is not None
            and not os.path.isdir(os.path.join(_workdir(self.cache_dir, job), "checkpoints"))
        ):
            return None  # the record outlived its checkpoints: run again
        return record

    def run_all(self, jobs: Sequence[Job]) -> list[dict | None]:
        """Results of `jobs`, in order; the ones not cached run, `workers` at a time.

        A job not started before the runner's deadline is skipped (its result is None).
        """
        results: list[dict | None] = [self._cached(j) for j in jobs]
        todo = [i for i, r in enumerate(results) if r is None]
        print(f"{len(jobs)} runs: {len(jobs) - len(todo)} cached, {len(todo)} to run", flush=True)
        done = 0

        def report(result: dict) -> None:
            nonlocal done
            done += 1
            print(
                f"[{done}/{len(todo)} {result['seconds']:4.0f}s] {result['tag']}: {_fmt(result)}",
                flush=True,
            )

        def time_left() -> bool:
            return self.deadline is None or time.time() < self.deadline

        if self.workers == 1:
            _setup_jax(self.cache_dir)
            for i in todo:
                if time_left():
                    results[i] = execute(jobs[i], self.cache_dir)
                    report(results[i])
            return results
        import concurrent.futures

        pool = self._get_pool()
        pending = list(todo)
        running: dict[concurrent.futures.Future, int] = {}
        while pending or running:
            while pending and len(running) < self.workers and time_left():
                i = pending.pop(0)
                running[pool.submit(execute, jobs[i], self.cache_dir)] = i
            if not running:
                break  # the deadline passed: the rest is skipped
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                i = running.pop(future)
                results[i] = future.result()
                report(results[i])
        skipped = sum(r is None for r in results)
        if skipped:
            print(f"{skipped} runs skipped: past the deadline", flush=True)
        return results

    def _get_pool(self):
        import concurrent.futures
        import multiprocessing

        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            cores = ctx.Queue()
            available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            for k in range(self.workers):
                cores.put(available[k % len(available)] if available else k)
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=ctx,
                initializer=_worker_init,
                initargs=(self.cache_dir, cores),
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _val_total(val_map: dict) -> float:
    """Validation total mAP for choosing; a diverged run (NaN) never wins."""
    return float(np.nan_to_num(_num(val_map["total"]), nan=-1.0))


def _fmt(result: dict) -> str:
    m = result["map"]
    text = " ".join(f"{k} {_num(m[k]):.1f}" for k in ("total", *GROUPS))
    return text + (f" | {result['error']}" if result.get("error") else "")


# ----------------------------------------------------------------------------- protocol


def val_job(name: str, lr: float, scale: float | None, protocol: Protocol, data_root: str) -> Job:
    """One selection run: the short budget on the validation split, seed 0."""
    c = run_config(
        name,
        protocol.short_steps,
        protocol,
        data_root=data_root,
        lr=lr,
        logit_scale=scale or 1.0,
        seed=0,
        validation=True,
    )
    return Job.of(f"val_{name}_lr{lr:g}" + (f"_g{scale:g}" if scale is not None else ""), c)


def select(runner: Runner, names: Sequence[str], protocol: Protocol, data_root: str) -> dict:
    """Each row's learning rate (and MLC-NC's logit scale) by validation total mAP.

    MLC-NC's (lr, logit scale) grid runs with the other rows' lr grids; the MLC-NC
    ablations use MLC-NC's chosen scale and choose their own lr.

    Returns:
      {name: {'lr', 'logit_scale', 'val_map', 'grid': [{'lr', 'logit_scale', 'val_map'}]}}.
    """

    def grid_jobs(name: str, scales: Sequence[float | None]) -> list[tuple[Job, float, Any]]:
        return [
            (val_job(name, lr, scale, protocol, data_root), lr, scale)
            for scale in scales
            for lr in protocol.lr_grid
        ]

    def choose(points: list[tuple[Job, float, Any]], results: list[dict]) -> dict:
        grid = [
            {"lr": lr, "logit_scale": scale, "val_map": r["map"], "seconds": r["seconds"]}
            for (_, lr, scale), r in zip(points, results)
        ]
        # A diverged point (NaN) never wins; ties go to the earlier grid point.
        best = max(grid, key=lambda p: _val_total(p["val_map"]))
        return {
            "lr": best["lr"],
            "logit_scale": best["logit_scale"],
            "val_map": best["val_map"],
            "grid": grid,
        }

    chosen: dict[str, dict] = {}
    # First MLC-NC's grid and the plain rows' (they do not depend on each other) ...
    first = {
        n: grid_jobs(n, protocol.logit_scale_grid if n == "mlcnc" else [None])
        for n in names
        if n == "mlcnc" or not VARIANTS[n].is_mlcnc
    }
    if any(VARIANTS[n].is_mlcnc for n in names):
        first.setdefault("mlcnc", grid_jobs("mlcnc", protocol.logit_scale_grid))

    def run_grids(grids: dict[str, list]) -> None:
        flat = [p for points in grids.values() for p in points]
        results = runner.run_all([p[0] for p in flat])
        k = 0
        for n, points in grids.items():
            chosen[n] = choose(points, results[k : k + len(points)])
            k += len(points)

    run_grids(first)
    # ... then the ablations at MLC-NC's chosen scale.
    rest = [n for n in names if n not in chosen]
    if rest:
        scale = chosen["mlcnc"]["logit_scale"]
        run_grids({n: grid_jobs(n, [scale]) for n in rest})
    return chosen


def final_jobs(
    name: str,
    sel: dict,
    steps: int,
    seeds: Sequence[int],
    protocol: Protocol,
    data_root: str,
    budget: str,
    vit_trunk: str = "",
) -> list[Job]:
    jobs = []
    for seed in seeds:
        c = run_config(
            name,
            steps,
            protocol,
            data_root=data_root,
            lr=sel["lr"],
            logit_scale=sel["logit_scale"] or 1.0,
            seed=seed,
            validation=False,
            second_split=budget == "second",
            vit_trunk=vit_trunk,
        )
        jobs.append(Job.of(f"{budget}_{name}_s{seed}", c))
    return jobs


def best_by_validation(names: Sequence[str], chosen: dict) -> str | None:
    """The row of `names` with the highest validation total mAP (None if none was selected)."""
    candidates = [n for n in names if n in chosen]
    if not candidates:
        return None
    return max(candidates, key=lambda n: _val_total(chosen[n]["val_map"]))


# ----------------------------------------------------------------------------- statistics


def t_quantile_975(df: float) -> float:
    """Student's t 97.5 % quantile at (possibly fractional, Welch) `df` degrees of freedom.

    Bisection on the CDF, itself the integral of the density by Simpson's rule (no scipy).
    """
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def upper_half(x: float) -> float:  # P(0 <= T <= x)
        t = np.linspace(0.0, x, 2001)
        pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))
        h = x / 2000
        return float(h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum()))

    lo, hi = 0.0, 1.0
    while upper_half(hi) < 0.475:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if upper_half(mid) < 0.475 else (lo, mid)
    return (lo + hi) / 2


def welch_interval(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a minus mean of b, with the 95 % Welch interval (nan bounds for < 2 seeds)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "low": float("nan"), "high": float("nan"), "df": float("nan")}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "low": diff, "high": diff, "df": float("inf")}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile_975(df) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": float(df)}


def summarise(runs: Sequence[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of every metric."""
    values = {
        "total": [r["map"]["total"] for r in runs],
        **{g: [r["map"][g] for r in runs] for g in GROUPS},
        **{k: [r["neural_collapse"][k] for r in runs] for k in ("nc1", "nc2", "mean_angle")},
    }
    out: dict[str, Any] = {}
    for name in METRICS:
        x = np.asarray([_num(v) for v in values[name]], np.float64)
        out[name] = {
            "mean": float(np.mean(x)),
            "std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0,
        }
    out["n_seeds"] = len(runs)
    out["seconds_per_run"] = float(np.mean([r["seconds"] for r in runs]))
    return out


def verdict(interval: dict, what: str) -> str:
    """A plain sentence on whether a 95 % interval of a difference excludes 0."""
    if interval["low"] != interval["low"]:
        return f"{what}: too few seeds for an interval."
    d, lo, hi = interval["diff"], interval["low"], interval["high"]
    span = f"{d:+.1f} points (95 % interval {lo:+.1f} to {hi:+.1f})"
    if lo > 0:
        return f"{what}: **yes**, {span}."
    if hi < 0:
        return f"{what}: **no, the opposite**, {span}."
    return f"{what}: **not shown**, {span}: the interval includes 0."


# ----------------------------------------------------------------------------- reports


def plot(tables: dict[str, dict[str, dict]], path: str) -> None:
    """Head / medium / tail mAP (mean ± std over seeds) per row, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in tables if tables[b]]
    if not budgets:
        return
    width = 0.27
    fig, axes = plt.subplots(
        1,
        len(budgets),
        figsize=(sum(max(4.0, 0.7 * len(tables[b]) + 1.5) for b in budgets), 4.8),
        squeeze=False,
    )
    for ax, budget in zip(axes[0], budgets):
        summary = tables[budget]
        names = list(summary)
        x = np.arange(len(names))
        for i, g in enumerate(GROUPS):
            means = [summary[n][g]["mean"] for n in names]
            stds = [summary[n][g]["std"] for n in names]
            ax.bar(
                x + (i - 1) * width, means, width, yerr=stds, capsize=2, label=g, color=COLOURS[g]
            )
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.set_ylabel("test mAP (%)")
        ax.set_title(BUDGET_TITLES[budget].replace(", long budget", ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("synthetic_lt: head / medium / tail test mAP (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(stat: dict, digits: int = 1) -> str:
    mean, std = stat["mean"], stat["std"]
    return "n/a" if mean != mean else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _interval_text(i: dict) -> str:
    if i["low"] != i["low"]:
        return f"{i['diff']:+.1f}"
    return f"{i['diff']:+.1f} [{i['low']:+.1f}, {i['high']:+.1f}]"


def _results_table(summary: dict[str, dict], chosen: dict) -> list[str]:
    rows = []
    for name, s in summary.items():
        c = chosen[name]
        gamma = f"{c['logit_scale']:g}" if c["logit_scale"] is not None else "–"
        rows.append(
            [
                name,
                f"{c['lr']:g}",
                gamma,
                _pm(s["total"]),
                *(_pm(s[g]) for g in GROUPS),
                _pm(s["nc1"], 2),
                _pm(s["nc2"], 3),
                _pm(s["mean_angle"]),
                str(s["n_seeds"]),
            ]
        )
    header = ["row", "lr", "γ₀", "total", *GROUPS, "NC1", "NC2", "mean angle (°)", "seeds"]
    return [common.markdown_table(header, rows)]


def compare(runs: dict[str, list[dict]], a: str, b: str) -> dict[str, dict]:
    """Welch intervals of a minus b, for total and every group."""
    return {
        k: welch_interval(
            [_num(r["map"][k]) for r in runs[a]], [_num(r["map"][k]) for r in runs[b]]
        )
        for k in ("total", *GROUPS)
    }


def write_report(out_dir: str, payload: dict, protocol: Protocol, command: str) -> None:
    """Writes quality.json, quality.png and quality.md (keeping the findings section)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump(common.to_json(payload), f, indent=1)
    tables, chosen = payload["tables"], payload["selection"]
    plot(tables, os.path.join(out_dir, "quality.png"))
    p = protocol
    lines = [
        "# Quality: MLC-NC against baselines and ablations on `synthetic_lt`",
        "",
        "Generated by `python -m benchmarks.quality` (the findings section is kept when it reruns).",
        "",
        f"- Command: `{command}`",
        f"- Machine: {payload['machine']}; load average (1 min) {payload['load_before']:.2f} "
        f"before, {payload['load_after']:.2f} after.",
        f"- Cost: {payload['run_seconds'] / 60:.1f} min of runs ({payload['n_runs']} runs, each "
        f"timed end to end on one core: data, compilation, training, evaluation), "
        f"{payload['workers']} at a time; wall time of the invocation that wrote this file "
        f"{payload['wall_seconds'] / 60:.1f} min (less when earlier invocations had cached runs).",
        "- Data: built-in `synthetic_lt` 2.x 'target' classes at 32 px (train 1,104 images, "
        "6/6/8 head/medium/tail classes; test 2,400 images, nearly balanced); the second split "
        "(part 'second_split'): `--config.data.synthetic_seed=1 "
        "--config.data.synthetic_train_split=dbloss`, lt_builder's long tail of a balanced pool "
        "(1,070 images, 5/9/6 classes, 1.84 objects per image against 1.58) and its own test "
        "split. Every number here is ours, on synthetic data, not VOC-LT or COCO-LT.",
        "- Trunk: the shipped one (mlcnc_jax/trunks/, resnet_small pre-trained on 20 other "
        "classes; >= 95 mAP on its own test split, tests/test_trunk.py). Every run but the ViT rows starts from it.",
        f"- Budgets: short {p.short_steps} steps, long {p.long_steps} steps"
        f"{' (the default run)' if p.long_steps == 360 else ''}, "
        f"and (part 'budget', MLC-NC and the class-aware baselines of the main rows) twice and "
        f"four times the long one, {p.double_steps} and {p.quadruple_steps} steps (BCE "
        f"class-aware also {p.octuple_steps}); batch 64, each as {p.epochs} epochs (prototype updates; "
        "MLC-NC's FLA-only warm-up is the first); everything else as configs/default.py (Adam, one-cycle, weight decay 1e-4, "
        "flip + colour + 3-px shift). Raw weights are evaluated.",
        f"- Selection: validation split of {100 * p.val_fraction:.0f} % carved from the long-"
        f"tailed training split, seed 0, short budget; lr from {list(p.lr_grid)}, MLC-NC's "
        f"initial logit scale from {list(p.logit_scale_grid)} (the ablations reuse MLC-NC's). "
        "Criterion: validation total mAP. The test split is used only for the tables.",
        "- Seeds: main rows "
        f"{list(p.main_seeds)}, the others {list(p.other_seeds)}; mean ± sample std (ddof 1). "
        "Intervals: 95 % Welch t interval of the difference of means.",
        "- NC1 / NC2 / mean angle: of the class features (MLC-NC rows: the per-class features "
        "of the positive pairs; plain rows: the pooled backbone feature of each image). A "
        "simplex ETF of 20 classes has angle 93.0°; NC1 falls and NC2 tends to 0 as features "
        "collapse.",
    ]
    if payload.get("vit_trunk"):
        v = payload["vit_trunk"]
        lines.append(
            f"- ViT trunk (part 'vit'): `{VIT_BACKBONE}` pre-trained by configs/pretrain.py "
            f"(lr {VIT_PRETRAIN_LR:g}) on the 'pretrain' classes in {v['seconds'] / 60:.1f} min: "
            f"{_num(v['test_map']):.1f} mAP (EMA {_num(v['test_map_ema']):.1f}) on their test "
            "split."
            + (
                " Its rows use the learning rates chosen for the ResNet rows."
                if payload.get("runs", {}).get("vit")
                else ""
            )
        )
    if payload.get("not_run"):
        lines.append(f"- Not run in this file: {payload['not_run']}.")
    lines += ["", "## Verdict on the paper's claims", ""]
    lines += [f"- {v}" for v in payload["verdicts"]]
    for budget, summary in tables.items():
        if not summary:
            continue
        steps = budget_steps(p)[budget]
        lines += ["", f"## Test mAP (%), {BUDGET_TITLES[budget]} ({steps} steps)", ""]
        lines += _results_table(summary, chosen)
    if payload["differences"]:
        lines += ["", "## Differences (test mAP points, 95 % interval)", ""]
        rows = [
            [title, *(_interval_text(d[k]) for k in ("total", *GROUPS))]
            for title, d in payload["differences"].items()
        ]
        lines.append(common.markdown_table(["difference", "total", *GROUPS], rows))
    lines += ["", "Rows:", ""]
    lines += [f"- `{n}`: {VARIANTS[n].description}." for n in chosen]
    lines += ["", "## Selection on the validation split (seed 0, short budget)", ""]
    rows = []
    for name, c in chosen.items():
        for q in c["grid"]:
            mark = "✓" if (q["lr"], q["logit_scale"]) == (c["lr"], c["logit_scale"]) else ""
            gamma = f"{q['logit_scale']:g}" if q["logit_scale"] is not None else "–"
            rows.append(
                [
                    name,
                    f"{q['lr']:g}",
                    gamma,
                    *(f"{_num(q['val_map'][k]):.1f}" for k in ("total", *GROUPS)),
                    mark,
                ]
            )
    lines.append(
        common.markdown_table(
            ["row", "lr", "γ₀", "val total", *(f"val {g}" for g in GROUPS), "chosen"], rows
        )
    )
    lines += ["", "![head / medium / tail mAP per row](quality.png)", ""]
    path = os.path.join(out_dir, "quality.md")
    findings = f"{FINDINGS_BEGIN}\n## Findings\n\n(not written yet)\n{FINDINGS_END}"
    if os.path.exists(path):
        with open(path) as f:
            match = re.search(
                re.escape(FINDINGS_BEGIN) + r".*?" + re.escape(FINDINGS_END), f.read(), re.S
            )
        if match:
            findings = match.group(0)
    lines += [findings, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def verdicts(
    runs: dict[str, dict[str, list[dict]]], best_aware: dict[str, str], protocol: Protocol
) -> list[str]:
    """One sentence per claim of the paper that the runs can speak to (and the budget check)."""
    out = []

    def claim(budget: str, other: str | None, metric: str, text: str) -> None:
        r = runs.get(budget, {})
        if "mlcnc" in r and other in r:
            out.append(verdict(compare(r, "mlcnc", other)[metric], text))

    for budget, title in BUDGET_TITLES.items():
        base = best_aware.get(budget)
        claim(
            budget,
            base,
            "tail",
            f"Tail gain over the best sampler-matched baseline (`{base}`, class-aware), {title}",
        )
        claim(budget, base, "total", f"Total gain over `{base}`, {title}")
        claim(
            budget,
            "bce_uniform",
            "tail",
            f"Tail gain over BCE with uniform sampling (the paper's baseline row), {title}",
        )
    parts = {"no_fla": "FLA", "no_fpc": "FPC", "linear_classifier": "the frozen ETF classifier"}
    for name, part in parts.items():
        claim(
            "long",
            name,
            "total",
            f"{part} contributes (paper Table 3: MLC-NC minus `{name}`, total), long budget",
        )
    steps = budget_steps(protocol)
    for shorter, longer in zip(LADDER, LADDER[1:]):
        for name, more in runs.get(longer, {}).items():
            if name in runs.get(shorter, {}):
                diff = welch_interval(
                    [_num(r["map"]["total"]) for r in more],
                    [_num(r["map"]["total"]) for r in runs[shorter][name]],
                )
                out.append(
                    verdict(
                        diff,
                        f"More steps still help `{name}` ({steps[longer]} minus "
                        f"{steps[shorter]} steps, total; if not, {steps[shorter]} steps are "
                        "enough for it)",
                    )
                )
    if not out:
        out.append("No claim can be judged: the runs are missing.")
    return out


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny end-to-end smoke test")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side (1 core each)")
    parser.add_argument(
        "--deadline_min",
        type=float,
        default=0.0,
        help="start no final run after this many minutes (0: none); the report says what is missing",
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "cache"))
    parser.add_argument(
        "--data_root", default="~/.cache/mlcnc_jax/datasets", help="where synthetic_lt is kept"
    )
    parser.add_argument(
        "--seed_cache",
        default="",
        help="a quality.json of an earlier invocation: its runs fill the cache, so that only "
        "the parts it lacks run (e.g. benchmarks/results/quality.json in a fresh checkout)",
    )
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if args.quick and args.parts == parser.get_default("parts"):
        parts = ["main"]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    protocol = QUICK if args.quick else Protocol()
    cache = os.path.join(args.cache, "quality_quick" if args.quick else "quality")
    out = args.out
    if args.quick and out == parser.get_default("out"):
        out = os.path.join(cache, "results")

    from mlcnc_jax import trunks
    from mlcnc_jax.data import synthetic

    _SALT["synthetic_lt"] = str(synthetic.SyntheticLt.VERSION)
    _SALT["trunk"] = trunks.SYNTHETIC_PRETRAIN_SHA256
    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    wall_start = time.time()
    data_root = os.path.expanduser(args.data_root)
    # Generate the data once, before the workers read it side by side.
    from mlcnc_jax.data import sources

    for second in (False, True) if "second_split" in parts else (False,):
        sources.load_dataset(
            run_config(
                "mlcnc",
                1,
                protocol,
                data_root=data_root,
                lr=1e-3,
                logit_scale=1.0,
                seed=0,
                validation=False,
                second_split=second,
            )
        )
    if args.seed_cache:
        n = seed_cache(args.seed_cache, cache, protocol, data_root)
        print(f"{n} runs taken from {args.seed_cache} into the cache", flush=True)
    runner = Runner(cache, args.workers)
    try:
        names = list(MAIN) if {"main", "second_split", "budget", "vit"} & set(parts) else []
        names += [n for n in OTHER_BASELINES if "baselines" in parts]
        names += [v.name for v in ABLATIONS if "ablations" in parts]
        if "mlcnc" not in names and any(VARIANTS[n].is_mlcnc for n in names):
            names.insert(0, "mlcnc")
        chosen = select(runner, names, protocol, data_root)
        best_other = best_by_validation(OTHER_BASELINES, chosen)
        main_rows = [n for n in (*MAIN, best_other) if n and "main" in parts]
        if "main" not in parts:
            names = [n for n in names if n not in MAIN]
        jobs: list[tuple[str, str, Job]] = []  # (budget, row, job)

        def add(budget: str, name: str, steps: int, seeds: Sequence[int], vit: str = "") -> None:
            for job in final_jobs(
                name, chosen[name], steps, seeds, protocol, data_root, budget, vit_trunk=vit
            ):
                jobs.append((budget, name, job))

        for name in names:
            if name in main_rows:
                add("long", name, protocol.long_steps, protocol.main_seeds)
                add("short", name, protocol.short_steps, protocol.main_seeds)
            else:
                add("long", name, protocol.long_steps, protocol.other_seeds)
        if "second_split" in parts:  # MAIN's rows with their settings chosen on the first split
            for name in MAIN:
                add("second", name, protocol.long_steps, protocol.other_seeds)
        if "budget" in parts:
            for name in dict.fromkeys((*BUDGET_ROWS, best_other)):
                if name and VARIANTS[name].sampling == "class_aware":
                    add("double", name, protocol.double_steps, protocol.other_seeds)
                    add("quadruple", name, protocol.quadruple_steps, protocol.other_seeds)
            for name in OCTUPLE_ROWS:
                add("octuple", name, protocol.octuple_steps, protocol.other_seeds)
        vit_trunk, vit_not_run = None, []
        if "vit" in parts:
            (vit_trunk,) = runner.run_all([vit_pretrain_job(data_root, protocol)])
            if vit_trunk.get("error"):
                raise RuntimeError(f"The ViT trunk's pre-training diverged: {vit_trunk['error']}")
            vit_not_run = weak_trunk(vit_trunk, protocol)
            if vit_not_run:
                print(f"Not running {vit_not_run[0]}", flush=True)
            elif vit_trunk.get("workdir") is None:
                raise RuntimeError(
                    "The ViT trunk's record came from --seed_cache without its checkpoints: "
                    f"delete its file under {os.path.join(cache, 'runs')} (pretrain_vit_*) to "
                    "train it again."
                )
            else:
                for name in VIT_ROWS:
                    add(
                        "vit", name, protocol.long_steps, protocol.other_seeds, vit_trunk["workdir"]
                    )
        # Seed-major, so that a deadline leaves every row and budget some seeds.
        order = sorted(
            range(len(jobs)),
            key=lambda i: (
                int(jobs[i][2].tag.rsplit("_s", 1)[1]),
                ("long", "second", "vit", "short", *LADDER[1:]).index(jobs[i][0]),
            ),
        )
        if args.deadline_min > 0:
            runner.deadline = wall_start + 60.0 * args.deadline_min
        results = runner.run_all([jobs[i][2] for i in order])
    finally:
        runner.close()
    runs: dict[str, dict[str, list[dict]]] = {b: {} for b in BUDGET_TITLES}
    skipped = [jobs[i][2].tag for i, r in zip(order, results) if r is None]
    for i, result in zip(order, results):
        if result is None:
            continue
        budget, name, _ = jobs[i]
        runs[budget].setdefault(name, []).append(result)
    tables = {b: {n: summarise(rs) for n, rs in runs[b].items()} for b in BUDGET_TITLES}
    # The best sampler-matched (class-aware) baseline of each budget, by validation mAP.
    best_aware = {}
    for b, rows in runs.items():
        aware = [
            n for n in rows if not VARIANTS[n].is_mlcnc and VARIANTS[n].sampling == "class_aware"
        ]
        if aware:
            best_aware[b] = best_by_validation(aware, chosen)
    differences = {}
    for b in BUDGET_TITLES:
        # The best sampler-matched baseline by validation, BCE with the same sampler (the
        # plainest one) and with uniform sampling, and the best of the other baselines.
        for other in dict.fromkeys((best_aware.get(b), "bce_aware", "bce_uniform", best_other)):
            if other and "mlcnc" in runs[b] and other in runs[b]:
                differences[f"mlcnc − {other}, {b}"] = compare(runs[b], "mlcnc", other)
    for name in (
        "no_fla",
        "no_fpc",
        "linear_classifier",
        "trainable_etf",
        "cumulative_prototypes",
        "cosine_attention",
    ):
        if "mlcnc" in runs["long"] and name in runs["long"]:
            differences[f"mlcnc − {name}, long"] = compare(runs["long"], "mlcnc", name)
    for shorter, longer in zip(LADDER, LADDER[1:]):
        for name in runs[longer]:
            if name in runs[shorter]:
                differences[f"{name}: {longer} − {shorter}"] = compare(
                    {"a": runs[longer][name], "b": runs[shorter][name]}, "a", "b"
                )
    run_seconds = sum(q["seconds"] for c in chosen.values() for q in c["grid"]) + sum(
        r["seconds"] for r in results if r is not None
    )
    if vit_trunk:
        run_seconds += vit_trunk["seconds"]
    not_run = [f"part '{p}'" for p in PARTS if p not in parts] + vit_not_run
    if skipped:
        not_run.append(f"{len(skipped)} runs past the deadline ({', '.join(skipped)})")
    payload = {
        "dataset": "synthetic_lt (built-in, 'target' classes; test split for the tables)",
        "machine": common.machine(),
        "command": command.strip(),
        "protocol": dataclasses.asdict(protocol),
        "workers": args.workers,
        "wall_seconds": time.perf_counter() - start,
        "run_seconds": run_seconds,
        "n_runs": sum(len(c["grid"]) for c in chosen.values()) + len(results) - len(skipped),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "not_run": "; ".join(not_run),
        "selection": chosen,
        "vit_trunk": None
        if not vit_trunk
        else {
            "seconds": vit_trunk["seconds"],
            "test_map": vit_trunk["map"]["total"],
            "test_map_ema": vit_trunk["map_ema"]["total"],
        },
        "best_other_baseline": best_other,
        "best_sampler_matched": best_aware,
        "tables": tables,
        "differences": differences,
        "verdicts": verdicts(runs, best_aware, protocol),
        "runs": runs,
    }
    write_report(out, payload, protocol, command.strip())
    print(f"Done in {payload['wall_seconds'] / 60:.1f} min; results in {out}", flush=True)


if __name__ == "__main__":
    main()
