"""What a run writes: eval JSON, the AP-against-frequency plot, TensorBoard scalars."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from mlcnc_jax import storage
from mlcnc_jax.groups import COLOURS, group_of
from mlcnc_jax.results import Evaluation

if TYPE_CHECKING:  # annotations only: reports import neither JAX nor the data package
    from mlcnc_jax.data.dataset import MultiLabelDataset
    from mlcnc_jax.state import StepCounts
    from mlcnc_jax.trainer import Hook


def to_json(value: Any) -> Any:
    """Converts numpy values and NaN (-> None) into plain JSON-able Python."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_eval_report(
    workdir: str,
    results: Evaluation,
    *,
    class_names: Sequence[str],
    class_freq: np.ndarray,
    class_split: dict[str, Sequence[int]],
    dataset: str,
    subset: dict | None = None,
    suffix: str = "",
) -> str:
    """Writes `eval_<step><suffix>.json` and `ap_vs_freq_<step><suffix>.png`; returns the JSON path.

    Args:
      workdir: the run's directory.
      results: the evaluation.
      class_names: [K] class names.
      class_freq: [K] training images per class.
      class_split: the head/medium/tail class indices.
      dataset: the dataset's name.
      subset: {'images': scored, 'of': the split's size} when only part of the test split
        was scored (eval.max_images); recorded in the report. None: the whole split.
      suffix: added to the file names (e.g. '_subset_50', see `subset_suffix`).
    """
    step = results.step
    groups = group_of(class_split, len(class_names))
    per_class = [
        {
            "class": name,
            "index": i,
            "train_images": int(class_freq[i]),
            "group": groups[i],
            "ap_raw": results.raw.ap[i],
            "ap_ema": results.ema.ap[i],
        }
        for i, name in enumerate(class_names)
    ]
    report = {
        "step": step,
        "dataset": dataset,
        "num_images_scored": results.num_images_scored,
        "num_images_expected": results.num_images_expected,
        "test_subset": subset,
        "map_raw": results.raw.map.as_dict(),
        "map_ema": results.ema.map.as_dict(),
        "neural_collapse_raw": results.raw.neural_collapse,
        "neural_collapse_ema": results.ema.neural_collapse,
        "class_split": class_split,
        "per_class": per_class,
    }
    path = storage.join(workdir, f"eval_{step}{suffix}.json")
    storage.write_text(path, json.dumps(to_json(report), indent=1, allow_nan=False))
    plot_ap_vs_frequency(
        storage.join(workdir, f"ap_vs_freq_{step}{suffix}.png"),
        np.asarray(results.raw.ap),
        class_freq,
        groups,
        class_names,
        title=f"{dataset}, step {step}: per-class AP vs training images (mAP {results.raw.map.total:.1f})",
    )
    return path


