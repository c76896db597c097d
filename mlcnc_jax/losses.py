"""Loss functions of MLC-NC and the multi-label baselines it plugs into.

Every function is pure, jit-able and vectorised (no Python loop over images or
classes), accepts float32 or bfloat16 inputs (computation is always float32) and
returns a float32 scalar. Labels are float {0, 1} arrays of shape [B, K]; an entry
counts as positive when it is > 0.5.

Every function takes ``mask``: an optional [B] bool array that marks the real
images of a padded or partial batch. Masked-out images are removed from the loss
entirely: they contribute nothing and do not count in any normaliser, so a padded
batch gives the same value as the unpadded one.

Reductions (documented per function) are means; a mean over an empty set is 0
rather than NaN, so a batch without any usable entry contributes no gradient.

Logits are handled in log-sigmoid / softplus / log-sum-exp forms so that logits of
+-50 give finite values and finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The cosine of a zero vector is taken as 0 instead of NaN: norms are clamped here.
_NORM_EPS = 1e-12
# Stands in for -inf in masked soft-maxima, so that masked rows stay finite.
_MASKED_LOGIT = -1e9


def _check_pair(logits: Array, labels: Array, name: str) -> None:
    if logits.ndim != 2 or logits.shape != labels.shape:
        raise ValueError(
            f"{name}: logits and labels must both be [B, K] with the same shape, got "
            f"logits {logits.shape} and labels {labels.shape}."
        )


def _image_weights(mask: Array | None, batch: int, name: str) -> Array:
    """[B] float32 weights: 1 for real images, 0 for padding."""
    if mask is None:
        return jnp.ones((batch,), jnp.float32)
    if mask.shape != (batch,):
        raise ValueError(
            f"{name}: mask must be a [B] = [{batch}] bool array marking real images, "
            f"got shape {mask.shape}."
        )
    return mask.astype(jnp.float32)


def _safe_mean(total: Array, count: Array) -> Array:
    """total / count, and 0 where count is 0."""
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0).astype(jnp.float32)


def _mean_over_entries(per_entry: Array, weights: Array) -> Array:
    """Mean of a [B, K] array over the real images and all classes."""
    k = per_entry.shape[1]
    return _safe_mean(jnp.sum(per_entry * weights[:, None]), jnp.sum(weights) * k)


def _l2_normalize(x: Array, axis: int = -1) -> Array:
    # rsqrt(max(|x|^2, eps^2)) instead of x / |x|: finite value and gradient at x = 0.
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


def _masked_logsumexp(x: Array, where: Array, axis: int) -> tuple[Array, Array]:
    """log-sum-exp of x over the entries selected by ``where`` along ``axis``.

    Returns:
      (lse, has): ``has`` is True where at least one entry was selected; ``lse`` is
      the log-sum-exp there and 0 elsewhere (the caller decides what an empty set
      means). Values and gradients are finite for any finite x.
    """
    has = jnp.any(where, axis=axis)
    peak = jnp.max(jnp.where(where, x, -jnp.inf), axis=axis, keepdims=True)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    # Unselected entries are replaced by the peak before exp(): exp() of a large
    # unselected value would overflow and poison the gradient through jnp.where.
    shifted = jnp.where(where, x, peak) - peak
    total = jnp.sum(jnp.where(where, jnp.exp(shifted), 0.0), axis=axis)
    lse = jnp.log(jnp.where(has, total, 1.0)) + jnp.squeeze(peak, axis)
    return jnp.where(has, lse, 0.0), has


def _safe_pow(base: Array, exponent: Array | float) -> Array:
    """base ** exponent for base in [0, 1], with 0 ** 0 = 1 and a finite gradient."""
    exponent = jnp.asarray(exponent, jnp.float32)
    positive = base > 0
    powered = jnp.exp(exponent * jnp.log(jnp.where(positive, base, 1.0)))
    return jnp.where(positive, powered, jnp.where(exponent == 0, 1.0, 0.0))


def two_way_loss(
    logits: Array,
    labels: Array,
    tp: float = 4.0,
    tn: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """Two-way multi-label loss (Kobayashi, CVPR 2023).

    For a set S of (image, class) entries holding both positives P and negatives N,
    the term is softplus(Tn * logsumexp_N(x / Tn) + Tp * logsumexp_P(-x / Tp)): a
    soft version of "the hardest negative is below the hardest positive". It is
    applied class-wise (S = one column: the batch's images for class c) and
    sample-wise (S = one row: the classes of image b); the loss is the sum of the
    class-wise mean and the sample-wise mean.

    Empty sets follow Kobayashi's reference implementation: a class (image) with no
    positive is left out of its mean; a class (image) with positives but no
    negative contributes softplus(-inf) = 0 yet still counts in the denominator of
    its mean. If no class (image) has a positive, that mean is 0.

    Args:
      logits: [B, K] logits.
      labels: [B, K] float {0, 1} labels.
      tp: temperature of the positives.
      tn: temperature of the negatives.
      mask: optional [B] bool, False for padding images (removed from both terms).

    Returns:
      float32 scalar.
    """
    _check_pair(logits, labels, "two_way_loss")
    x = logits.astype(jnp.float32)
    real = _image_weights(mask, x.shape[0], "two_way_loss")[:, None] > 0
    is_pos = labels > 0.5
    pos = is_pos & real
    neg = ~is_pos & real

    def term(axis: int) -> Array:
        lse_pos, has_pos = _masked_logsumexp(-x / tp, pos, axis)
        lse_neg, has_neg = _masked_logsumexp(x / tn, neg, axis)
        # Without negatives the set's term is softplus(-inf) = 0.
        per_set = jnp.where(has_pos & has_neg, jax.nn.softplus(tn * lse_neg + tp * lse_pos), 0.0)
        return _safe_mean(jnp.sum(per_set), jnp.sum(has_pos.astype(jnp.float32)))

    return term(0) + term(1)


def alignment_loss(
    class_features: Array,
    label_embedding: Array,
    labels: Array,
    eps: float = 1e-6,
    mask: Array | None = None,
) -> Array:
    """Visual-semantic alignment loss (FLA) of MLC-NC.

    With s = cosine(F_{b,c}, l_c):
    -[y log((1 + s) / 2 + eps) + (1 - y) log(1 - (K-1)/K |1/(K-1) + s| + eps)],
    averaged over the real images and all classes. Positives are pulled to s = 1,
    negatives to the simplex-ETF cosine s = -1/(K-1); both optima give -log(1 + eps).

    Args:
      class_features: [B, K, D] class-wise features F.
      label_embedding: [K, D] ETF label embedding L.
      labels: [B, K] float {0, 1} labels.
      eps: inside the logarithms, as in docs/method.md (1e-6).
      mask: optional [B] bool, False for padding images.

    Returns:
      float32 scalar.
    """
    if class_features.ndim != 3 or label_embedding.ndim != 2:
        raise ValueError(
            "alignment_loss: class_features must be [B, K, D] and label_embedding [K, D], "
            f"got {class_features.shape} and {label_embedding.shape}."
        )
    b, k, d = class_features.shape
    if label_embedding.shape != (k, d) or labels.shape != (b, k):
        raise ValueError(
            f"alignment_loss: with class_features {class_features.shape}, label_embedding "
            f"must be {(k, d)} and labels {(b, k)}; got {label_embedding.shape} and "
            f"{labels.shape}."
        )
    if k < 2:
        raise ValueError(f"alignment_loss needs at least 2 classes (an ETF angle), got K={k}.")
    f = _l2_normalize(class_features.astype(jnp.float32))
    emb = _l2_normalize(label_embedding.astype(jnp.float32))
    # Rounding can push |s| just past 1, which would make the negative term's log
    # argument negative.
    s = jnp.clip(jnp.sum(f * emb[None], axis=-1), -1.0, 1.0)
    y = (labels > 0.5).astype(jnp.float32)
    pos_term = jnp.log((1.0 + s) / 2.0 + eps)
    neg_term = jnp.log(1.0 - (k - 1) / k * jnp.abs(1.0 / (k - 1) + s) + eps)
    per_entry = -(y * pos_term + (1.0 - y) * neg_term)
    return _mean_over_entries(per_entry, _image_weights(mask, b, "alignment_loss"))


def calibration_loss(
    projected: Array,
    prototypes: Array,
    labels: Array,
    tau: float = 0.5,
    valid: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """Collapse calibration loss (FPC) of MLC-NC.

    For each positive (image b, class c) with a prototype for c:
    -log softmax_k(cos(z_{b,c}, m_k) / tau)[c], the softmax running over the classes
    k that have a prototype; averaged over those positive pairs. Prototypes carry no
    gradient. The loss is 0 when no class has a prototype or no positive pair
    qualifies (e.g. before the first prototypes exist).

    Args:
      projected: [B, K, p] class-wise projections z (normalised again here).
      prototypes: [K, p] class prototypes m (any norm; cosines are used).
      labels: [B, K] float {0, 1} labels.
      tau: softmax temperature.
      valid: optional [K] bool, True for classes that have a prototype
        (None: all of them).
      mask: optional [B] bool, False for padding images.

    Returns:
      float32 scalar.
    """
    if projected.ndim != 3:
        raise ValueError(f"calibration_loss: projected must be [B, K, p], got {projected.shape}.")
    b, k, p = projected.shape
    if prototypes.shape != (k, p) or labels.shape != (b, k):
        raise ValueError(
            f"calibration_loss: with projected {projected.shape}, prototypes must be {(k, p)} "
            f"and labels {(b, k)}; got {prototypes.shape} and {labels.shape}."
        )
    if valid is None:
        valid = jnp.ones((k,), bool)
    elif valid.shape != (k,):
        raise ValueError(
            f"calibration_loss: valid must be a [K] = [{k}] bool array, got {valid.shape}."
        )
    valid = valid.astype(bool)
    z = _l2_normalize(projected.astype(jnp.float32))
    m = _l2_normalize(jax.lax.stop_gradient(prototypes).astype(jnp.float32))
    sims = jnp.einsum("bcp,kp->bck", z, m) / tau
    sims = jnp.where(valid[None, None, :], sims, _MASKED_LOGIT)
    own = jnp.diagonal(sims, axis1=1, axis2=2)  # [B, K]: cos(z_{b,c}, m_c) / tau
    per_pair = jax.nn.logsumexp(sims, axis=-1) - own
    weights = _image_weights(mask, b, "calibration_loss")
    counted = (labels > 0.5) & valid[None, :] & (weights[:, None] > 0)
    per_pair = jnp.where(counted, per_pair, 0.0)
    return _safe_mean(jnp.sum(per_pair), jnp.sum(counted.astype(jnp.float32)))


def bce_loss(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """Binary cross-entropy with logits, averaged over the real images and all classes.

    Args:
      logits: [B, K] logits.
      labels: [B, K] float {0, 1} labels.
      mask: optional [B] bool, False for padding images.

    Returns:
      float32 scalar.
    """
    _check_pair(logits, labels, "bce_loss")
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    per_entry = -(y * jax.nn.log_sigmoid(x) + (1.0 - y) * jax.nn.log_sigmoid(-x))
    return _mean_over_entries(per_entry, _image_weights(mask, x.shape[0], "bce_loss"))


def focal_loss(
    logits: Array, labels: Array, gamma: float = 2.0, mask: Array | None = None
) -> Array:
    """Sigmoid focal loss (Lin et al. 2017) without the alpha balance.

    -[y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p)] with p = sigmoid(x),
    averaged over the real images and all classes.

    Args:
      logits: [B, K] logits.
      labels: [B, K] float {0, 1} labels.
      gamma: focusing exponent.
      mask: optional [B] bool, False for padding images.

    Returns:
      float32 scalar.
    """
    _check_pair(logits, labels, "focal_loss")
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    # (1 - p)^gamma = exp(gamma * log_sigmoid(-x)): exact in the tails, unlike 1 - p.
    pos = jnp.exp(gamma * jax.nn.log_sigmoid(-x)) * jax.nn.log_sigmoid(x)
    neg = jnp.exp(gamma * jax.nn.log_sigmoid(x)) * jax.nn.log_sigmoid(-x)
    per_entry = -(y * pos + (1.0 - y) * neg)
    return _mean_over_entries(per_entry, _image_weights(mask, x.shape[0], "focal_loss"))


def asymmetric_loss(
    logits: Array,
    labels: Array,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    mask: Array | None = None,
) -> Array:
    """Asymmetric loss, ASL (Ridnik et al., ICCV 2021).

    With p = sigmoid(x) and the shifted negative probability p_m = max(p - clip, 0):
    positives give -(1 - p)^gamma_pos log(max(p, eps)), negatives give
    -p_m^gamma_neg log(max(1 - p_m, eps)), as in the authors' AsymmetricLoss.
    The focusing weights are differentiated through (the paper's formulation; the
    authors' optional ``disable_torch_grad_focal_loss`` is not reproduced).

    Reduction: the authors sum over the batch; here the sum is divided by the
    number of entries (mean over the real images and all classes), like the other
    losses of this module, so it is (B * K) times smaller than theirs.

    Args:
      logits: [B, K] logits.
      labels: [B, K] float {0, 1} labels.
      gamma_neg: focusing exponent of the negatives.
      gamma_pos: focusing exponent of the positives.
      clip: probability margin that shifts the negatives (0 disables it).
      eps: lower clamp of the probabilities inside the logarithms.
      mask: optional [B] bool, False for padding images.

    Returns:
      float32 scalar.
    """
    _check_pair(logits, labels, "asymmetric_loss")
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    log_eps = float(np.log(eps))
    log_p = jnp.maximum(jax.nn.log_sigmoid(x), log_eps)
    if clip > 0:
        # 1 - p_m = min(1 - p + clip, 1) >= clip > eps: no clamp needed.
        log_not_pm = jnp.log(jnp.minimum(jax.nn.sigmoid(-x) + clip, 1.0))
        p_m = jnp.maximum(jax.nn.sigmoid(x) - clip, 0.0)
    else:
        log_not_pm = jnp.maximum(jax.nn.log_sigmoid(-x), log_eps)
        p_m = jax.nn.sigmoid(x)
    pos = _safe_pow(jax.nn.sigmoid(-x), gamma_pos) * log_p
    neg = _safe_pow(p_m, gamma_neg) * log_not_pm
    per_entry = -(y * pos + (1.0 - y) * neg)
    return _mean_over_entries(per_entry, _image_weights(mask, x.shape[0], "asymmetric_loss"))


def _concrete_or_none(x: Array | np.ndarray) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def distribution_balanced_loss(
    logits: Array,
    labels: Array,
    class_freq: Array,
    num_train: int,
    *,
    focal: bool = True,
    gamma: float = 2.0,
    map_alpha: float = 0.1,
    map_beta: float = 10.0,
    map_gamma: float = 0.2,
    neg_scale: float = 2.0,
    init_bias: float = 0.05,
    mask: Array | None = None,
) -> Array:
    """Distribution-balanced loss, DB (Wu et al., ECCV 2020).

    Follows the authors' ``ResampleLoss`` with ``reweight_func='rebalance'``:

    1. Re-balanced weighting. For image b, r_{b,c} = (1 / n_c) / sum_{i: y_bi = 1}
       (1 / n_i) (the class's sampling probability over the image's, P^C / P^I under
       class-aware sampling, so co-occurring head classes get small weights), then
       smoothed to r_hat = map_alpha + sigmoid(map_beta * (r - map_gamma)). The same
       weight applies to the image's positives and negatives. An image without any
       positive has r = +inf, hence r_hat = map_alpha + 1 (what the authors' code
       computes).
    2. Negative-tolerant regularisation. A class-specific bias
       nu_c = -init_bias * log(num_train / n_c - 1) / neg_scale (from the class
       prior; the authors' final code divides by neg_scale) is added to the logits;
       negatives' logits are then multiplied by lambda = neg_scale and their loss
       divided by lambda: positives -r_hat log sigmoid(x + nu),
       negatives r_hat / lambda * log(1 + exp(lambda (x + nu))).
    3. Optional focal term: each entry is multiplied by (1 - p_t)^gamma, p_t the
       probability of the right answer under the regularised logit.

    Reduction: mean over the real images and all classes. The authors' focal variant
    also multiplies by ``balance_param`` = 2.0 (a constant factor): scale the loss
    weight by 2 to match their absolute values.

    Args:
      logits: [B, K] logits.
      labels: [B, K] float {0, 1} labels.
      class_freq: [K] number of training images per class (all in 1..num_train-1).
      num_train: number of training images.
      focal: whether to apply the focal term.
      gamma: focal exponent.
      map_alpha: smoothing offset alpha.
      map_beta: smoothing slope beta.
      map_gamma: smoothing shift mu.
      neg_scale: lambda of the negative-tolerant regularisation.
      init_bias: kappa, the scale of the prior bias.
      mask: optional [B] bool, False for padding images.

    Returns:
      float32 scalar.
    """
    _check_pair(logits, labels, "distribution_balanced_loss")
    k = logits.shape[1]
    if not hasattr(class_freq, "shape"):
        class_freq = np.asarray(class_freq)
    if class_freq.shape != (k,):
        raise ValueError(
            f"distribution_balanced_loss: class_freq must be [K] = [{k}], got {class_freq.shape}."
        )
    freq_np = _concrete_or_none(class_freq)
    if freq_np is not None and not np.all((freq_np > 0) & (freq_np < num_train)):
        raise ValueError(
            "distribution_balanced_loss: every class frequency must lie in "
            f"1..num_train-1 = 1..{num_train - 1} (the prior bias is -log(N/n - 1)); "
            f"got {freq_np.tolist()}. Drop classes that have no training image."
        )
    x = logits.astype(jnp.float32)
    y = (labels > 0.5).astype(jnp.float32)
    freq = jnp.asarray(class_freq, jnp.float32)

    freq_inv = 1.0 / freq
    repeat_rate = jnp.sum(y * freq_inv[None, :], axis=1, keepdims=True)  # [B, 1]
    has_pos = repeat_rate > 0
    r = freq_inv[None, :] / jnp.where(has_pos, repeat_rate, 1.0)
    r_hat = map_alpha + jnp.where(has_pos, jax.nn.sigmoid(map_beta * (r - map_gamma)), 1.0)

    bias = -jnp.log(num_train / freq - 1.0) * init_bias / neg_scale
    z = x + bias[None, :]
    z = jnp.where(y > 0, z, neg_scale * z)
    weight = jnp.where(y > 0, r_hat, r_hat / neg_scale)
    # log p_t, p_t = the probability of the right answer under z.
    log_pt = jnp.where(y > 0, jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z))
    per_entry = -weight * log_pt
    if focal:
        # 1 - p_t = sigmoid(-z) for positives, sigmoid(z) for negatives.
        log_one_minus_pt = jnp.where(y > 0, jax.nn.log_sigmoid(-z), jax.nn.log_sigmoid(z))
        per_entry = jnp.exp(gamma * log_one_minus_pt) * per_entry
    return _mean_over_entries(
        per_entry, _image_weights(mask, x.shape[0], "distribution_balanced_loss")
    )
