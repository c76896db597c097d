"""Quality benchmark, its report: what the runs show, as quality.json, quality.md and quality.png.

The generated text states numbers and whether each interval excludes 0; what they mean for
the paper is written by hand in a dated findings file beside the report (`FINDINGS`), which
the report links to.
"""

from __future__ import annotations

import json
import os

import numpy as np

from benchmarks import common
from benchmarks.common import ROOT
from benchmarks.quality_protocol import (
    BUDGET_TITLES,
    LADDER,
    VARIANTS,
    VIT_BACKBONE,
    VIT_PRETRAIN_LR,
    Protocol,
    best_by_validation,
    budget_steps,
)
from benchmarks.quality_stats import compare, num, summarise, welch_interval
from mlcnc_jax.groups import COLOURS, GROUPS

# The findings written by hand from the tables (in benchmarks/results/, beside the report).
FINDINGS = os.path.join(ROOT, "benchmarks", "results", "2026-12-07-quality-findings.md")
ABLATION_ROWS = (
    "no_fla",
    "no_fpc",
    "linear_classifier",
    "trainable_etf",
    "cumulative_prototypes",
    "cosine_attention",
)


def analyse(
    runs: dict[str, dict[str, list[dict]]],
    chosen: dict,
    best_other: str | None,
    protocol: Protocol,
) -> dict:
    """What the report tabulates, from the runs of each budget and row.

    Args:
      runs: {budget: {row: [run result]}} (test-split runs).
      chosen: the selection ({row: {'val_map', ...}}).
      best_other: the best of the other baselines by validation mAP, or None.
      protocol: the budgets (for the lines of the budget check).

    Returns:
      {'best_sampler_matched': {budget: row}, 'tables': {budget: {row: summary}},
      'differences': {title: {metric: Welch interval}}, 'verdicts': `claim_lines` (the
      key keeps quality.json's earlier name)}.
    """
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
    for name in ABLATION_ROWS:
        if "mlcnc" in runs["long"] and name in runs["long"]:
            differences[f"mlcnc − {name}, long"] = compare(runs["long"], "mlcnc", name)
    for shorter, longer in zip(LADDER, LADDER[1:]):
        for name in runs[longer]:
            if name in runs[shorter]:
                differences[f"{name}: {longer} − {shorter}"] = compare(
                    {"a": runs[longer][name], "b": runs[shorter][name]}, "a", "b"
                )
    return {
        "best_sampler_matched": best_aware,
        "tables": tables,
        "differences": differences,
        "verdicts": claim_lines(runs, best_aware, protocol),
    }


def interval_line(interval: dict, what: str) -> str:
    """`what`: a difference, its 95 % interval and where the interval lies against 0."""
    if interval["low"] != interval["low"]:
        return f"{what}: too few seeds for an interval."
    d, lo, hi = interval["diff"], interval["low"], interval["high"]
    span = f"{d:+.1f} points (95 % interval {lo:+.1f} to {hi:+.1f})"
    if lo > 0:
        return f"{what}: {span}, **above 0**."
    if hi < 0:
        return f"{what}: {span}, **below 0**."
    return f"{what}: {span}, includes 0."


def claim_lines(
    runs: dict[str, dict[str, list[dict]]], best_aware: dict[str, str], protocol: Protocol
) -> list[str]:
    """One line per difference that a claim of the paper rests on (and the budget check).

    Each line states the difference of test mAP and its interval; what they mean for the paper
    is written by hand in `FINDINGS`.
    """
    out = []

    def claim(budget: str, other: str | None, metric: str, text: str) -> None:
        r = runs.get(budget, {})
        if "mlcnc" in r and other in r:
            out.append(interval_line(compare(r, "mlcnc", other)[metric], text))

    for budget, title in BUDGET_TITLES.items():
        base = best_aware.get(budget)
        claim(
            budget,
            base,
            "tail",
            f"Tail, MLC-NC minus the best sampler-matched baseline (`{base}`, class-aware), "
            f"{title}",
        )
        claim(budget, base, "total", f"Total, MLC-NC minus `{base}`, {title}")
        claim(
            budget,
            "bce_uniform",
            "tail",
            f"Tail, MLC-NC minus BCE with uniform sampling (the paper's baseline row), {title}",
        )
    parts = {"no_fla": "FLA", "no_fpc": "FPC", "linear_classifier": "the frozen ETF classifier"}
    for name, part in parts.items():
        claim(
            "long",
            name,
            "total",
            f"Total, MLC-NC minus `{name}` (without {part}; paper Table 3), long budget",
        )
    steps = budget_steps(protocol)
    for shorter, longer in zip(LADDER, LADDER[1:]):
        for name, more in runs.get(longer, {}).items():
            if name in runs.get(shorter, {}):
                diff = welch_interval(
                    [num(r["map"]["total"]) for r in more],
                    [num(r["map"]["total"]) for r in runs[shorter][name]],
                )
                text = f"Total, `{name}` at {steps[longer]} minus {steps[shorter]} steps"
                out.append(interval_line(diff, text))
    if not out:
        out.append("No difference to state: the runs are missing.")
    return out


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


def write_report(out_dir: str, payload: dict, protocol: Protocol, command: str) -> None:
    """Writes quality.json, quality.png and quality.md (which links to `FINDINGS`)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump(common.to_json(payload), f, indent=1)
    tables, chosen = payload["tables"], payload["selection"]
    plot(tables, os.path.join(out_dir, "quality.png"))
    p = protocol
    findings_link = os.path.relpath(FINDINGS, out_dir)
    lines = [
        "# Quality: MLC-NC against baselines and ablations on `synthetic_lt`",
        "",
        "Generated by `python -m benchmarks.quality`. What these numbers mean for the paper is "
        f"written by hand in [{os.path.basename(FINDINGS)}]({findings_link}).",
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
            f"{num(v['test_map']):.1f} mAP (EMA {num(v['test_map_ema']):.1f}) on their test "
            "split."
            + (
                " Its rows use the learning rates chosen for the ResNet rows."
                if payload.get("runs", {}).get("vit")
                else ""
            )
        )
    if payload.get("not_run"):
        lines.append(f"- Not run in this file: {payload['not_run']}.")
    lines += ["", "## Differences behind the paper's claims (95 % Welch interval)", ""]
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
                    *(f"{num(q['val_map'][k]):.1f}" for k in ("total", *GROUPS)),
                    mark,
                ]
            )
    lines.append(
        common.markdown_table(
            ["row", "lr", "γ₀", "val total", *(f"val {g}" for g in GROUPS), "chosen"], rows
        )
    )
    lines += ["", "![head / medium / tail mAP per row](quality.png)", ""]
    with open(os.path.join(out_dir, "quality.md"), "w") as f:
        f.write("\n".join(lines))
