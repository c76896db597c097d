"""Evaluation metrics (numpy): average precision, long-tailed mAP, neural collapse."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mlcnc_jax.groups import GROUPS


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray, name: str) -> None:
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(
            f"{name}: scores and labels must both be [N, K] with the same shape, got "
            f"{scores.shape} and {labels.shape}."
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name}: scores contain NaN or inf; check the model outputs.")


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class average precision.

    For class k, images are ranked by descending score; AP is the mean over the
    positives of the precision at the positive's rank. Tied scores are ranked in
    input order (a stable sort), so ties are broken arbitrarily but reproducibly.

    Args:
      scores: [N, K] scores (any monotone scale: logits or probabilities).
      labels: [N, K] labels; entries > 0.5 are positive.

    Returns:
      [K] float64 AP in [0, 1]; NaN for a class without any positive.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    _check_scores_labels(scores, labels, "average_precision")
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    hits = np.take_along_axis(labels > 0.5, order, axis=0).astype(np.float64)
    precision = np.cumsum(hits, axis=0) / np.arange(1, n + 1, dtype=np.float64)[:, None]
    num_pos = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * hits).sum(axis=0) / num_pos
    return np.where(num_pos > 0, ap, np.nan)


def lt_map(
    scores: np.ndarray, labels: np.ndarray, class_split: Mapping[str, Sequence[int]]
) -> dict[str, float]:
    """mAP over all classes and over the head, medium and tail classes, in percent.

    Classes without a positive (NaN AP) are left out of every mean; a group with no
    class left gives NaN.

    Args:
      scores: [N, K] scores.
      labels: [N, K] labels.
      class_split: {'head': [...], 'medium': [...], 'tail': [...]} class indices.

    Returns:
      {'total', 'head', 'medium', 'tail'}: mAP in percent.
    """
    missing = [g for g in GROUPS if g not in class_split]
    if missing:
        raise ValueError(
            f"lt_map: class_split lacks {missing}; it needs the keys {GROUPS} "
            "(lists of class indices)."
        )
    ap = average_precision(scores, labels)
    k = ap.shape[0]

    def mean_percent(idx: np.ndarray) -> float:
        values = ap[idx]
        values = values[~np.isnan(values)]
        return float(100.0 * values.mean()) if values.size else float("nan")

    out = {"total": mean_percent(np.arange(k))}
    for group in GROUPS:
        idx = np.asarray(list(class_split[group]), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= k):
            raise ValueError(
                f"lt_map: class_split[{group!r}] holds indices outside 0..{k - 1}: {idx.tolist()}."
            )
        out[group] = mean_percent(idx)
    return out


def neural_collapse(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Neural-collapse measures (Papyan et al. 2020) of class features.

    The samples of class c are the features of the images labelled c: ``features``
    [N, D] gives one feature per image (an image counts for each of its classes),
    ``features`` [N, K, D] gives one per image and class (the class-c sample of
    image b is features[b, c]). Classes with fewer than 2 samples are skipped; K
    below is the number of classes kept.

    - ``nc1`` = tr(S_W S_B^+) / K: within-class variability relative to the
      between-class one. S_W is the class-balanced within-class covariance (mean
      over classes of each class's covariance, so head classes do not dominate);
      S_B the covariance of the class means around their mean (the global mean is
      the mean of the class means, again class-balanced).
    - ``nc2``: mean absolute deviation of the pairwise cosines of the centred class
      means from the simplex-ETF value -1/(K-1). (The standard deviation would not
      notice cosines that are equal to one another but not to -1/(K-1).)
    - ``mean_angle``: mean pairwise angle between the centred class means, degrees.
    - ``etf_angle``: the simplex-ETF angle arccos(-1/(K-1)), degrees.

    All values are NaN when fewer than 2 classes are kept.

    Args:
      features: [N, D] or [N, K, D] features.
      labels: [N, K] labels; entries > 0.5 are positive.

    Returns:
      {'nc1', 'nc2', 'mean_angle', 'etf_angle'} floats.
    """
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels) > 0.5
    if labels.ndim != 2:
        raise ValueError(f"neural_collapse: labels must be [N, K], got {labels.shape}.")
    n, k = labels.shape
    if features.ndim == 2 and features.shape[0] == n:
        per_class = False
    elif features.ndim == 3 and features.shape[:2] == (n, k):
        per_class = True
    else:
        raise ValueError(
            f"neural_collapse: features must be [N, D] or [N, K, D] with N={n}, K={k} "
            f"(from labels), got {features.shape}."
        )
    nan = float("nan")
    counts = labels.sum(axis=0)
    kept = counts >= 2
    num_kept = int(kept.sum())
    if num_kept < 2:
        return {"nc1": nan, "nc2": nan, "mean_angle": nan, "etf_angle": nan}
    y = labels[:, kept].astype(np.float64)  # [N, K']
    counts = counts[kept].astype(np.float64)
    if per_class:
        features = features[:, kept]  # [N, K', D]
        means = np.einsum("nk,nkd->kd", y, features) / counts[:, None]
    else:
        means = (y.T @ features) / counts[:, None]
    global_mean = means.mean(axis=0)
    centred = means - global_mean

    # S_B = centred^T centred / K' has rank <= K'-1: work in the span of its
    # eigenvectors (from the SVD of the centred means) instead of with [D, D]
    # matrices, so large D costs nothing.
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    eig_b = sing**2 / num_kept
    tol = eig_b.max() * max(centred.shape) * np.finfo(np.float64).eps
    basis = vt[eig_b > tol]  # [r, D]
    inv_eig = 1.0 / eig_b[eig_b > tol]
    mproj = centred @ basis.T  # [K', r]
    if per_class:
        dev = np.einsum("nkd,rd->nkr", features - global_mean, basis) - mproj[None]
        within = np.einsum("nk,nkr->kr", y, dev**2) / counts[:, None]
    else:
        # Centring first keeps the difference below from cancelling badly.
        proj = (features - global_mean) @ basis.T  # [N, r]
        # mean over class-k samples of (proj - m_k)^2 = E[proj^2] - m_k^2, per direction
        # (an [N, K', r] array of deviations would be too large for COCO-sized sets).
        within = (y.T @ proj**2) / counts[:, None] - mproj**2
    # u_r^T S_W u_r, with S_W the mean over classes of each class's covariance.
    sw_diag = np.maximum(within, 0.0).mean(axis=0)
    nc1 = float(np.sum(sw_diag * inv_eig) / num_kept)

    norms = np.linalg.norm(centred, axis=1)
    unit = centred / np.maximum(norms, 1e-300)[:, None]
    cos = unit @ unit.T
    iu = np.triu_indices(num_kept, k=1)
    pair_cos = np.clip(cos[iu], -1.0, 1.0)
    etf_cos = -1.0 / (num_kept - 1)
    return {
        "nc1": nc1,
        "nc2": float(np.mean(np.abs(pair_cos - etf_cos))),
        "mean_angle": float(np.degrees(np.arccos(pair_cos)).mean()),
        "etf_angle": float(np.degrees(np.arccos(etf_cos))),
    }
