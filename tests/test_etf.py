"""Tests of the simplex ETF construction."""

import numpy as np
import pytest

from mlcnc_jax.etf import simplex_etf


@pytest.mark.parametrize(("k", "dim"), [(2, 2), (5, 8), (20, 768), (80, 1600)])
def test_unit_norms_and_equal_angles(k, dim):
    m = simplex_etf(k, dim)
    assert m.shape == (dim, k)
    assert m.dtype == np.float32
    m64 = m.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(m64, axis=0), 1.0, atol=1e-5)
    gram = m64.T @ m64
    off_diag = gram[~np.eye(k, dtype=bool)]
    np.testing.assert_allclose(off_diag, -1.0 / (k - 1), atol=1e-5)


def test_columns_sum_to_zero_and_span_k_minus_1_dims():
    # A simplex ETF is centred: its K vectors span exactly K-1 dimensions.
    m = simplex_etf(6, 10).astype(np.float64)
    np.testing.assert_allclose(m.sum(axis=1), 0.0, atol=1e-6)
    assert np.linalg.matrix_rank(m, tol=1e-5) == 5


def test_matches_formula_with_positive_r_diagonal():
    # Independent reconstruction: Gram-Schmidt of the same draw gives the unique Q
    # with a positive R diagonal.
    k, dim, seed = 4, 7, 3
    a = np.random.default_rng(seed).standard_normal((dim, k))
    q = np.zeros_like(a)
    for j in range(k):
        v = a[:, j] - q[:, :j] @ (q[:, :j].T @ a[:, j])
        q[:, j] = v / np.linalg.norm(v)
    expected = np.sqrt(k / (k - 1)) * q @ (np.eye(k) - np.full((k, k), 1.0 / k))
    np.testing.assert_allclose(simplex_etf(k, dim, seed), expected, atol=1e-6)


def test_same_seed_same_bytes_other_seed_differs():
    a = simplex_etf(10, 32, seed=7)
    b = simplex_etf(10, 32, seed=7)
    assert a.tobytes() == b.tobytes()
    c = simplex_etf(10, 32, seed=8)
    assert np.abs(a - c).max() > 1e-2


@pytest.mark.parametrize(
    ("k", "dim", "match"),
    [
        (1, 8, "num_classes >= 2"),
        (0, 8, "num_classes >= 2"),
        (9, 8, "dim >= num_classes"),
    ],
)
def test_bad_arguments(k, dim, match):
    with pytest.raises(ValueError, match=match):
        simplex_etf(k, dim)
