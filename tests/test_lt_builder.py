"""Long-tailed split builder (Distribution-Balanced Loss protocol) and its command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats as scipy_stats

from mlcnc_jax.data import lt_builder
from mlcnc_jax.data.dataset import class_groups


def _labels(n=24000, k=20, seed=0):
    """One main class per image, uniformly, and a second class for 15% of the images."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, k), np.uint8)
    y[np.arange(n), rng.integers(0, k, n)] = 1
    extra = np.flatnonzero(rng.random(n) < 0.15)
    y[extra, rng.integers(0, k, len(extra))] = 1
    return y


def test_pareto_profile_matches_scipy():
    k, top, b = 20, 800, 6
    x = np.linspace(scipy_stats.pareto.ppf(0.0, b), scipy_stats.pareto.ppf(0.99, b), k)
    expected = (scipy_stats.pareto(b).pdf(x) * (top - 1) / b + 1).astype(int)
    np.testing.assert_array_equal(lt_builder.pareto_profile(k, top), expected)
    assert expected[0] == top and np.all(np.diff(expected) <= 0)


def test_co_occurrence_rank_matches_loop_reference():
    y = (np.random.default_rng(3).random((300, 7)) < [0.5, 0.1, 0.3, 0.05, 0.2, 0.4, 0.02]).astype(
        int
    )
    k = y.shape[1]
    score = np.zeros(k)
    for i in range(k):
        with_i = y[y[:, i] == 1]
        for j in range(k):
            score[j] += with_i[:, j].mean() if len(with_i) else 0.0  # P(j | i)
    np.testing.assert_array_equal(
        lt_builder.co_occurrence_rank(y), np.argsort(-score, kind="stable")
    )


def test_build_is_deterministic_and_long_tailed():
    y = _labels()
    a = lt_builder.build_long_tail(y, 800, seed=0)
    np.testing.assert_array_equal(a, lt_builder.build_long_tail(y, 800, seed=0))
    assert not np.array_equal(a, lt_builder.build_long_tail(y, 800, seed=1))
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < len(y)

    freq = y[a].sum(axis=0)
    rank = lt_builder.co_occurrence_rank(y)
    profile = lt_builder.pareto_profile(20, 800)
    # Low co-occurrence: every class ends near its target in the reference profile...
    assert np.all(np.abs(freq[rank] - profile) <= 0.1 * profile)
    # ...the last class is processed last, so it hits its target exactly...
    assert freq[rank[-1]] == profile[-1]
    # ...and the groups are those of VOC-LT's profile.
    groups = class_groups(freq)
    assert [len(groups[g]) for g in ("head", "medium", "tail")] == [6, 6, 8]


def test_class_with_too_few_images_keeps_all():
    y = _labels(n=4000)
    rank = lt_builder.co_occurrence_rank(y)
    chosen = lt_builder.build_long_tail(y, 800, seed=0)
    top = rank[0]  # wants 800 but has about 230
    assert y[chosen, top].sum() <= y[:, top].sum() < 800


def test_bad_input():
    with pytest.raises(ValueError, match="max_count"):
        lt_builder.build_long_tail(np.ones((3, 2)), 0)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        lt_builder.build_long_tail(np.ones(3), 5)


def test_cli_writes_json_and_png(tmp_path, capsys):
    y = _labels(n=6000, k=12, seed=2)
    np.save(tmp_path / "labels.npy", y)
    out = tmp_path / "out" / "lt.json"
    record = lt_builder.main(
        [
            "--labels",
            str(tmp_path / "labels.npy"),
            "--max_count",
            "300",
            "--seed",
            "4",
            "--output",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record))
    chosen = lt_builder.build_long_tail(y, 300, seed=4)
    assert saved["train_image_ids"] == chosen.tolist()
    assert saved["class_freq"] == y[chosen].sum(axis=0).tolist()
    rows = [np.flatnonzero(y[i]).tolist() for i in chosen]
    assert saved["train_labels"] == rows
    assert saved["class_split"] == class_groups(y[chosen].sum(axis=0))
    assert Image.open(tmp_path / "out" / "lt.png").size[0] > 100
    printed = capsys.readouterr().out
    assert f"selected {len(chosen)} of 6000 images" in printed and "class_11" in printed


def test_cli_module_on_csv(tmp_path):
    rows = ["image,labels"] + [
        f"img/{i}.jpg,{'a b' if i % 5 == 0 else 'a' if i % 2 else 'c'}" for i in range(200)
    ]
    (tmp_path / "all.csv").write_text("\n".join(rows))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlcnc_jax.data.lt_builder",
            "--labels",
            str(tmp_path / "all.csv"),
            "--max_count",
            "60",
            "--output",
            str(tmp_path / "lt.json"),
            "--plot",
            str(tmp_path / "h.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "lt.json").read_text())
    assert saved["class_names"] == ["a", "b", "c"]
    assert all(i.startswith(str(tmp_path / "img")) for i in saved["train_image_ids"])
    assert (tmp_path / "h.png").stat().st_size > 0 and "head (" in result.stdout
