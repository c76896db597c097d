"""The optimizer: Adam with coupled L2, torch's one-cycle learning rate and beta1 cycle.

Everything here follows torch's formulas step for step, because the reference
code (METHOD.md §6) trains with `torch.optim.Adam(weight_decay=1e-4)` and
`torch.optim.lr_scheduler.OneCycleLR`, stepped every step:

- **Learning rate** (`one_cycle_schedule`): torch's OneCycleLR with
  three_phase=False and cosine annealing. The rise ends at step
  ``pct_start * T - 1`` (the peak) and the fall at step ``T - 1`` (the final
  value); optax's ``cosine_onecycle_schedule`` reaches both one step later.
- **beta1** (`beta1_schedule`): OneCycleLR's default ``cycle_momentum=True``
  moves Adam's beta1 the other way, from ``beta1_max`` (0.95) down to
  ``beta1_min`` (0.85) while the learning rate rises and back while it falls.
- **Adam** (`scale_by_torch_adam`): torch's update with a beta1 that may change
  every step; the bias correction of step t uses that step's beta1,
  ``1 - beta1_t ** t``, as torch does (not the product of the past beta1s).
- **L2** (`decay_mask`): added to the gradient before Adam (torch's coupled
  ``weight_decay``, not AdamW), on every parameter of two or more dimensions
  except biases; the reference code also decays the 2-D per-class projection
  bias (its name lacks torch's ``.bias`` suffix): ``train.decay_2d_bias``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

# torch.optim.lr_scheduler.OneCycleLR defaults.
DIV_FACTOR = 25.0  # initial lr = peak / 25
FINAL_DIV_FACTOR = 1e4  # final lr = initial lr / 1e4
# torch.optim.Adam defaults.
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8

SCHEDULES = ("one_cycle", "constant")


def one_cycle_schedule(
    total_steps: int, pct_start: float, start: float, middle: float, end: float
) -> Callable[[jax.Array], jax.Array]:
    """torch's two-phase cosine one-cycle curve: start -> middle -> end.

    Phase 1 runs from step 0 to step ``pct_start * total_steps - 1`` (where the
    value is `middle`), phase 2 from there to step ``total_steps - 1`` (where it
    is `end`); within a phase the value is ``b + (a - b) / 2 * (1 + cos(pi * f))``
    for the fraction f of the phase done, as in OneCycleLR.get_lr. Steps past the
    end keep the end value.

    Args:
      total_steps: T, the number of optimizer steps.
      pct_start: fraction of T spent in phase 1.
      start: value at step 0.
      middle: value at the end of phase 1.
      end: value at step T - 1.

    Returns:
      A schedule: step (int) -> float32 value.
    """
    if total_steps < 1:
        raise ValueError(f"one_cycle_schedule: total_steps must be >= 1, got {total_steps}.")
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"one_cycle_schedule: pct_start must be in (0, 1), got {pct_start}.")
    mid_step = float(pct_start * total_steps) - 1.0
    last_step = float(total_steps) - 1.0

    def anneal(a, b, done, remaining):
        # torch's b + (a - b) / 2 * (1 + cos(pi * f)), f the fraction done, written as
        # a sin^2(pi r / 2) + b sin^2(pi f / 2) with r = 1 - f computed on its own: two
        # positive terms, each accurate when small, so float32 keeps ~1e-7 relative
        # precision at both ends of a phase (the cosine form cancels there).
        done, remaining = jnp.clip(done, 0.0, 1.0), jnp.clip(remaining, 0.0, 1.0)
        half_pi = 0.5 * math.pi
        return a * jnp.square(jnp.sin(half_pi * remaining)) + b * jnp.square(
            jnp.sin(half_pi * done)
        )

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        # torch divides by the phase length; a phase of length <= 0 (T < 1 / pct_start)
        # is taken as already done instead of dividing by zero.
        if mid_step > 0:
            rise = anneal(start, middle, s / mid_step, (mid_step - s) / mid_step)
        else:
            rise = jnp.full_like(s, middle)
        span = last_step - mid_step
        fall = anneal(middle, end, (s - mid_step) / span, (last_step - s) / span)
        return jnp.where(s <= mid_step, rise, fall)

    return schedule


def lr_schedule(config: ml_collections.ConfigDict, total_steps: int) -> Callable:
    """The learning rate of `config.train` per step (see the module docstring)."""
    t = config.train
    if t.schedule == "one_cycle":
        initial = t.learning_rate / DIV_FACTOR
        final = initial / FINAL_DIV_FACTOR
        return one_cycle_schedule(
            max(total_steps, 1), t.warmup_fraction, initial, t.learning_rate, final
        )
    if t.schedule == "constant":
        return optax.constant_schedule(t.learning_rate)
    raise ValueError(f"Unknown train.schedule {t.schedule!r}: use one of {SCHEDULES}.")


def beta1_schedule(config: ml_collections.ConfigDict, total_steps: int) -> Callable:
    """Adam's beta1 per step: torch's one-cycle momentum, or the fixed `train.adam_beta1`."""
    t = config.train
    if not t.cycle_beta1:
        return optax.constant_schedule(t.adam_beta1)
    if t.schedule != "one_cycle":
        raise ValueError(
            "train.cycle_beta1=True cycles beta1 against the one-cycle learning rate: "
            f"set train.schedule='one_cycle' (got {t.schedule!r}) or train.cycle_beta1=False."
        )
    low, high = (float(b) for b in t.beta1_range)
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(
            f"train.beta1_range must be (low, high), 0 <= low <= high < 1; got {t.beta1_range}."
        )
    return one_cycle_schedule(max(total_steps, 1), t.warmup_fraction, high, low, high)


class ScaleByTorchAdamState(NamedTuple):
    """State of `scale_by_torch_adam`: steps taken and the two moment estimates."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_torch_adam(
    b1: float | Callable[[jax.Array], jax.Array],
    b2: float = ADAM_BETA2,
    eps: float = ADAM_EPS,
) -> optax.GradientTransformation:
    """Adam's direction as torch.optim.Adam computes it, with beta1 from a schedule.

    At step t = 1, 2, ... with g the gradient and beta1_t = b1(t - 1):
    m = m + (1 - beta1_t) (g - m); v = b2 v + (1 - b2) g^2;
    update = (m / (1 - beta1_t ** t)) / (sqrt(v) / sqrt(1 - b2 ** t) + eps).
    Chain with `optax.scale_by_learning_rate` for the step.

    Args:
      b1: beta1, or a schedule of it (step index 0, 1, ... -> beta1).
      b2: beta2.
      eps: added to the denominator, after the bias correction (as torch).

    Returns:
      An optax GradientTransformation.
    """
    b1_fn = b1 if callable(b1) else (lambda _: b1)

    def init_fn(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return ScaleByTorchAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update_fn(updates, state, params=None):
        del params
        beta1 = jnp.asarray(b1_fn(state.count), jnp.float32)
        count = optax.safe_int32_increment(state.count)
        mu = jax.tree.map(lambda m, g: m + (1.0 - beta1) * (g - m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
        t = count.astype(jnp.float32)
        bias1 = 1.0 - beta1**t
        bias2_sqrt = jnp.sqrt(1.0 - jnp.float32(b2) ** t)
        out = jax.tree.map(lambda m, v: (m / bias1) / (jnp.sqrt(v) / bias2_sqrt + eps), mu, nu)
        return out, ScaleByTorchAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def decay_mask(params: Any, decay_2d_bias: bool) -> Any:
    """True for the parameters that get L2: two or more dimensions, and not a bias.

    Args:
      params: the parameter pytree.
      decay_2d_bias: also decay biases of two or more dimensions (the per-class
        projection bias [K, p]), as the reference code does.

    Returns:
      A pytree of bools with the structure of `params`.
    """

    def keep(path, p):
        name = str(getattr(path[-1], "key", path[-1]))
        return p.ndim > 1 and (decay_2d_bias or "bias" not in name)

    return jax.tree_util.tree_map_with_path(keep, params)


def _logit_scale_mask(params: Any) -> Any:
    def is_scale(path, _):
        return str(getattr(path[-1], "key", path[-1])) == "logit_scale"

    return jax.tree_util.tree_map_with_path(is_scale, params)


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """Adam with coupled L2, the configured learning rate and beta1 schedules.

    The update is ``-lr_t * adam(g + weight_decay * w)`` (torch.optim.Adam with
    weight_decay), with L2 only where `decay_mask` says; the logit scale gamma's
    step is multiplied by ``train.logit_scale_lr_multiplier``.

    Args:
      config: the experiment config (section `train`).
      total_steps: T, the number of optimizer steps of the run.

    Returns:
      (optimizer, learning-rate schedule).
    """
    t = config.train
    if t.optimizer != "adam":
        raise ValueError(f"Unknown train.optimizer {t.optimizer!r}: use 'adam'.")
    schedule = lr_schedule(config, total_steps)
    parts = [
        optax.add_decayed_weights(
            t.weight_decay, mask=functools.partial(decay_mask, decay_2d_bias=t.decay_2d_bias)
        ),
        scale_by_torch_adam(beta1_schedule(config, total_steps)),
        optax.scale_by_learning_rate(schedule),
    ]
    if t.logit_scale_lr_multiplier != 1.0:
        parts.append(optax.masked(optax.scale(t.logit_scale_lr_multiplier), _logit_scale_mask))
    return optax.chain(*parts), schedule
