"""Quality benchmark, its runs: jobs and their cache keys, the cache, the multi-process runner.

Finished runs are cached as one JSON file each under `CACHE/runs/`, named by the run's tag and
a hash of what shapes it (`config_hash`: its config and the `Salt`, the version of the
generated data and the shipped trunk's hash), so that an interrupted sweep continues where it
stopped and a change of the data or the trunk trains again instead of reusing stale runs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common
from benchmarks.quality_protocol import (
    VARIANTS,
    Protocol,
    budget_steps,
    experiment_config,
    vit_pretrain_config,
)
from benchmarks.quality_stats import num, val_total
from mlcnc_jax.groups import GROUPS


@dataclasses.dataclass(frozen=True)
class Salt:
    """What shapes a run besides its config: the generated data's version, the trunk's hash."""

    synthetic_lt: str
    trunk: str

    @classmethod
    def of_library(cls) -> Salt:
        """The installed library's data version and shipped trunk."""
        from mlcnc_jax import trunks
        from mlcnc_jax.data import synthetic

        return cls(str(synthetic.SyntheticLt.VERSION), trunks.SYNTHETIC_PRETRAIN_SHA256)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What every run of one invocation shares: the protocol, where the data is, the salt."""

    protocol: Protocol
    data_root: str
    salt: Salt


def config_hash(config, salt: Salt) -> str:
    """Short hash of a run's config and its salt: the key of a cached run.

    Where the checkout and the data are is left out (the salt says what they hold), so the
    keys stay the same in another checkout or on another machine.
    """
    from mlcnc_jax import trunks

    fields = json.loads(config.to_json())
    fields["data"]["root"] = "<data root>"
    if fields["model"]["pretrained"] == trunks.SYNTHETIC_PRETRAIN:
        fields["model"]["pretrained"] = "<shipped trunk>"
    text = json.dumps(fields, sort_keys=True) + json.dumps(dataclasses.asdict(salt), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run: a tag, its config and the key of its cache file."""

    tag: str
    config: Any
    key: str = ""
    keep_workdir: bool = False  # keep the checkpoints (a trunk); else deleted

    @property
    def config_hash(self) -> str:
        return self.key.rsplit("_", 1)[1]

    @classmethod
    def of(cls, tag: str, config, salt: Salt) -> Job:
        return cls(tag, config, f"{tag}_{config_hash(config, salt)}")


def val_job(name: str, lr: float, scale: float | None, sweep: Sweep) -> Job:
    """One selection run: the short budget on the validation split, seed 0."""
    c = experiment_config(
        name,
        sweep.protocol.short_steps,
        sweep.protocol,
        data_root=sweep.data_root,
        lr=lr,
        logit_scale=scale or 1.0,
        seed=0,
        validation=True,
    )
    tag = f"val_{name}_lr{lr:g}" + (f"_g{scale:g}" if scale is not None else "")
    return Job.of(tag, c, sweep.salt)


def final_jobs(
    name: str,
    sel: dict,
    steps: int,
    seeds: Sequence[int],
    sweep: Sweep,
    budget: str,
    vit_trunk: str = "",
) -> list[Job]:
    """The test-split runs of one row and budget: one per seed, with the row's chosen settings."""
    jobs = []
    for seed in seeds:
        c = experiment_config(
            name,
            steps,
            sweep.protocol,
            data_root=sweep.data_root,
            lr=sel["lr"],
            logit_scale=sel["logit_scale"] or 1.0,
            seed=seed,
            validation=False,
            second_split=budget == "second",
            vit_trunk=vit_trunk,
        )
        jobs.append(Job.of(f"{budget}_{name}_s{seed}", c, sweep.salt))
    return jobs


def vit_pretrain_job(sweep: Sweep) -> Job:
    """The ViT trunk's pre-training (its workdir is kept: it is the trunk)."""
    job = Job.of("pretrain_vit", vit_pretrain_config(sweep.data_root, sweep.protocol), sweep.salt)
    return dataclasses.replace(job, keep_workdir=True)


