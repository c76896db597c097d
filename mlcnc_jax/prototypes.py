"""Class prototypes for the collapse-calibration loss (FPC).

A prototype m_k is the mean of the L2-normalised projections z_{b,k} over the
positive (image b, class k) pairs seen in training. Two variants (docs/method.md §2):

- ``'previous_epoch'`` (paper, default): the mean over the last finished epoch in
  which the class was seen; a class absent from an epoch keeps its older prototype.
- ``'cumulative'`` (reference code, docs/method.md §6): the mean over every positive pair
  accumulated since step 0 (warm-up included, never reset), taken at the last end
  of epoch. It does not include the current epoch's batches.

Both kinds are fixed during an epoch: the train step reads them with `current`
(before this batch is added), adds the batch with `accumulate`, and at each end
of epoch `end_epoch` turns the sums into the prototypes of the next epoch.

The state is a pytree, so it can live inside the training state, be checkpointed,
and be updated inside a jitted or pmapped train step. Counts are int32 (exact;
float32 sums of counts would stop being exact past 2^24 pairs).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

MODES = ("previous_epoch", "cumulative")

# L2 normalisation clamp, as in the model's projection (docs/method.md §1.5).
_NORM_EPS = 1e-12


@flax.struct.dataclass
class PrototypeState:
    """Running per-class statistics of the normalised projections.

    Attributes:
      epoch_sum: [K, p] sum of normalised z over positive pairs in this epoch.
      epoch_count: [K] int32 number of those pairs in this epoch.
      total_sum: [K, p] the same since the start of training.
      total_count: [K] int32 the same since the start of training.
      prototypes: [K, p] previous-epoch prototypes, fixed at the last end of epoch.
      valid: [K] bool, True for classes that have a prototype in ``prototypes``.
      cumulative: [K, p] cumulative prototypes (total_sum / total_count), fixed at
        the last end of epoch.
      cumulative_valid: [K] bool, True for classes with a row in ``cumulative``.
    """

    epoch_sum: Array
    epoch_count: Array
    total_sum: Array
    total_count: Array
    prototypes: Array
    valid: Array
    cumulative: Array
    cumulative_valid: Array


def init_prototypes(num_classes: int, dim: int) -> PrototypeState:
    """An empty state: no statistics and no valid prototype.

    Args:
      num_classes: K.
      dim: projection dimension p.

    Returns:
      PrototypeState of zeros.
    """
    if num_classes < 1 or dim < 1:
        raise ValueError(
            f"init_prototypes: num_classes and dim must be >= 1, got {num_classes} and {dim}."
        )
    zeros_kp = jnp.zeros((num_classes, dim), jnp.float32)
    zeros_k = jnp.zeros((num_classes,), jnp.int32)
    return PrototypeState(
        epoch_sum=zeros_kp,
        epoch_count=zeros_k,
        total_sum=zeros_kp,
        total_count=zeros_k,
        prototypes=zeros_kp,
        valid=jnp.zeros((num_classes,), bool),
        cumulative=zeros_kp,
        cumulative_valid=jnp.zeros((num_classes,), bool),
    )


def accumulate(
    state: PrototypeState,
    projected: Array,
    labels: Array,
    mask: Array | None = None,
    axis_name: str | None = None,
) -> PrototypeState:
    """Adds a batch's positive pairs to the epoch and total statistics.

    Args:
      state: current state.
      projected: [B, K, p] class-wise projections (normalised again here; no
        gradient flows into the statistics).
      labels: [B, K] float {0, 1} labels; entries > 0.5 are positive.
      mask: optional [B] bool, False for padding images (not accumulated).
      axis_name: name of a pmap axis: when given, the batch sums are psum-ed over
        it so every device holds the same state.

    Returns:
      The updated state.
    """
    k, p = state.prototypes.shape
    if projected.ndim != 3 or projected.shape[1:] != (k, p):
        raise ValueError(
            f"accumulate: projected must be [B, {k}, {p}] for this state, got {projected.shape}."
        )
    b = projected.shape[0]
    if labels.shape != (b, k):
        raise ValueError(f"accumulate: labels must be [{b}, {k}], got {labels.shape}.")
    pos = labels > 0.5
    if mask is not None:
        if mask.shape != (b,):
            raise ValueError(f"accumulate: mask must be [B] = [{b}] bool, got {mask.shape}.")
        pos = pos & mask.astype(bool)[:, None]
    z = jax.lax.stop_gradient(projected).astype(jnp.float32)
    sq = jnp.sum(z * z, axis=-1, keepdims=True)
    z = z * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))
    batch_sum = jnp.einsum("bk,bkp->kp", pos.astype(jnp.float32), z)
    batch_count = jnp.sum(pos.astype(jnp.int32), axis=0)
    if axis_name is not None:
        batch_sum, batch_count = jax.lax.psum((batch_sum, batch_count), axis_name)
    return state.replace(
        epoch_sum=state.epoch_sum + batch_sum,
        epoch_count=state.epoch_count + batch_count,
        total_sum=state.total_sum + batch_sum,
        total_count=state.total_count + batch_count,
    )


def _mean(total: Array, count: Array) -> Array:
    return total / jnp.maximum(count, 1).astype(jnp.float32)[:, None]


def end_epoch(state: PrototypeState) -> PrototypeState:
    """Closes an epoch: fixes the prototypes used by the next one.

    Previous-epoch prototypes: classes seen this epoch get this epoch's mean; the
    others keep their previous prototype (and validity). Cumulative prototypes:
    the mean of everything since step 0. The epoch statistics are reset.

    Args:
      state: current state.

    Returns:
      The updated state.
    """
    seen = state.epoch_count > 0
    return state.replace(
        prototypes=jnp.where(
            seen[:, None], _mean(state.epoch_sum, state.epoch_count), state.prototypes
        ),
        valid=state.valid | seen,
        cumulative=_mean(state.total_sum, state.total_count),
        cumulative_valid=state.total_count > 0,
        epoch_sum=jnp.zeros_like(state.epoch_sum),
        epoch_count=jnp.zeros_like(state.epoch_count),
    )


def current(state: PrototypeState, mode: str) -> tuple[Array, Array]:
    """The prototypes FPC should use now.

    Args:
      state: current state.
      mode: 'previous_epoch' (the mean over the last epoch that saw the class) or
        'cumulative' (the mean since step 0); both as fixed at the last end of epoch.

    Returns:
      (prototypes [K, p] float32, valid [K] bool). Rows of invalid classes are 0.
    """
    if mode == "previous_epoch":
        return state.prototypes, state.valid
    if mode == "cumulative":
        return state.cumulative, state.cumulative_valid
    raise ValueError(f"Unknown prototype mode {mode!r}: use one of {MODES}.")
