"""What an evaluation and a run return: typed records (the reports write them as JSON).

`Evaluation` is one scoring of the test split (the raw and the EMA weights of one
step); `RunResult` is what a training or evaluation run returns: its last
evaluation, and the best one on the test split when the workdir holds several.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlcnc_jax.groups import GROUPS


def _number(value: Any) -> float:
    # An empty group's mAP is NaN in memory and null in a report.
    return math.nan if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class GroupMAP:
    """mAP in percent over all classes and over each frequency group (NaN: no class)."""

    total: float
    head: float
    medium: float
    tail: float

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GroupMAP:
        """From {'total', 'head', 'medium', 'tail'} (`metrics.lt_map`, or a report's)."""
        return cls(**{name: _number(values[name]) for name in ("total", *GROUPS)})

    def as_dict(self) -> dict[str, float]:
        """{'total', 'head', 'medium', 'tail'}, in that order (as the reports write it)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Scores:
    """One set of weights scored on the test split.

    Attributes:
      map: mAP by group.
      ap: [K] per-class average precision (NaN for a class without a positive).
      neural_collapse: the neural-collapse measures by name (`metrics.neural_collapse`).
    """

    map: GroupMAP
    ap: np.ndarray
    neural_collapse: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The raw and the EMA weights of one step, scored on the test split.

    Attributes:
      step: the step the weights are of.
      raw: the trained weights' scores.
      ema: the moving average's scores.
      num_images_scored: images scored (each once).
      num_images_expected: images the split has.
      seconds: how long the scoring took.
    """

    step: int
    raw: Scores
    ema: Scores
    num_images_scored: int
    num_images_expected: int
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class BestOnTest:
    """The evaluation with the highest raw total mAP of a workdir (selected on the test split).

    Attributes:
      step: its step.
      map_raw: its raw mAP by group.
      report: its entry of summary.json, as written (with how it was selected).
    """

    step: int
    map_raw: GroupMAP
    report: dict


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a training or evaluation run returns.

    Attributes:
      final: the run's last evaluation.
      num_evaluations: how many evaluations the workdir's reports hold (a resumed run's
        earlier ones too); 0 where this process writes no reports.
      best_raw_on_test: the best of them by raw total mAP, when there are several.
    """

    final: Evaluation
    num_evaluations: int = 0
    best_raw_on_test: BestOnTest | None = None

    @classmethod
    def from_summary(cls, final: Evaluation, summary: Mapping | None) -> RunResult:
        """The result of a run whose reports wrote `summary` (`reports.write_run_summary`)."""
        if not summary:
            return cls(final)
        best = summary["best_raw_on_test"]
        best_map = GroupMAP.from_dict(best["map_raw"])
        chosen = None
        if summary["num_evaluations"] > 1 and not math.isnan(best_map.total):
            chosen = BestOnTest(step=int(best["step"]), map_raw=best_map, report=dict(best))
        return cls(final, int(summary["num_evaluations"]), chosen)

    def summary_line(self) -> str:
        """The one-line JSON a run prints last: the final mAPs (and the best, when chosen)."""
        from mlcnc_jax.reports import to_json

        line = {
            "step": self.final.step,
            "map_raw": self.final.raw.map.as_dict(),
            "map_ema": self.final.ema.map.as_dict(),
            "neural_collapse": self.final.raw.neural_collapse,
        }
        if self.best_raw_on_test is not None:
            line["best_raw_on_test"] = self.best_raw_on_test.report
        # Strict JSON: an empty group's mAP is null, never NaN.
        return json.dumps(to_json(line), allow_nan=False)
