"""Losses against independent float64 numpy references written here (loops welcome)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcnc_jax import losses

B, K, D, P = 7, 5, 6, 4


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _lse(v):
    m = np.max(v)
    return m + np.log(np.sum(np.exp(v - m)))


def _simplex_etf(k, d, seed=0):
    """[K, D] rows: unit norm, pairwise cosine -1/(K-1) (docs/method.md §1.3)."""
    p, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))
    m = np.sqrt(k / (k - 1)) * p @ (np.eye(k) - np.ones((k, k)) / k)
    return m.T


@pytest.fixture(params=["empty_sets", "full_sets"])
def batch(request):
    """Random logits/labels with the awkward cases every loss must survive.

    'empty_sets': class 0 and image 0 have no positive. 'full_sets': class 1 and
    image 1 have only positives (no negative). Both: some logits are +-50 on
    positives and negatives, and the last image is padding under ``mask``.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 2.0, (B, K))
    y = (rng.random((B, K)) < 0.4).astype(np.float64)
    if request.param == "empty_sets":
        y[:, 0] = 0.0
        y[0, :] = 0.0
    else:
        y[:, 1] = 1.0
        y[1, :] = 1.0
    y[2, 2], y[3, 2] = 1.0, 0.0
    x[2, 2], x[3, 2] = 50.0, 50.0  # an easy positive, a very hard negative
    x[4, 3], x[5, 4] = -50.0, -50.0
    y[4, 3], y[5, 4] = 1.0, 0.0  # a very hard positive, an easy negative
    mask = np.ones(B, bool)
    mask[-1] = False
    return x.astype(np.float32), y.astype(np.float32), mask


# ---------------------------------------------------------------- references


def ref_two_way(x, y, tp, tn):
    def term(sets):
        vals = []
        for xs, ys in sets:
            pos, neg = xs[ys > 0.5], xs[ys <= 0.5]
            if pos.size == 0:
                continue
            if neg.size == 0:
                vals.append(0.0)  # softplus(-inf)
                continue
            vals.append(_softplus(tn * _lse(neg / tn) + tp * _lse(-pos / tp)))
        return np.mean(vals) if vals else 0.0

    b, k = x.shape
    return term([(x[:, c], y[:, c]) for c in range(k)]) + term([(x[i], y[i]) for i in range(b)])


def ref_fla(f, emb, y, eps=1e-6):
    b, k, _ = f.shape
    total = 0.0
    for i in range(b):
        for c in range(k):
            s = f[i, c] @ emb[c] / (np.linalg.norm(f[i, c]) * np.linalg.norm(emb[c]))
            if y[i, c] > 0.5:
                total -= math.log((1 + s) / 2 + eps)
            else:
                total -= math.log(1 - (k - 1) / k * abs(1 / (k - 1) + s) + eps)
    return total / (b * k)


def ref_fpc(z, m, y, tau, valid):
    b, k, _ = z.shape
    vals = []
    ks = [j for j in range(k) if valid[j]]
    for i in range(b):
        for c in range(k):
            if y[i, c] <= 0.5 or not valid[c]:
                continue
            cos = {j: z[i, c] @ m[j] / (np.linalg.norm(z[i, c]) * np.linalg.norm(m[j])) for j in ks}
            logits = np.array([cos[j] / tau for j in ks])
            vals.append(_lse(logits) - cos[c] / tau)
    return np.mean(vals) if vals else 0.0


def ref_bce(x, y):
    return np.mean(-(y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x)))


def ref_focal(x, y, gamma):
    p = _sigmoid(x)
    pos = (1 - p) ** gamma * _log_sigmoid(x)
    neg = p**gamma * _log_sigmoid(-x)
    return np.mean(-(y * pos + (1 - y) * neg))


