"""Quality benchmark: MLC-NC against baselines and ablations on the built-in `synthetic_lt`.

Protocol (the paper's, scaled to a 2-core CPU):

1. Pre-train the CPU backbone once on the balanced 'pretrain' classes of synthetic_lt
   (20 other classes, never the target ones; configs/pretrain.py), the stand-in for
   ImageNet pre-training. Cached under the cache directory; its cost is reported.
2. Selection on a validation split carved from the long-tailed training split
   (config.data.val_fraction), one seed: every variant's learning rate from a small
   grid and, for MLC-NC, the initial logit scale (kept for the MLC-NC ablations).
   The test split is never looked at here.
3. Every variant with its chosen settings on the full training split with three seeds
   (the data set stays the same; the seed changes initialisation, sampling and
   augmentation), evaluated on the test split.

Every run has the same budget (steps, batch, image size). Finished runs are cached as
one JSON file each, so an interrupted benchmark continues where it stopped. Writes
quality.md (tables, commands, machine), quality.json and quality.png to --out.

    python -m benchmarks.quality                   # the full benchmark (< 60 min, 2 cores)
    python -m benchmarks.quality --quick           # end-to-end smoke test (~2-3 min)
    python -m benchmarks.quality --variants mlcnc,bce_aware --seeds 0,1
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

import jax
import numpy as np
from absl import logging

from benchmarks import common
from benchmarks.common import ROOT
from configs import ablations, pretrain
from mlcnc_jax.groups import COLOURS, GROUPS

METRICS = ("total", "head", "medium", "tail", "nc1", "nc2", "mean_angle")
FINDINGS_BEGIN = "<!-- findings: kept when the script rewrites this file -->"
FINDINGS_END = "<!-- end of findings -->"


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every fine-tuning run gets (the same for all variants)."""

    steps: int = 100  # total optimisation steps of one fine-tuning run
    epochs: int = 10  # steps are split into this many 'epochs' (prototype updates, warm-up unit)
    warmup_epochs: int = 1  # MLC-NC's FLA-only warm-up, in those epochs
    batch_size: int = 64
    image_size: int = 32
    resize_size: int = 36
    embed_dim: int = 128
    proj_dim: int = 20
    pretrain_epochs: int = 6  # of the balanced 10,000-image 'pretrain' set (157 steps each)
    pretrain_lr: float = 3e-3
    val_fraction: float = 0.25
    # Smallest area of the random resized crop (config.data.crop_min_area; torchvision: 0.08,
    # which mostly misses the small objects of the built-in images while their labels stay).
    crop_min_area: float = 0.5
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    logit_scale_grid: tuple[float, ...] = (1.0, 8.0, 16.0)


