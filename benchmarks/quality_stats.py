"""Quality benchmark, its statistics: mean ± std over seeds and Welch intervals of differences.

The t quantiles come from scipy.stats (a development requirement: the library never imports
this module).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from mlcnc_jax.groups import GROUPS

METRICS = ("total", *GROUPS, "nc1", "nc2", "mean_angle")


def num(x: Any) -> float:
    """A metric as a float (None, a missing score, as NaN)."""
    return float("nan") if x is None else float(x)


def val_total(val_map: dict) -> float:
    """Validation total mAP for choosing; a diverged run (NaN) never wins."""
    return float(np.nan_to_num(num(val_map["total"]), nan=-1.0))


def welch_interval(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a minus mean of b, with the 95 % Welch t interval.

    Returns:
      {'diff', 'low', 'high', 'df'}: NaN bounds and df for fewer than 2 seeds on a side; the
      bounds equal to the difference (df inf) when neither side varies.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "low": float("nan"), "high": float("nan"), "df": float("nan")}
    if a.var() == 0 and b.var() == 0:  # scipy's interval would be NaN (0 / 0)
        return {"diff": diff, "low": diff, "high": diff, "df": float("inf")}
    with warnings.catch_warnings():
        # A sample without spread (one side's seeds agree) is sound for Welch's interval;
        # scipy's moment check takes it for numerical cancellation.
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
        interval = result.confidence_interval(0.95)
    return {
        "diff": diff,
        "low": float(interval.low),
        "high": float(interval.high),
        "df": float(result.df),
    }


def compare(runs: dict[str, list[dict]], a: str, b: str) -> dict[str, dict]:
    """Welch intervals of row a minus row b (their runs' test mAP), for total and every group."""
    return {
        k: welch_interval([num(r["map"][k]) for r in runs[a]], [num(r["map"][k]) for r in runs[b]])
        for k in ("total", *GROUPS)
    }


def summarise(runs: Sequence[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of every metric."""
    values = {
        "total": [r["map"]["total"] for r in runs],
        **{g: [r["map"][g] for r in runs] for g in GROUPS},
        **{k: [r["neural_collapse"][k] for r in runs] for k in ("nc1", "nc2", "mean_angle")},
    }
    out: dict[str, Any] = {}
    for name in METRICS:
        x = np.asarray([num(v) for v in values[name]], np.float64)
        out[name] = {
            "mean": float(np.mean(x)),
            "std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0,
        }
    out["n_seeds"] = len(runs)
    out["seconds_per_run"] = float(np.mean([r["seconds"] for r in runs]))
    return out