def plot_ap_vs_frequency(
    path: str,
    ap: np.ndarray,
    class_freq: np.ndarray,
    groups: Sequence[str],
    class_names: Sequence[str],
    title: str = "",
) -> None:
    """Scatter of per-class AP (%) against training frequency (log x), coloured by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    freq = np.maximum(np.asarray(class_freq), 1)
    for group, colour in COLOURS.items():
        idx = [i for i, g in enumerate(groups) if g == group]
        if idx:
            ax.scatter(
                freq[idx], 100 * ap[idx], c=colour, label=f"{group} ({len(idx)} classes)", s=36
            )
    if len(class_names) <= 30:
        for i, name in enumerate(class_names):
            if np.isfinite(ap[i]):
                ax.annotate(
                    name,
                    (freq[i], 100 * ap[i]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("average precision (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=110)
    plt.close(fig)


PARAMETER_TABLE = "parameters.txt"
SUMMARY = "summary.json"
SELECTED_ON_TEST = "selected on the test split, as the authors' code does"


def _scores(report: dict) -> dict:
    return {"step": report["step"], "map_raw": report["map_raw"], "map_ema": report["map_ema"]}


def summarize_evaluations(reports: Sequence[dict], total_steps: int | None = None) -> dict:
    """The final evaluation and the best one on the test split, side by side.

    The authors' code evaluates every epoch on the test split and publishes the
    best epoch's raw mAP: model selection on the test split, which flatters the
    number. Both are reported here, the selected ones labelled as such.

    Args:
      reports: the run's `eval_<step>.json` contents (any order).
      total_steps: the plan's length (None: unknown; `complete` is then None).

    Returns:
      {'final': scores of the latest step, 'complete': whether it is the plan's
      last step, 'best_raw_on_test' / 'best_ema_on_test': the evaluation with the
      highest raw / EMA total mAP with 'selection' saying how it was chosen,
      'evaluations': [{'step', 'raw_total', 'ema_total'}] by step}.
    """
    if not reports:
        raise ValueError("No evaluation to summarise.")
    reports = sorted(reports, key=lambda r: r["step"])

    def total(r: dict, kind: str) -> float:
        value = r[f"map_{kind}"]["total"]
        return -math.inf if value is None else float(value)

    final = reports[-1]
    summary = {
        "final": _scores(final),
        "complete": None if total_steps is None else final["step"] >= total_steps,
        "num_evaluations": len(reports),
    }
    for kind in ("raw", "ema"):
        # max() keeps the first of equal scores: ties go to the earlier step.
        best = max(reports, key=lambda r: total(r, kind))
        summary[f"best_{kind}_on_test"] = {
            **_scores(best),
            "selection": f"highest {kind} total mAP of {len(reports)} evaluations, "
            + SELECTED_ON_TEST,
        }
    summary["evaluations"] = [
        {
            "step": r["step"],
            "raw_total": r["map_raw"]["total"],
            "ema_total": r["map_ema"]["total"],
        }
        for r in reports
    ]
    return summary


def subset_suffix(subset: dict) -> str:
    """The file-name suffix of a report that scored only part of the test split."""
    return f"_subset_{subset['images']}"


def read_eval_report(workdir: str, step: int) -> dict | None:
    """`eval_<step>.json` of the workdir, or None when it is missing, empty or unreadable.

    A report cut short (a full disk, a kill during a write of an older version) counts as
    missing, so that a resumed run evaluates that step again instead of trusting it.
    """
    from absl import logging
    from etils import epath

    path = epath.Path(storage.join(workdir, f"eval_{step}.json"))
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logging.warning("%s is unreadable (%s): it counts as missing", path, e)
        return None
    if not isinstance(report, dict) or report.get("step") != step:
        logging.warning(
            "%s is not an evaluation report of step %d: it counts as missing", path, step
        )
        return None
    return report


def has_eval_report(workdir: str, step: int) -> bool:
    """Whether the workdir holds a readable `eval_<step>.json`."""
    return read_eval_report(workdir, step) is not None


def set_aside_reports_after(workdir: str, step: int, suffix: str = ".set_aside") -> list[str]:
    """Renames the reports of steps after `step` so that a run resumed from `step` adds its own.

    The companion of `checkpoint_health.set_aside_after` for `--restore_step`: the abandoned
    branch's `eval_<s>.json` and `ap_vs_freq_<s>.png` (and their subset variants) become
    `eval_<s>.set_aside.json` and so on (`.set_aside2`, ... when that name is taken); nothing
    is deleted. SUMMARY is then rewritten from the reports that remain (removed when none
    remains, as it would only describe the abandoned branch).

    Args:
      workdir: the run's directory (local path or bucket URL).
      step: the step the run resumes from.
      suffix: inserted before the extension.

    Returns:
      The new paths.
    """
    import re

    from absl import logging
    from etils import epath

    pattern = re.compile(r"^(eval|ap_vs_freq)_(\d+)((?:_subset_\d+)?)\.(json|png)$")
    moved = []
    for path in sorted(epath.Path(workdir).iterdir()) if epath.Path(workdir).is_dir() else []:
        match = pattern.match(path.name)
        if not match or int(match.group(2)) <= step:
            continue
        stem = f"{match.group(1)}_{match.group(2)}{match.group(3)}"
        target, n = path.parent / f"{stem}{suffix}.{match.group(4)}", 1
        while target.exists():
            n += 1
            target = path.parent / f"{stem}{suffix}{n}.{match.group(4)}"
        path.rename(target)
        logging.warning("set aside %s (after step %d) as %s", path.name, step, target.name)
        moved.append(str(target))
    if moved:
        remaining = read_eval_reports(workdir)
        summary = epath.Path(storage.join(workdir, SUMMARY))
        if remaining:
            write_run_summary(workdir)
        elif summary.exists():
            target, n = summary.parent / f"summary{suffix}.json", 1
            while target.exists():
                n += 1
                target = summary.parent / f"summary{suffix}{n}.json"
            summary.rename(target)
    return moved


def read_eval_reports(workdir: str) -> list[dict]:
    """Every `eval_<step>.json` of a workdir (an unreadable one is skipped with a warning)."""
    from absl import logging
    from etils import epath

    out = []
    for path in epath.Path(workdir).glob("eval_*.json"):
        if not path.name[len("eval_") : -len(".json")].isdigit():
            continue
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            logging.warning("Skipping unreadable report %s: %s", path, e)
    return out


def read_summary(workdir: str) -> dict | None:
    """The workdir's SUMMARY, or None when there is none (or it is unreadable)."""
    from etils import epath

    path = epath.Path(storage.join(workdir, SUMMARY))
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_run_summary(workdir: str, total_steps: int | None = None) -> dict:
    """Writes SUMMARY from the workdir's eval reports (so a resumed run's count too)."""
    summary = summarize_evaluations(read_eval_reports(workdir), total_steps)
    storage.write_text(
        storage.join(workdir, SUMMARY), json.dumps(to_json(summary), indent=1, allow_nan=False)
    )
    return summary


def flat_hparams(config: ml_collections.ConfigDict) -> dict:
    """The config as {'section.field': scalar} for TensorBoard's hyper-parameter table."""
    flat = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk("", config.to_dict())
    return flat