QUICK = Budget(
    steps=20,
    epochs=4,
    warmup_epochs=1,
    pretrain_epochs=1,
    lr_grid=(1e-3,),
    logit_scale_grid=(1.0, 16.0),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the benchmark.

    Attributes:
      name: row name.
      base: entry of configs/ablations.VARIANTS it starts from.
      pretrained: fine-tune from the pre-trained backbone (else from scratch).
      description: what the row is.
    """

    name: str
    base: str
    pretrained: bool
    description: str

    @property
    def is_mlcnc(self) -> bool:
        return ablations.VARIANTS[self.base].get("model.name", "mlcnc") == "mlcnc"


def _baselines() -> list[Variant]:
    names = {
        "bce": "BCE",
        "focal": "focal",
        "asl": "ASL",
        "db": "DB-focal",
        "two_way": "two-way loss alone",
    }
    rows = []
    for loss, label in names.items():
        for sampling, text in (("aware", "class-aware"), ("uniform", "uniform")):
            rows.append(
                Variant(
                    f"{loss}_{sampling}",
                    f"{loss}_{sampling}",
                    True,
                    f"plain model (global pooling, linear classifier), {label}, {text} sampling",
                )
            )
    return rows


VARIANT_LIST = [
    Variant("mlcnc", "mlcnc", True, "MLC-NC (default config), class-aware sampling"),
    Variant("no_fla", "no_fla", True, "MLC-NC without FLA (and without its warm-up)"),
    Variant("no_fpc", "no_fpc", True, "MLC-NC without FPC"),
    Variant("linear_classifier", "linear_classifier", True, "MLC-NC, linear classifier"),
    Variant("trainable_etf", "trainable_etf", True, "MLC-NC, trainable ETF classifier"),
    *_baselines(),
    Variant("scratch_mlcnc", "mlcnc", False, "MLC-NC from scratch (no pre-training)"),
    Variant("scratch_bce_aware", "bce_aware", False, "BCE, class-aware, from scratch"),
]
VARIANTS = {v.name: v for v in VARIANT_LIST}
QUICK_VARIANTS = ("mlcnc", "bce_aware", "no_fla")


# ----------------------------------------------------------------------------- configs


def _set(config, key: str, value: Any) -> None:
    section, field = key.split(".")
    setattr(config[section], field, value)


def base_config(budget: Budget, data_root: str):
    """The config every fine-tuning run starts from (before the variant's overrides)."""
    c = ablations.get_config("mlcnc")
    c.data.root = data_root
    c.data.image_size = budget.image_size
    c.data.resize_size = budget.resize_size
    c.data.crop_min_area = budget.crop_min_area
    c.model.backbone = "resnet_small"
    c.model.embed_dim = budget.embed_dim
    c.model.proj_dim = budget.proj_dim
    c.train.batch_size = budget.batch_size
    c.eval.batch_size = 256
    c.train.num_epochs = budget.epochs
    c.train.steps_per_epoch = max(1, budget.steps // budget.epochs)
    c.loss.warmup_epochs = budget.warmup_epochs
    # Evaluate and checkpoint once, at the end; EMA decay sized to the short runs.
    c.train.eval_every_epochs = 10**6
    c.train.checkpoint_every_steps = 10**9
    c.train.keep_checkpoints = 1
    c.train.log_every_steps = 50
    c.train.ema_decay = 0.99
    return c


def run_config(
    variant: Variant,
    budget: Budget,
    *,
    data_root: str,
    pretrained_dir: str,
    lr: float,
    logit_scale: float,
    seed: int,
    validation: bool,
):
    """The full config of one run of `variant`."""
    c = base_config(budget, data_root)
    for key, value in ablations.VARIANTS[variant.base].items():
        if key == "loss.warmup_epochs" and value:
            continue  # the benchmark sizes the warm-up to its own epochs
        _set(c, key, value)
    c.model.pretrained = pretrained_dir if variant.pretrained else ""
    c.train.learning_rate = float(lr)
    if variant.is_mlcnc:
        c.model.logit_scale_init = float(logit_scale)
    c.seed = int(seed)
    c.data.val_fraction = budget.val_fraction if validation else 0.0
    return c


def pretrain_config(budget: Budget, data_root: str):
    c = pretrain.get_config()
    c.data.root = data_root
    c.data.image_size = budget.image_size
    c.data.resize_size = budget.resize_size
    c.data.crop_min_area = budget.crop_min_area
    c.train.num_epochs = budget.pretrain_epochs
    c.train.eval_every_epochs = budget.pretrain_epochs
    c.train.learning_rate = budget.pretrain_lr
    return c


# What shapes a run besides its config (set by main): the version of the generated data, so a
# change of synthetic_lt retrains instead of reusing stale runs.
_SALT = {"synthetic_lt": None}


def config_hash(config) -> str:
    """Short hash of the config and of the settings outside it: the key of a cached run."""
    text = config.to_json(sort_keys=True) + json.dumps(_SALT, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- runs


class Runner:
    """Runs trainings in this process and caches each finished run as a JSON file."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.runs_dir = os.path.join(cache_dir, "runs")
        os.makedirs(self.runs_dir, exist_ok=True)

    def run(self, tag: str, config, *, keep_workdir: bool = False) -> dict:
        """Trains and evaluates `config` (or returns its cached result).

        Args:
          tag: readable prefix of the cache file and workdir.
          config: the run's config.
          keep_workdir: keep the checkpoints (the pre-trained backbone); else deleted.

        Returns:
          {'tag', 'config_hash', 'map', 'neural_collapse', 'map_ema', 'seconds', 'logit_scale'}.
        """
        from mlcnc_jax import build

        key = f"{tag}_{config_hash(config)}"
        path = os.path.join(self.runs_dir, key + ".json")
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            print(f"[cached] {tag}: {_fmt(result)}", flush=True)
            return result
        workdir = os.path.join(self.cache_dir, "work", key)
        shutil.rmtree(workdir, ignore_errors=True)  # a killed run restarts from scratch
        start = time.perf_counter()
        try:
            results = build.train_and_evaluate(config, workdir)
            error = None
        except FloatingPointError as e:  # a diverged run is a result (of a bad setting)
            results, error = None, str(e).splitlines()[0]
        seconds = time.perf_counter() - start
        result = {"tag": tag, "config_hash": config_hash(config), "seconds": seconds}
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
            result["logit_scale"] = _final_logit_scale(workdir)
        if keep_workdir:
            result["workdir"] = workdir
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable(result), f, indent=1)
        os.replace(tmp, path)
        print(f"[{seconds:5.1f}s] {tag}: {_fmt(result)}", flush=True)
        return result


def _final_logit_scale(workdir: str) -> float | None:
    """The last logged value of the learned logit scale gamma (MLC-NC runs), from the summaries."""
    try:
        import tensorflow as tf

        value = None
        for name in sorted(os.listdir(workdir)):
            if not name.startswith("events.out.tfevents"):
                continue
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                for v in event.summary.value:
                    if v.tag == "train/logit_scale":
                        value = float(tf.make_ndarray(v.tensor))
        return value
    except Exception:  # the summaries are a nicety: never fail a finished run over them
        return None


_jsonable = common.to_json


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _fmt(result: dict) -> str:
    m = result["map"]
    text = " ".join(f"{k} {_num(m[k]):.1f}" for k in ("total", *GROUPS))
    if result.get("logit_scale") is not None:
        text += f" | gamma {result['logit_scale']:.2f}"
    if result.get("error"):
        text += f" | {result['error']}"
    return text


# ----------------------------------------------------------------------------- protocol


def pretrain_backbone(runner: Runner, budget: Budget, data_root: str) -> tuple[str, dict]:
    """Pre-trains (or finds) the backbone; returns its workdir and the run's record."""
    config = pretrain_config(budget, data_root)
    tag = "pretrain"
    key = f"{tag}_{config_hash(config)}"
    workdir = os.path.join(runner.cache_dir, "work", key)
    cached = os.path.join(runner.runs_dir, key + ".json")
    if os.path.exists(cached) and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        os.remove(cached)  # the record outlived its checkpoint: pre-train again
    result = runner.run(tag, config, keep_workdir=True)
    if result.get("error"):
        raise RuntimeError(f"Pre-training diverged: {result['error']}")
    return workdir, result


def select(
    runner: Runner,
    variants: Sequence[Variant],
    budget: Budget,
    *,
    data_root: str,
    pretrained_dir: str,
) -> dict[str, dict]:
    """Chooses each variant's learning rate (and MLC-NC's logit scale) on the validation split.

    MLC-NC's (lr, initial logit scale) grid runs first; its chosen scale is then used by
    every other MLC-NC-family row, which chooses its own learning rate.

    Returns:
      {variant: {'lr', 'logit_scale', 'val_map', 'grid': [{'lr', 'logit_scale', 'val_map', ...}]}}.
    """
    chosen: dict[str, dict] = {}

    def grid(variant: Variant, scales: Sequence[float]) -> dict:
        points = []
        for scale in scales:
            for lr in budget.lr_grid:
                config = run_config(
                    variant,
                    budget,
                    data_root=data_root,
                    pretrained_dir=pretrained_dir,
                    lr=lr,
                    logit_scale=scale,
                    seed=0,
                    validation=True,
                )
                tag = f"val_{variant.name}_lr{lr:g}" + (f"_g{scale:g}" if variant.is_mlcnc else "")
                r = runner.run(tag, config)
                points.append(
                    {
                        "lr": lr,
                        "logit_scale": scale if variant.is_mlcnc else None,
                        "val_map": r["map"],
                        "final_logit_scale": r.get("logit_scale"),
                        "seconds": r["seconds"],
                    }
                )
        # Validation total mAP decides; a diverged point (NaN) never wins.
        best = max(points, key=lambda p: np.nan_to_num(_num(p["val_map"]["total"]), nan=-1.0))
        return {
            "lr": best["lr"],
            "logit_scale": best["logit_scale"],
            "val_map": best["val_map"],
            "grid": points,
        }

    mlcnc_scale = budget.logit_scale_grid[0]
    if any(v.is_mlcnc for v in variants):
        chosen["mlcnc"] = grid(VARIANTS["mlcnc"], budget.logit_scale_grid)
        mlcnc_scale = chosen["mlcnc"]["logit_scale"]
    for variant in variants:
        if variant.name in chosen:
            continue
        chosen[variant.name] = grid(variant, [mlcnc_scale])
    return {v.name: chosen[v.name] for v in variants}


def final_runs(
    runner: Runner,
    variants: Sequence[Variant],
    chosen: dict[str, dict],
    budget: Budget,
    seeds: Sequence[int],
    *,
    data_root: str,
    pretrained_dir: str,
) -> dict[str, list[dict]]:
    """Trains every variant with its chosen settings on the full train split, per seed."""
    out: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: an early stop still leaves every variant with some seeds
        for variant in variants:
            sel = chosen[variant.name]
            config = run_config(
                variant,
                budget,
                data_root=data_root,
                pretrained_dir=pretrained_dir,
                lr=sel["lr"],
                logit_scale=sel["logit_scale"] or 1.0,
                seed=seed,
                validation=False,
            )
            r = runner.run(f"test_{variant.name}_s{seed}", config)
            out.setdefault(variant.name, []).append(r)
    return out


# ----------------------------------------------------------------------------- reports


def summarise(runs: Sequence[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of every metric."""
    values = {
        "total": [r["map"]["total"] for r in runs],
        **{g: [r["map"][g] for r in runs] for g in GROUPS},
        **{k: [r["neural_collapse"][k] for r in runs] for k in ("nc1", "nc2", "mean_angle")},
    }
    out = {}
    for name in METRICS:
        x = np.asarray([_num(v) for v in values[name]], np.float64)
        out[name] = {
            "mean": float(np.mean(x)),
            "std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0,
        }
    out["n_seeds"] = len(runs)
    out["seconds_per_run"] = float(np.mean([r["seconds"] for r in runs]))
    scales = [r.get("logit_scale") for r in runs if r.get("logit_scale") is not None]
    if scales:
        out["final_logit_scale"] = float(np.mean(scales))
    return out


machine = common.machine


def plot(summary: dict[str, dict], path: str) -> None:
    """Grouped bar chart of head / medium / tail mAP (mean ± std over seeds) per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    x = np.arange(len(names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(names) + 2), 4.5))
    for i, g in enumerate(GROUPS):
        means = [summary[n][g]["mean"] for n in names]
        stds = [summary[n][g]["std"] for n in names]
        ax.bar(x + (i - 1) * width, means, width, yerr=stds, capsize=2, label=g, color=COLOURS[g])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("test mAP (%)")
    n_seeds = max(s["n_seeds"] for s in summary.values())
    ax.set_title(
        f"synthetic_lt: head / medium / tail mAP per variant (mean ± std, {n_seeds} seeds)"
    )
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(stat: dict, digits: int = 1) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean != mean:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _welch(a: Sequence[float], b: Sequence[float]) -> str:
    """Difference of means with Welch's t statistic, as text."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = a.mean() - b.mean()
    if len(a) < 2 or len(b) < 2:
        return f"{diff:+.1f}"
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    t = diff / se if se > 0 else float("inf") * np.sign(diff)
    return f"{diff:+.1f} (Welch t = {t:.1f})"


def write_report(
    out_dir: str,
    *,
    budget: Budget,
    variants: Sequence[Variant],
    chosen: dict[str, dict],
    runs: dict[str, list[dict]],
    pretrain_result: dict,
    wall_seconds: float,
    command: str,
    run_seconds: float,
) -> None:
    """Writes quality.json, quality.png and quality.md (keeping the findings section)."""
    os.makedirs(out_dir, exist_ok=True)
    summary = {v.name: summarise(runs[v.name]) for v in variants if runs.get(v.name)}
    for name, s in summary.items():
        s["learning_rate"] = chosen[name]["lr"]
        if chosen[name]["logit_scale"] is not None:
            s["logit_scale_init"] = chosen[name]["logit_scale"]
        s["description"] = VARIANTS[name].description
    payload = {
        "dataset": "synthetic_lt (built-in, 'target' classes; test split for the table)",
        "machine": machine(),
        "command": command,
        "budget": dataclasses.asdict(budget),
        "wall_seconds": wall_seconds,
        "run_seconds": run_seconds,
        "pretrain": {
            "seconds": pretrain_result["seconds"],
            "test_map": pretrain_result["map"]["total"],
        },
        "selection": {
            name: {
                "learning_rate": c["lr"],
                "logit_scale_init": c["logit_scale"],
                "val_map_total": c["val_map"]["total"],
                "grid": c["grid"],
            }
            for name, c in chosen.items()
        },
        "variants": summary,
    }
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump(_jsonable(payload), f, indent=1)
    plot(summary, os.path.join(out_dir, "quality.png"))

    b = budget
    lines = [
        "# Quality: MLC-NC against baselines and ablations on `synthetic_lt`",
        "",
        "Generated by `benchmarks/quality.py` (this file's findings section is kept when it reruns).",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Cost: {run_seconds / 60:.1f} min for all the runs below (pre-training, selection, "
        f"final; each timed end to end: data loading, compilation, training, evaluation); "
        f"wall time of the invocation that wrote this file: {wall_seconds / 60:.1f} min "
        "(less when earlier invocations had cached some runs).",
        f"- Data: built-in `synthetic_lt` 'target' classes at {b.image_size} px (train 1,104 "
        "images, 6/6/8 head/medium/tail classes; test 2,400 images, nearly balanced). "
        "Every number below is ours, on this synthetic data, not on VOC-LT or COCO-LT.",
        f"- Pre-training: the plain model (resnet_small, global pooling, linear classifier), BCE, "
        f"uniform sampling, {b.pretrain_epochs} epoch(s) of the balanced 'pretrain' set (20 other "
        f"classes, 10,000 images; never the target classes), lr {b.pretrain_lr:g}; done once, "
        f"cached: {pretrain_result['seconds']:.0f} s, mAP {_num(pretrain_result['map']['total']):.1f} "
        "on its own balanced test split. Every row except the `scratch_*` ones starts from it.",
        f"- Budget of every fine-tuning run: {b.steps} steps of batch {b.batch_size} "
        f"({b.steps * b.batch_size:,} samples; one class-aware epoch is 8,000), resnet_small, "
        f"embed_dim {b.embed_dim}, p = {b.proj_dim}, Adam with one-cycle schedule (20 % warm-up), "
        f"weight decay 1e-4; the steps form {b.epochs} 'epochs' (prototype updates), MLC-NC's "
        f"FLA-only warm-up is {b.warmup_epochs} of them ({100 * b.warmup_epochs / b.epochs:.0f} % "
        "of the steps). Raw weights are evaluated (the EMA is not used for the table).",
        f"- Selection: on a validation split of {100 * b.val_fraction:.0f} % carved from the "
        f"long-tailed training split (seed 0), learning rate from {list(b.lr_grid)} for every "
        f"variant; MLC-NC also its initial logit scale from {list(b.logit_scale_grid)}, which the "
        "MLC-NC ablations and the from-scratch MLC-NC row reuse. Criterion: validation total mAP. "
        "The test split is used only for the final table.",
        "- Final: the chosen settings, full training split, seeds "
        f"{sorted({r['tag'].rsplit('_s', 1)[1] for rs in runs.values() for r in rs})}, "
        "mean ± sample std (ddof 1) over seeds; the data set is the same for every seed.",
        "- NC1 / NC2 / mean angle: of the class features (MLC-NC rows: the per-class features "
        "F of the positive pairs; plain-model rows: the pooled backbone feature of each image). "
        "ETF angle for 20 classes: 93.0°.",
        "",
        "## Test mAP (%) and neural-collapse measures",
        "",
        "| variant | lr | γ₀ | total | head | medium | tail | NC1 | NC2 | mean angle (°) | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        gamma = f"{s['logit_scale_init']:g}" if "logit_scale_init" in s else "–"
        lines.append(
            f"| {name} | {s['learning_rate']:g} | {gamma} | {_pm(s['total'])} | {_pm(s['head'])} | "
            f"{_pm(s['medium'])} | {_pm(s['tail'])} | {_pm(s['nc1'], 2)} | {_pm(s['nc2'], 3)} | "
            f"{_pm(s['mean_angle'])} | {s['n_seeds']} |"
        )
    lines += ["", "Rows:", ""]
    lines += [f"- `{name}`: {VARIANTS[name].description}." for name in summary]

    # MLC-NC against the sampler-matched BCE (both class-aware, both pre-trained).
    if "mlcnc" in summary and "bce_aware" in summary:
        a, c = runs["mlcnc"], runs["bce_aware"]
        lines += ["", "## MLC-NC against the sampler-matched BCE (class-aware, pre-trained)", ""]
        lines += ["| | total | head | medium | tail |", "|---|---|---|---|---|"]
        lines.append(
            "| mlcnc − bce_aware | "
            + " | ".join(
                _welch([_num(r["map"][k]) for r in a], [_num(r["map"][k]) for r in c])
                for k in ("total", *GROUPS)
            )
            + " |"
        )

    lines += [
        "",
        "## Selection on the validation split (seed 0, validation total mAP)",
        "",
        "| variant | lr | γ₀ | val total | val head | val medium | val tail | γ at the end | chosen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in chosen.items():
        for p in c["grid"]:
            m = p["val_map"]
            is_best = p["lr"] == c["lr"] and p["logit_scale"] == c["logit_scale"]
            gamma = f"{p['logit_scale']:g}" if p["logit_scale"] is not None else "–"
            final = (
                f"{p['final_logit_scale']:.2f}" if p.get("final_logit_scale") is not None else "–"
            )
            lines.append(
                f"| {name} | {p['lr']:g} | {gamma} | "
                + " | ".join(f"{_num(m[k]):.1f}" for k in ("total", *GROUPS))
                + f" | {final} | {'✓' if is_best else ''} |"
            )
    lines += [
        "",
        "![head / medium / tail mAP per variant](quality.png)",
        "",
        "## Cost",
        "",
        f"Pre-training {pretrain_result['seconds']:.0f} s (once); mean seconds per fine-tuning "
        "run (compile, train, two evaluations: raw and EMA):",
        "",
        "| variant | s / run |",
        "|---|---|",
    ]
    lines += [f"| {name} | {s['seconds_per_run']:.0f} |" for name, s in summary.items()]

    path = os.path.join(out_dir, "quality.md")
    findings = f"{FINDINGS_BEGIN}\n## Findings\n\n(not written yet)\n{FINDINGS_END}"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        match = re.search(re.escape(FINDINGS_BEGIN) + r".*?" + re.escape(FINDINGS_END), old, re.S)
        if match:
            findings = match.group(0)
    lines += ["", findings, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ----------------------------------------------------------------------------- main


def _parse_list(text: str, cast=str) -> list:
    return [cast(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny end-to-end smoke test")
    parser.add_argument("--variants", default="", help="comma-separated rows (default: all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=0, help="override the steps per run")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "cache"))
    parser.add_argument(
        "--data_root", default="~/.cache/mlcnc_jax/datasets", help="where synthetic_lt is kept"
    )
    parser.add_argument(
        "--pretrain_only", action="store_true", help="only pre-train (or find) the backbone"
    )
    args = parser.parse_args(argv)

    budget = QUICK if args.quick else Budget()
    if args.steps:
        budget = dataclasses.replace(budget, steps=args.steps)
    names = _parse_list(args.variants) or (list(QUICK_VARIANTS) if args.quick else list(VARIANTS))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = _parse_list(args.seeds, int) or ([0] if args.quick else [0, 1, 2])
    variants = [VARIANTS[n] for n in names]
    cache = os.path.join(args.cache, "quality_quick" if args.quick else "quality")
    out = (
        os.path.join(cache, "results")
        if args.quick and args.out == parser.get_default("out")
        else args.out
    )

    # Runs of the same variant and seed-independent programs share compiled code.
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.cache, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    logging.set_verbosity(logging.WARNING)
    from mlcnc_jax.data import synthetic

    _SALT["synthetic_lt"] = str(synthetic.SyntheticLt.VERSION)

    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    runner = Runner(cache)
    data_root = os.path.expanduser(args.data_root)
    pretrained_dir, pre = pretrain_backbone(runner, budget, data_root)
    if args.pretrain_only:
        return
    chosen = select(runner, variants, budget, data_root=data_root, pretrained_dir=pretrained_dir)
    runs = final_runs(
        runner, variants, chosen, budget, seeds, data_root=data_root, pretrained_dir=pretrained_dir
    )
    wall = time.perf_counter() - start
    # The benchmark's cost: every run it uses, whether it ran now or in an earlier invocation.
    run_seconds = (
        pre["seconds"]
        + sum(p["seconds"] for c in chosen.values() for p in c["grid"])
        + sum(r["seconds"] for rs in runs.values() for r in rs)
    )
    write_report(
        out,
        budget=budget,
        variants=variants,
        chosen=chosen,
        runs=runs,
        pretrain_result=pre,
        wall_seconds=wall,
        command=command.strip(),
        run_seconds=run_seconds,
    )
    print(f"Done in {wall / 60:.1f} min; results in {out}", flush=True)


if __name__ == "__main__":
    main()
