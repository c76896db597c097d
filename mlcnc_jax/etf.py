"""Simplex equiangular tight frames (ETF), the fixed geometry of MLC-NC.

A simplex ETF of K vectors in `dim` dimensions has unit-norm vectors whose pairwise
cosines all equal -1/(K-1): the largest possible equal separation of K directions.
MLC-NC uses one as the fixed label embedding (K vectors in D dims) and one as the
binarized classifier (K vectors in K*p dims). `gram_frame` places any other K unit
vectors (e.g. class text embeddings) the same way, so that a classifier can take their
geometry instead of the ETF's.
"""

import numpy as np


def simplex_etf(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """Builds a simplex ETF with one column per class.

    M = sqrt(K / (K - 1)) * P (I_K - 11^T / K), where P [dim, K] has orthonormal
    columns from the QR decomposition of a standard-normal matrix drawn with
    `np.random.default_rng(seed)`. QR's sign ambiguity is fixed (R gets a positive
    diagonal) and the arithmetic is float64, so the same seed gives the same bytes
    on any machine.

    Args:
        num_classes: K, the number of vectors (>= 2).
        dim: dimension of each vector (>= K, so that K orthonormal columns exist).
        seed: seed of the random orthonormal basis.

    Returns:
        float32 array [dim, num_classes]; columns have unit norm and pairwise
        cosine -1/(K-1).

    Raises:
        ValueError: if num_classes < 2 or dim < num_classes.
    """
    if num_classes < 2:
        raise ValueError(f"simplex_etf needs num_classes >= 2, got {num_classes}.")
    if dim < num_classes:
        raise ValueError(
            f"simplex_etf needs dim >= num_classes (K orthonormal columns), got dim={dim} "
            f"< num_classes={num_classes}; use a larger embedding/projection dimension."
        )
    p = _orthonormal_basis(dim, num_classes, seed)
    k = num_classes
    centering = np.eye(k) - np.ones((k, k)) / k
    m = np.sqrt(k / (k - 1)) * p @ centering
    return m.astype(np.float32)


def _orthonormal_basis(dim: int, n: int, seed: int) -> np.ndarray:
    # [dim, n] orthonormal columns: QR of a seeded standard-normal matrix. QR is unique
    # only up to column signs; pinning diag(R) > 0 removes the dependence on the LAPACK
    # build.
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, n))
    q, r = np.linalg.qr(a)  # reduced QR: q [dim, n]
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs[None, :]


def gram_frame(vectors: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """K given vectors as the columns of a [dim, K] matrix with the same inner products.

    The rows of `vectors` [K, d] are written in an orthonormal basis of their span
    (r = min(K, d) coordinates each: R^T of the QR decomposition of vectors^T, so
    coords @ coords^T == vectors @ vectors^T), then placed in `dim` dimensions by the
    seeded random orthonormal basis that `simplex_etf` uses (the same basis when
    r = K). The result has the Gram matrix of `vectors` whatever d is: a classifier
    built from it has their geometry, as one built from `simplex_etf` has the ETF's.

    Args:
        vectors: [K, d] array, one vector per class (any d >= 1).
        dim: dimension of each output column (>= min(K, d)).
        seed: seed of the orthonormal placement.

    Returns:
        float32 array [dim, K] whose column inner products equal those of the rows of
        `vectors` (to float32 rounding).

    Raises:
        ValueError: if `vectors` is not 2-D or dim < min(K, d).
    """
    t = np.asarray(vectors, np.float64)
    if t.ndim != 2:
        raise ValueError(f"gram_frame needs a [K, d] array, got shape {t.shape}.")
    k, d = t.shape
    r = min(k, d)
    if dim < r:
        raise ValueError(f"gram_frame needs dim >= min(K, d) = {r}, got dim={dim}.")
    _, upper = np.linalg.qr(t.T)  # t^T = Q R, Q [d, r] orthonormal, R [r, K]
    coords = upper.T  # [K, r]: t = coords Q^T, so coords coords^T = t t^T
    return (_orthonormal_basis(dim, r, seed) @ coords.T).astype(np.float32)