def ref_asl(x, y, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
    """Ridnik et al.'s AsymmetricLoss.forward, in numpy, divided by B*K."""
    xs_pos = _sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip > 0:
        xs_neg = np.minimum(xs_neg + clip, 1.0)
    loss = y * np.log(np.maximum(xs_pos, eps)) + (1 - y) * np.log(np.maximum(xs_neg, eps))
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * (1 - pt) ** (gamma_pos * y + gamma_neg * (1 - y))
    return -loss.sum() / loss.size


def ref_db(x, y, freq, n, focal=True, gamma=2.0, ma=0.1, mb=10.0, mg=0.2, lam=2.0, kappa=0.05):
    """The authors' ResampleLoss (rebalance + logit_reg + focal), in numpy, without
    its constant balance_param factor, mean over entries."""
    freq_inv = 1.0 / freq
    with np.errstate(divide="ignore"):
        repeat = (y * freq_inv).sum(1, keepdims=True)
        w = _sigmoid(mb * (freq_inv[None] / repeat - mg)) + ma
    z = x + (-np.log(n / freq - 1) * kappa / lam)
    z = z * (1 - y) * lam + z * y
    w = w / lam * (1 - y) + w * y
    bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))  # torch's formula
    loss = w * bce
    if focal:
        loss = (1 - np.exp(-bce)) ** gamma * loss
    return loss.mean()


# -------------------------------------------------------------- comparisons

F64 = np.float64


def _loss_cases():
    """(name, jax fn(x, y, mask), numpy reference(x, y)) for the logit losses."""
    freq = np.array([3, 40, 7, 120, 15], np.float64)
    n = 300
    return [
        (
            "two_way",
            lambda x, y, m: losses.two_way_loss(x, y, mask=m),
            lambda x, y: ref_two_way(x, y, 4.0, 1.0),
        ),
        (
            "two_way_t",
            lambda x, y, m: losses.two_way_loss(x, y, tp=2.0, tn=0.5, mask=m),
            lambda x, y: ref_two_way(x, y, 2.0, 0.5),
        ),
        ("bce", lambda x, y, m: losses.bce_loss(x, y, mask=m), ref_bce),
        (
            "focal",
            lambda x, y, m: losses.focal_loss(x, y, mask=m),
            lambda x, y: ref_focal(x, y, 2.0),
        ),
        ("asl", lambda x, y, m: losses.asymmetric_loss(x, y, mask=m), ref_asl),
        (
            "asl_noclip",
            lambda x, y, m: losses.asymmetric_loss(
                x, y, gamma_neg=2.0, gamma_pos=1.0, clip=0.0, mask=m
            ),
            lambda x, y: ref_asl(x, y, 2.0, 1.0, 0.0),
        ),
        (
            "db",
            lambda x, y, m: losses.distribution_balanced_loss(x, y, freq, n, mask=m),
            lambda x, y: ref_db(x, y, freq, n),
        ),
        (
            "db_nofocal",
            lambda x, y, m: losses.distribution_balanced_loss(x, y, freq, n, focal=False, mask=m),
            lambda x, y: ref_db(x, y, freq, n, focal=False),
        ),
    ]


CASES = _loss_cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,fn,ref", CASES, ids=IDS)
def test_logit_losses_match_reference(batch, name, fn, ref):
    x, y, _ = batch
    got = jax.jit(lambda a, b: fn(a, b, None))(x, y)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref(x.astype(F64), y.astype(F64)), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name,fn,ref", CASES, ids=IDS)
def test_logit_losses_mask_equals_dropping_images(batch, name, fn, ref):
    x, y, mask = batch
    got = fn(x, y, jnp.asarray(mask))
    expected = ref(x[mask].astype(F64), y[mask].astype(F64))
    np.testing.assert_allclose(float(got), expected, rtol=2e-5, atol=1e-6)
    # Padding rows get no gradient, whatever their content.
    g = jax.grad(lambda a: fn(a, y, jnp.asarray(mask)))(x)
    assert np.all(np.asarray(g)[~mask] == 0)


@pytest.mark.parametrize("name,fn,ref", CASES, ids=IDS)
def test_logit_losses_finite_gradients_at_extremes(batch, name, fn, ref):
    x, y, mask = batch
    x = x.copy()
    x[::2] = 50.0
    x[1::2] = -50.0
    for m in (None, jnp.asarray(mask)):
        value, g = jax.value_and_grad(lambda a, m=m: fn(a, y, m))(x)
        assert np.isfinite(float(value))
        assert np.all(np.isfinite(np.asarray(g))), name
    np.testing.assert_allclose(
        float(fn(x, y, None)), ref(x.astype(F64), y.astype(F64)), rtol=2e-5, atol=1e-6
    )