def seed_cache(results_path: str, cache_dir: str, sweep: Sweep) -> int:
    """Fills the run cache from a results file of this script (e.g. the committed quality.json).

    A fresh checkout then adds parts without rerunning the runs that file reports. Each run
    is keyed again from its tag, the file's selection and today's configs; a file of another
    protocol gives nothing. (Its own keys may name another checkout's paths, which older
    versions of this script hashed, or come from an older form of `config_hash`: this is how
    such runs are keyed again.) A ViT trunk comes without its checkpoints: enough to
    know it is too weak to fine-tune.

    Returns:
      How many records were written (the ones already cached are left alone).
    """
    with open(results_path) as f:
        payload = json.load(f)
    ours = json.loads(json.dumps(dataclasses.asdict(sweep.protocol)))
    # A field the file lacks was added to the protocol later: no run of the file used it.
    if any(payload["protocol"].get(k, v) != v for k, v in ours.items()):
        raise ValueError(
            f"{results_path} follows another protocol ({payload['protocol']}) than this "
            f"invocation ({ours}): none of its runs can stand for today's; run the benchmark "
            "without --seed_cache."
        )
    chosen = payload["selection"]
    steps = budget_steps(sweep.protocol)
    records: dict[str, dict] = {}
    for budget, rows in payload["runs"].items():
        if budget == "vit":  # its rows name their trunk's workdir: not kept
            continue
        for name, row in rows.items():
            for r in row:
                seed = int(r["tag"].rsplit("_s", 1)[1])
                (job,) = final_jobs(name, chosen[name], steps[budget], [seed], sweep, budget)
                records[job.key] = {**r, "tag": job.tag, "config_hash": job.config_hash}
    for name, sel in chosen.items():
        for point in sel["grid"]:
            job = val_job(name, point["lr"], point["logit_scale"], sweep)
            records[job.key] = {
                "tag": job.tag,
                "config_hash": job.config_hash,
                "seconds": point["seconds"],
                "map": point["val_map"],
            }
    if payload.get("vit_trunk"):
        v, job = payload["vit_trunk"], vit_pretrain_job(sweep)
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
    from mlcnc_jax import experiment

    config = job.config
    path = _cache_path(cache_dir, job)
    workdir = _workdir(cache_dir, job)
    shutil.rmtree(workdir, ignore_errors=True)  # a killed run restarts from scratch
    start = time.perf_counter()
    try:
        final, error = experiment.build(config, workdir).train().final, None
    except FloatingPointError as e:  # a diverged run is a result (of a bad setting)
        final, error = None, str(e).splitlines()[0]
    # One process trains many runs: free this one's trainer, data iterator and device buffers
    # (reference cycles that would otherwise wait for the collector) before the next starts.
    gc.collect()
    result = {"tag": job.tag, "config_hash": job.config_hash}
    result["seconds"] = time.perf_counter() - start
    result["load_average"] = os.getloadavg()[0]
    if final is None:
        nan = float("nan")
        result.update(
            map={k: nan for k in ("total", *GROUPS)},
            map_ema={k: nan for k in ("total", *GROUPS)},
            neural_collapse={k: nan for k in ("nc1", "nc2", "mean_angle", "etf_angle")},
            error=error,
        )
    else:
        result.update(
            map=final.raw.map.as_dict(),
            map_ema=final.ema.map.as_dict(),
            neural_collapse=final.raw.neural_collapse,
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


def _fmt(result: dict) -> str:
    m = result["map"]
    text = " ".join(f"{k} {num(m[k]):.1f}" for k in ("total", *GROUPS))
    return text + (f" | {result['error']}" if result.get("error") else "")


def select(runner: Runner, names: Sequence[str], sweep: Sweep) -> dict:
    """Each row's learning rate (and MLC-NC's logit scale) by validation total mAP.

    MLC-NC's (lr, logit scale) grid runs with the other rows' lr grids; the MLC-NC
    ablations use MLC-NC's chosen scale and choose their own lr.

    Returns:
      {name: {'lr', 'logit_scale', 'val_map', 'grid': [{'lr', 'logit_scale', 'val_map'}]}}.
    """

    def grid_jobs(name: str, scales: Sequence[float | None]) -> list[tuple[Job, float, Any]]:
        return [
            (val_job(name, lr, scale, sweep), lr, scale)
            for scale in scales
            for lr in sweep.protocol.lr_grid
        ]

    def choose(points: list[tuple[Job, float, Any]], results: list[dict]) -> dict:
        grid = [
            {"lr": lr, "logit_scale": scale, "val_map": r["map"], "seconds": r["seconds"]}
            for (_, lr, scale), r in zip(points, results)
        ]
        # A diverged point (NaN) never wins; ties go to the earlier grid point.
        best = max(grid, key=lambda p: val_total(p["val_map"]))
        return {
            "lr": best["lr"],
            "logit_scale": best["logit_scale"],
            "val_map": best["val_map"],
            "grid": grid,
        }

    chosen: dict[str, dict] = {}
    # First MLC-NC's grid and the plain rows' (they do not depend on each other) ...
    first = {
        n: grid_jobs(n, sweep.protocol.logit_scale_grid if n == "mlcnc" else [None])
        for n in names
        if n == "mlcnc" or not VARIANTS[n].is_mlcnc
    }
    if any(VARIANTS[n].is_mlcnc for n in names):
        first.setdefault("mlcnc", grid_jobs("mlcnc", sweep.protocol.logit_scale_grid))

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
