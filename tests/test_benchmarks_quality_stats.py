"""benchmarks.quality_stats against numbers computed by hand.

Each Welch case is built so that its degrees of freedom come out whole (1, 2 or 4), where
Student's t 97.5 % quantile has a closed form: df 1 tan(0.475 pi), df 2 0.95 / sqrt(2 p q),
df 4 2 sqrt(c - 1) with c = cos(arccos(sqrt(a)) / 3) / sqrt(a), a = 4 p q (p = 0.975,
q = 0.025).
"""

import math

import numpy as np
import pytest

from benchmarks import quality_stats

P, Q = 0.975, 0.025
T_975 = {
    1: math.tan(math.pi * (P - 0.5)),  # 12.7062...
    2: (P - Q) / math.sqrt(2 * P * Q),  # 4.3027...
    4: 2 * math.sqrt(math.cos(math.acos(math.sqrt(4 * P * Q)) / 3) / math.sqrt(4 * P * Q) - 1),
}


@pytest.mark.parametrize(
    "a, b, diff, se, df",
    [
        # var(a) = 2 over 2 seeds, b constant: se = 1, df = 1.
        ([1.0, 3.0], [0.0, 0.0, 0.0], 2.0, 1.0, 1),
        # Equal variances (2) over 2 seeds each: se = sqrt(1 + 1), df = 2.
        ([1.0, 3.0], [4.0, 6.0], -3.0, math.sqrt(2.0), 2),
        # Equal variances (1) over 3 seeds each: se = sqrt(1/3 + 1/3), df = 4.
        ([1.0, 2.0, 3.0], [5.0, 6.0, 7.0], -4.0, math.sqrt(2.0 / 3.0), 4),
    ],
)
def test_welch_interval_by_hand(a, b, diff, se, df):
    got = quality_stats.welch_interval(a, b)
    half = T_975[df] * se
    assert got["diff"] == pytest.approx(diff, abs=1e-12)
    assert got["df"] == pytest.approx(df, rel=1e-9)
    assert got["low"] == pytest.approx(diff - half, rel=1e-9)
    assert got["high"] == pytest.approx(diff + half, rel=1e-9)


def test_welch_degrees_of_freedom_of_unequal_samples():
    # va = 1/3, vb = 2/2 = 1: df = (4/3)^2 / ((1/3)^2 / 2 + 1^2 / 1) = 32/19.
    got = quality_stats.welch_interval([1.0, 2.0, 3.0], [4.0, 6.0])
    assert got["df"] == pytest.approx(32 / 19, rel=1e-9)
    assert got["high"] - got["diff"] == pytest.approx(got["diff"] - got["low"], rel=1e-9)


def test_welch_interval_without_spread_or_seeds():
    one = quality_stats.welch_interval([70.0], [68.0, 69.0])
    assert one["diff"] == pytest.approx(1.5) and np.isnan(one["low"]) and np.isnan(one["high"])
    flat = quality_stats.welch_interval([2.0, 2.0], [1.0, 1.0, 1.0])
    assert (flat["diff"], flat["low"], flat["high"], flat["df"]) == (1.0, 1.0, 1.0, math.inf)
    diverged = quality_stats.welch_interval([float("nan"), 2.0], [1.0, 3.0])
    assert np.isnan(diverged["low"]) and np.isnan(diverged["high"])


def _run(total, tail, nc1=3.0, seconds=10.0):
    return {
        "map": {"total": total, "head": 80.0, "medium": 70.0, "tail": tail},
        "neural_collapse": {"nc1": nc1, "nc2": 0.1, "mean_angle": 92.0},
        "seconds": seconds,
    }


def test_summarise_by_hand():
    runs = [_run(70.0, 60.0, 2.0, 10.0), _run(72.0, 61.0, 4.0, 20.0), _run(74.0, 65.0, 6.0, 30.0)]
    s = quality_stats.summarise(runs)
    # total: mean 72, squared deviations 4 + 0 + 4 over 2: std 2; tail: mean 62, (4+1+9)/2 = 7.
    assert s["total"] == {"mean": pytest.approx(72.0), "std": pytest.approx(2.0)}
    assert s["tail"] == {"mean": pytest.approx(62.0), "std": pytest.approx(math.sqrt(7.0))}
    assert s["head"] == {"mean": pytest.approx(80.0), "std": 0.0}
    assert s["nc1"] == {"mean": pytest.approx(4.0), "std": pytest.approx(2.0)}
    assert (s["n_seeds"], s["seconds_per_run"]) == (3, pytest.approx(20.0))
    assert quality_stats.summarise([_run(70.0, 60.0)])["total"] == {"mean": 70.0, "std": 0.0}


def test_compare_takes_each_group_of_the_two_rows():
    runs = {"a": [_run(1.0, 4.0), _run(3.0, 6.0)], "b": [_run(0.0, 5.0), _run(0.0, 5.0)]}
    got = quality_stats.compare(runs, "a", "b")
    assert set(got) == {"total", "head", "medium", "tail"}
    assert got["total"]["high"] == pytest.approx(2.0 + T_975[1], rel=1e-9)
    assert got["tail"]["diff"] == pytest.approx(0.0) and got["head"]["df"] == math.inf


def test_a_diverged_run_never_wins_the_selection():
    assert quality_stats.val_total({"total": None}) == -1.0
    assert quality_stats.val_total({"total": float("nan")}) == -1.0
    assert quality_stats.val_total({"total": 12.5}) == 12.5