@pytest.mark.parametrize("name,fn,ref", CASES, ids=IDS)
def test_logit_losses_accept_bfloat16(batch, name, fn, ref):
    x, y, _ = batch
    xb = jnp.asarray(x, jnp.bfloat16)
    got = fn(xb, jnp.asarray(y, jnp.bfloat16), None)
    assert got.dtype == jnp.float32
    expected = ref(np.asarray(xb.astype(jnp.float32), F64), y.astype(F64))
    np.testing.assert_allclose(float(got), expected, rtol=2e-5, atol=1e-6)


def test_two_way_hand_computed():
    a, b, c, d = 2.0, -1.0, 0.0, 1.0
    x = np.array([[a, b], [c, d]], np.float32)
    y = np.array([[1, 0], [0, 1]], np.float32)

    def sp(v):
        return math.log1p(math.exp(v))

    # One positive and one negative per set: Tp*lse(-p/Tp) = -p, Tn*lse(n/Tn) = n.
    expected = (sp(c - a) + sp(b - d)) / 2 + (sp(b - a) + sp(c - d)) / 2
    np.testing.assert_allclose(float(losses.two_way_loss(x, y)), expected, rtol=1e-6)


def test_two_way_empty_sets():
    # No positive anywhere: both means are over empty sets, hence 0.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
    assert float(losses.two_way_loss(x, jnp.zeros((3, 4)))) == 0.0
    # All positive: every set lacks negatives -> softplus(-inf) = 0.
    assert float(losses.two_way_loss(x, jnp.ones((3, 4)))) == 0.0
    assert float(losses.two_way_loss(x, jnp.ones((3, 4)), mask=jnp.zeros(3, bool))) == 0.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        losses.bce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="mask"):
        losses.two_way_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="class_freq"):
        losses.distribution_balanced_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), np.ones(4), 10)
    with pytest.raises(ValueError, match="1..num_train-1"):
        losses.distribution_balanced_loss(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), np.array([0, 1, 2]), 10
        )


def test_db_traced_class_freq_under_jit(batch):
    x, y, _ = batch
    freq = np.array([3, 40, 7, 120, 15], np.float32)
    got = jax.jit(losses.distribution_balanced_loss, static_argnums=3)(x, y, freq, 300)
    np.testing.assert_allclose(
        float(got), ref_db(x.astype(F64), y.astype(F64), freq.astype(F64), 300), rtol=2e-5
    )


# ----------------------------------------------------------------------- FLA


def test_fla_matches_reference_and_mask(batch):
    _, y, mask = batch
    rng = np.random.default_rng(2)
    f = rng.normal(size=(B, K, D)).astype(np.float32)
    emb = _simplex_etf(K, D).astype(np.float32)
    got = jax.jit(losses.alignment_loss)(f, emb, y)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), ref_fla(f.astype(F64), emb.astype(F64), y), rtol=1e-5)
    masked = losses.alignment_loss(f, emb, y, mask=jnp.asarray(mask))
    np.testing.assert_allclose(
        float(masked), ref_fla(f[mask].astype(F64), emb.astype(F64), y[mask]), rtol=1e-5
    )
    g = jax.grad(lambda a: losses.alignment_loss(a, emb, y, mask=jnp.asarray(mask)))(f)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[~mask] == 0)
    # bfloat16 features, float32 result.
    fb = jnp.asarray(f, jnp.bfloat16)
    got_b = losses.alignment_loss(fb, emb, y)
    assert got_b.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got_b), ref_fla(np.asarray(fb.astype(jnp.float32), F64), emb, y), rtol=1e-4
    )


def test_fla_hand_computed_and_degenerate_features():
    emb = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)  # K = 2 ETF: cosine -1
    y = np.array([[1.0, 0.0]], np.float32)
    f = np.array([[[0.0, 1.0], [1.0, 0.0]]], np.float32)  # s = 0 (positive), s = -1 (negative)
    eps = 1e-6
    expected = -(math.log(0.5 + eps) + math.log(1.0 + eps)) / 2
    np.testing.assert_allclose(float(losses.alignment_loss(f, emb, y)), expected, rtol=1e-6)
    # Positives exactly on their label vector (any scale) and negatives at the ETF
    # angle give the optimum -log(1 + eps) ~ 0.
    f2 = np.array([[[3.0, 0.0], [1.0, 0.0]]], np.float32)
    np.testing.assert_allclose(
        float(losses.alignment_loss(f2, emb, y)), -math.log1p(eps), atol=1e-7
    )
    # A zero feature has cosine 0, not NaN, and a finite gradient.
    f0 = np.zeros((1, 2, 2), np.float32)
    v, g = jax.value_and_grad(lambda a: losses.alignment_loss(a, emb, y))(f0)
    assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))