class RunReports:
    """A trainer hook that writes the run's reports into the workdir (process 0 only).

    Train scalars (means over `log_every_steps`) and eval scalars go to
    TensorBoard; each evaluation also writes `eval_<step>.json` and
    `ap_vs_freq_<step>.png` and rewrites SUMMARY (final and best-on-test
    numbers, `summarize_evaluations`); a fresh run writes its hyper-parameters.

    Args:
      workdir: the run's directory.
      config: the experiment config (its hyper-parameters are recorded).
      dataset: the `MultiLabelDataset` (class names, frequencies, groups).
      log_every_steps: how many steps each train scalar averages.
      total_steps: the plan's length (SUMMARY says whether the run is complete).

    Writes the full parameter table to PARAMETER_TABLE at the start.
    """

    def __init__(
        self,
        workdir: str,
        config: ml_collections.ConfigDict,
        dataset,
        log_every_steps: int,
        total_steps: int | None = None,
    ):
        # clu's writers import TensorFlow: only a run that writes reports needs them.
        from clu import metric_writers

        self.workdir = workdir
        self.config = config
        self.dataset = dataset
        self.log_every_steps = max(1, int(log_every_steps))
        self.writer = metric_writers.create_default_writer(workdir, just_logging=False)
        self.pending: list[dict] = []
        self.total_steps = total_steps
        self.summary: dict | None = None
        # Set by on_start, which only a training run calls: an evaluation without it is a
        # standalone one (--mode=eval).
        self.training = False

    def on_start(self, state, start_step: int) -> None:
        from clu import parameter_overview

        self.training = True
        storage.write_text(
            storage.join(self.workdir, PARAMETER_TABLE),
            parameter_overview.get_parameter_overview(state.params) + "\n",
        )
        if start_step == 0:
            self.writer.write_hparams(flat_hparams(self.config))

    def on_step(self, step: int, metrics: dict) -> None:
        self.pending.append(metrics)
        if step % self.log_every_steps == 0:
            self._write_train(step)

    def _write_train(self, step: int) -> None:
        if not self.pending:
            return
        means = {k: float(np.mean([m[k] for m in self.pending])) for k in self.pending[0]}
        self.writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
        self.pending = []

    def on_eval(self, step: int, results: Evaluation) -> None:
        self._write_train(step)
        scalars = {}
        for name, scores in (("raw", results.raw), ("ema", results.ema)):
            scalars.update({f"eval/{name}_map_{g}": v for g, v in scores.map.as_dict().items()})
            scalars.update({f"eval/{name}_{k}": v for k, v in scores.neural_collapse.items()})
        full_size = getattr(self.dataset, "full_test_size", None)
        subset = None if full_size is None else {"images": len(self.dataset.test), "of": full_size}
        # A quick look at part of the test split (eval.max_images) never replaces a report of
        # the whole split (or of another subset), nor the run's summary: it is written under
        # its own name unless it repeats the step's report, or is a training run's own
        # evaluation of a step not yet reported.
        apart = False
        if subset is not None:
            existing = read_eval_report(self.workdir, step)
            if existing is None:
                apart = not self.training
            else:
                apart = to_json(existing.get("test_subset")) != to_json(subset)
        if not apart:
            self.writer.write_scalars(step, scalars)
            self.writer.flush()
        path = write_eval_report(
            self.workdir,
            results,
            class_names=self.dataset.class_names,
            class_freq=self.dataset.class_freq,
            class_split=self.dataset.class_split,
            dataset=self.dataset.name,
            subset=subset,
            suffix=subset_suffix(subset) if apart else "",
        )
        if apart:
            from mlcnc_jax import console

            console.say(
                f"Scored {subset['images']} of the {subset['of']} test images "
                f"(eval.max_images): wrote {path}, apart from the run's reports "
                f"(eval_{step}.json and {SUMMARY} are left as they are)"
            )
            return
        self.summary = write_run_summary(self.workdir, self.total_steps)

    def on_end(self, step: int) -> None:
        self._write_train(step)
        self.writer.flush()


def run_hooks(
    config: ml_collections.ConfigDict, workdir: str, dataset: MultiLabelDataset, steps: StepCounts
) -> list[Hook]:
    """A run's console (progress, evaluations) and its reports (`RunReports`, last)."""
    from mlcnc_jax import console

    return [
        console.Console(
            steps,
            config.train.batch_size,
            describe=f"{config.model.name} ({config.model.backbone}, {config.dtype}) on "
            f"{dataset.name}: {dataset.num_classes} classes, {len(dataset.train)} training / "
            f"{len(dataset.test)} test images",
            table_path=storage.join(workdir, PARAMETER_TABLE),
        ),
        RunReports(workdir, config, dataset, config.train.log_every_steps, steps.total_steps),
    ]


def is_reported_everywhere(workdir: str, writes_reports: bool) -> Callable[[int], bool]:
    """`is_reported(step)`: whether step's evaluation has its report, as process 0 sees it
    (every process calls it and gets the same answer)."""
    from mlcnc_jax import processes

    def is_reported(step: int) -> bool:
        return processes.broadcast_flag(writes_reports and has_eval_report(workdir, step))

    return is_reported
