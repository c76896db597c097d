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
   interval, neural-collapse measures, and the difference each claim of the paper rests on
   (what they mean for the paper is written by hand in the dated findings file).

Runs are spread over `--workers` processes, each pinned to one core (on 2 cores two
single-threaded runs side by side do 1.26x the work of one run on both). Finished runs are
cached as one JSON file each, so an interrupted benchmark continues where it stopped and a
later invocation with more parts reuses the runs it shares. Writes quality.md (tables,
the differences behind the paper's claims, commands, machine; it links to the findings
written by hand from them, benchmarks/results/2026-12-07-quality-findings.md), quality.json
and quality.png to --out.

This module is the command line; the protocol's tables and configs are in
quality_protocol.py, the jobs, the run cache and the runner in quality_runs.py, the
statistics in quality_stats.py and the report in quality_report.py.

    python -m benchmarks.quality --parts main          # the main rows (~75 min, 2 cores)
    python -m benchmarks.quality                       # every part
    python -m benchmarks.quality --quick               # end-to-end smoke test (~3 min)
    python -m benchmarks.quality --parts main,ablations \
        --seed_cache benchmarks/results/quality.json   # a fresh checkout: reuse its runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

from benchmarks import common
from benchmarks.common import ROOT
from benchmarks.quality_protocol import (
    BUDGET_TITLES,
    OTHER_BASELINES,
    PARTS,
    QUICK,
    VIT_ROWS,
    Protocol,
    best_by_validation,
    experiment_config,
    final_rows,
    run_order,
    selection_rows,
    weak_trunk,
)
from benchmarks.quality_report import analyse, write_report
from benchmarks.quality_runs import (
    Job,
    Runner,
    Salt,
    Sweep,
    final_jobs,
    seed_cache,
    select,
    vit_pretrain_job,
)


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

    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    wall_start = time.time()
    sweep = Sweep(protocol, os.path.expanduser(args.data_root), Salt.of_library())
    _generate_data(sweep, second_split="second_split" in parts)
    if args.seed_cache:
        n = seed_cache(args.seed_cache, cache, sweep)
        print(f"{n} runs taken from {args.seed_cache} into the cache", flush=True)
    runner = Runner(cache, args.workers)
    try:
        names = selection_rows(parts)
        chosen = select(runner, names, sweep)
        best_other = best_by_validation(OTHER_BASELINES, chosen)
        jobs: list[tuple[str, str, Job]] = []  # (budget, row, job)

        def add(budget: str, name: str, steps: int, seeds: Sequence[int], vit: str = "") -> None:
            for job in final_jobs(name, chosen[name], steps, seeds, sweep, budget, vit_trunk=vit):
                jobs.append((budget, name, job))

        for budget, name, steps, seeds in final_rows(parts, names, best_other, protocol):
            add(budget, name, steps, seeds)
        vit_trunk, vit_not_run = None, []
        if "vit" in parts:
            (vit_trunk,) = runner.run_all([vit_pretrain_job(sweep)])
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
        order = run_order([(budget, _seed(job)) for budget, _, job in jobs])
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
        **analyse(runs, chosen, best_other, protocol),
        "runs": runs,
    }
    write_report(out, payload, protocol, command.strip())
    print(f"Done in {payload['wall_seconds'] / 60:.1f} min; results in {out}", flush=True)


def _seed(job: Job) -> int:
    return int(job.tag.rsplit("_s", 1)[1])


def _generate_data(sweep: Sweep, second_split: bool) -> None:
    """Generates the data once, before the workers read it side by side."""
    from mlcnc_jax.data import sources

    for second in (False, True) if second_split else (False,):
        config = experiment_config(
            "mlcnc",
            1,
            sweep.protocol,
            data_root=sweep.data_root,
            lr=1e-3,
            logit_scale=1.0,
            seed=0,
            validation=False,
            second_split=second,
        )
        sources.load_dataset(config)


if __name__ == "__main__":
    main()