def test_fla_minimised_by_etf_arrangement():
    k, d, b = 6, 10, 5
    emb = _simplex_etf(k, d, seed=3)
    rng = np.random.default_rng(3)
    y = (rng.random((b, k)) < 0.4).astype(np.float32)
    # Positives on their own label vector, negatives on another class's vector
    # (cosine -1/(K-1) with their own): the ETF arrangement.
    f = np.empty((b, k, d))
    for i in range(b):
        for c in range(k):
            f[i, c] = emb[c] if y[i, c] else emb[(c + 1) % k]
    f *= rng.uniform(0.5, 2.0, (b, k, 1))
    emb32 = emb.astype(np.float32)
    best = float(losses.alignment_loss(f.astype(np.float32), emb32, y))
    # -log(1 + eps) is a lower bound of every entry.
    np.testing.assert_allclose(best, -math.log1p(1e-6), atol=1e-6)
    for scale in (0.01, 0.1, 1.0):
        noisy = f + scale * rng.normal(size=f.shape)
        assert float(losses.alignment_loss(noisy.astype(np.float32), emb32, y)) > best + 1e-6


# ----------------------------------------------------------------------- FPC


def test_fpc_matches_reference(batch):
    _, y, mask = batch
    rng = np.random.default_rng(4)
    z = rng.normal(size=(B, K, P))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    m = rng.normal(size=(K, P))
    valid = np.array([True, True, False, True, True])
    for tau in (0.5, 0.1):
        got = jax.jit(losses.calibration_loss, static_argnames="tau")(
            z.astype(np.float32), m.astype(np.float32), y, tau=tau, valid=valid
        )
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), ref_fpc(z, m, y, tau, valid), rtol=1e-5)
    got = losses.calibration_loss(
        z.astype(np.float32), m.astype(np.float32), y, valid=valid, mask=jnp.asarray(mask)
    )
    np.testing.assert_allclose(float(got), ref_fpc(z[mask], m, y[mask], 0.5, valid), rtol=1e-5)
    # valid=None means every class has a prototype.
    got = losses.calibration_loss(z.astype(np.float32), m.astype(np.float32), y)
    np.testing.assert_allclose(float(got), ref_fpc(z, m, y, 0.5, np.ones(K, bool)), rtol=1e-5)


def test_fpc_gradients_and_empty_cases(batch):
    _, y, mask = batch
    rng = np.random.default_rng(5)
    z = jnp.asarray(rng.normal(size=(B, K, P)), jnp.float32)
    m = jnp.asarray(rng.normal(size=(K, P)), jnp.float32)
    m = m.at[2].set(0.0)  # a class without prototype has a zero row
    valid = jnp.asarray([True, True, False, True, True])
    gz, gm = jax.grad(
        lambda a, p: losses.calibration_loss(a, p, y, valid=valid, mask=jnp.asarray(mask)),
        argnums=(0, 1),
    )(z, m)
    assert np.all(np.isfinite(np.asarray(gz)))
    assert np.all(np.asarray(gm) == 0)  # prototypes carry no gradient
    assert np.all(np.asarray(gz)[~mask] == 0)
    # No valid prototype, or no positive pair: exactly 0 with zero gradient.
    none = jnp.zeros(K, bool)
    v, g = jax.value_and_grad(
        lambda a: losses.calibration_loss(a, jnp.zeros((K, P)), y, valid=none)
    )(z)
    assert float(v) == 0.0 and np.all(np.asarray(g) == 0)
    assert float(losses.calibration_loss(z, m, jnp.zeros((B, K)), valid=valid)) == 0.0
    # Perfect calibration at low temperature: each z on its own prototype.
    protos = _simplex_etf(K, K, seed=6)
    zz = np.broadcast_to(protos, (B, K, K)).astype(np.float32)
    assert float(losses.calibration_loss(zz, protos.astype(np.float32), y, tau=0.01)) < 1e-6
