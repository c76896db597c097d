"""Simplex equiangular tight frames (ETF), the fixed geometry of MLC-NC.

A simplex ETF of K vectors in `dim` dimensions has unit-norm vectors whose pairwise
cosines all equal -1/(K-1): the largest possible equal separation of K directions.
MLC-NC uses one as the fixed label embedding (K vectors in D dims) and one as the
binarized classifier (K vectors in K*p dims).
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
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, num_classes))
    q, r = np.linalg.qr(a)  # reduced QR: q [dim, K]
    # QR is unique only up to column signs; pinning diag(R) > 0 removes the
    # dependence on the LAPACK build.
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    p = q * signs[None, :]
    k = num_classes
    centering = np.eye(k) - np.ones((k, k)) / k
    m = np.sqrt(k / (k - 1)) * p @ centering
    return m.astype(np.float32)
