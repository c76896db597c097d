"""AP against scikit-learn, long-tailed grouping, neural-collapse measures."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlcnc_jax import metrics


def _simplex_etf(k, d, seed=0):
    """[K, D] rows: unit norm, pairwise cosine -1/(K-1) (docs/method.md §1.3)."""
    p, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))
    m = np.sqrt(k / (k - 1)) * p @ (np.eye(k) - np.ones((k, k)) / k)
    return m.T


def _random_task(n=200, k=7, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < rng.uniform(0.02, 0.5, k)).astype(np.int64)
    labels[:, 3] = 0  # a class without positive
    scores = rng.normal(size=(n, k)) + 1.5 * labels  # untied almost surely
    return scores, labels


def test_ap_matches_sklearn_on_untied_scores():
    scores, labels = _random_task()
    ap = metrics.average_precision(scores, labels)
    assert ap.shape == (7,)
    assert np.isnan(ap[3])
    for c in range(7):
        if c == 3:
            continue
        np.testing.assert_allclose(
            ap[c], average_precision_score(labels[:, c], scores[:, c]), rtol=1e-12
        )


def test_ap_hand_computed():
    # Ranked: pos, neg, pos, neg -> precisions at positives 1/1 and 2/3.
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    labels = np.array([[1], [0], [1], [0]])
    np.testing.assert_allclose(metrics.average_precision(scores, labels), [(1 + 2 / 3) / 2])


def test_lt_map_groups():
    scores, labels = _random_task()
    ap = np.array(
        [
            average_precision_score(labels[:, c], scores[:, c]) if labels[:, c].any() else np.nan
            for c in range(7)
        ]
    )
    split = {"head": [0, 1], "medium": [2, 3, 4], "tail": [5, 6]}
    out = metrics.lt_map(scores, labels, split)
    assert set(out) == {"total", "head", "medium", "tail"}
    np.testing.assert_allclose(out["total"], 100 * np.mean(ap[[0, 1, 2, 4, 5, 6]]))
    np.testing.assert_allclose(out["head"], 100 * np.mean(ap[[0, 1]]))
    np.testing.assert_allclose(out["medium"], 100 * np.mean(ap[[2, 4]]))  # class 3 has no positive
    np.testing.assert_allclose(out["tail"], 100 * np.mean(ap[[5, 6]]))
    # A group that is empty, or holds only classes without positives, gives NaN.
    out = metrics.lt_map(scores, labels, {"head": [0, 1, 2, 4, 5, 6], "medium": [], "tail": [3]})
    assert math.isnan(out["medium"]) and math.isnan(out["tail"])


def test_metric_input_errors():
    scores, labels = _random_task()
    with pytest.raises(ValueError, match="same shape"):
        metrics.average_precision(scores[:, :3], labels)
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.average_precision(bad, labels)
    with pytest.raises(ValueError, match="lacks"):
        metrics.lt_map(scores, labels, {"head": [0]})
    with pytest.raises(ValueError, match="outside"):
        metrics.lt_map(scores, labels, {"head": [9], "medium": [], "tail": []})
    with pytest.raises(ValueError, match="features"):
        metrics.neural_collapse(np.zeros((5, 2, 3)), np.zeros((5, 4)))


# ------------------------------------------------------------ neural collapse


def ref_nc1(features, labels):
    """tr(S_W S_B^+)/K with full [D, D] matrices and np.linalg.pinv."""
    labels = labels > 0.5
    keep = [c for c in range(labels.shape[1]) if labels[:, c].sum() >= 2]
    samples = []
    for c in keep:
        rows = np.flatnonzero(labels[:, c])
        samples.append(features[rows, c] if features.ndim == 3 else features[rows])
    means = np.array([s.mean(0) for s in samples])
    mu_g = means.mean(0)
    d = features.shape[-1]
    sw = np.zeros((d, d))
    for s, m in zip(samples, means, strict=True):
        sw += (s - m).T @ (s - m) / len(s)
    sw /= len(keep)
    sb = (means - mu_g).T @ (means - mu_g) / len(keep)
    return np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10)) / len(keep)


def _etf_arrangement(k=6, d=9, per_class=False, seed=0):
    """Every sample of class c sits exactly on its class mean; the means form an
    ETF around an arbitrary centre, at a common arbitrary scale."""
    rng = np.random.default_rng(seed)
    means = 2.5 * _simplex_etf(k, d, seed) + rng.normal(size=d)
    if per_class:
        labels = (rng.random((40, k)) < 0.4).astype(np.float32)
        feats = rng.normal(size=(40, k, d))  # negatives' entries are noise: ignored
        feats[labels > 0] = np.broadcast_to(means, (40, k, d))[labels > 0]
    else:
        cls = np.arange(40) % k
        labels = np.eye(k, dtype=np.float32)[cls]
        feats = means[cls]
    return feats, labels


@pytest.mark.parametrize("per_class", [False, True])
def test_nc_perfect_etf(per_class):
    feats, labels = _etf_arrangement(per_class=per_class)
    out = metrics.neural_collapse(feats, labels)
    assert set(out) == {"nc1", "nc2", "mean_angle", "etf_angle"}
    assert abs(out["nc1"]) < 1e-10
    assert out["nc2"] < 1e-10
    np.testing.assert_allclose(out["etf_angle"], math.degrees(math.acos(-1 / 5)))
    np.testing.assert_allclose(out["mean_angle"], out["etf_angle"], atol=1e-6)


@pytest.mark.parametrize("per_class", [False, True])
def test_nc_random_arrangement_against_reference(per_class):
    rng = np.random.default_rng(1)
    n, k, d = 120, 6, 10
    labels = (rng.random((n, k)) < 0.3).astype(np.float32)
    labels[:, 5] = 0.0
    labels[0, 5] = 1.0  # one sample only: skipped
    offsets = 2.0 * rng.normal(size=(k, d))  # class structure, far from collapse or an ETF
    if per_class:
        feats = rng.normal(size=(n, k, d)) + offsets[None]
    else:
        feats = rng.normal(size=(n, d)) + labels @ offsets
    out = metrics.neural_collapse(feats, labels)
    np.testing.assert_allclose(out["nc1"], ref_nc1(feats, labels), rtol=1e-8)
    assert out["nc1"] > 0.1
    assert out["nc2"] > 0.05
    np.testing.assert_allclose(out["etf_angle"], math.degrees(math.acos(-1 / 4)))  # 5 classes kept


def test_nc2_and_angle_hand_computed():
    # Class means on a square: centred cosines 0, -1, 0, 0, -1, 0 (angles 90 x4, 180 x2).
    square = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) + [5.0, -2.0]
    labels = np.repeat(np.eye(4), 3, axis=0)
    rng = np.random.default_rng(2)
    feats = np.repeat(square, 3, axis=0)
    noise = rng.normal(size=feats.shape) * 0.1
    noise -= np.repeat(noise.reshape(4, 3, 2).mean(1), 3, axis=0)  # keep the class means exact
    out = metrics.neural_collapse(feats + noise, labels)
    np.testing.assert_allclose(out["nc2"], (4 * (1 / 3) + 2 * (2 / 3)) / 6)
    np.testing.assert_allclose(out["mean_angle"], (4 * 90 + 2 * 180) / 6)
    np.testing.assert_allclose(out["nc1"], ref_nc1(feats + noise, labels), rtol=1e-8)
    assert out["nc1"] > 0


def test_nc_too_few_classes_gives_nan():
    labels = np.zeros((5, 3))
    labels[:, 0] = 1
    labels[0, 1] = 1
    out = metrics.neural_collapse(np.random.default_rng(0).normal(size=(5, 4)), labels)
    assert all(math.isnan(v) for v in out.values())
