"""The optimizer: Adam with coupled L2 or AdamW, torch's one-cycle learning rate and beta1 cycle.

Everything here follows torch's formulas step for step, because the reference
code (docs/method.md §6) trains with `torch.optim.Adam(weight_decay=1e-4)` and
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
- **AdamW** (``train.optimizer='adamw'``): torch.optim.AdamW, the same Adam
  direction with the decay decoupled, ``w <- w - lr (adam(g) + weight_decay w)``
  on the same `decay_mask`.
- **Learning-rate multipliers** (`lr_multipliers`), as torch parameter groups
  with their own ``lr`` would give (decay included, as AdamW scales it by the
  group's lr): the backbone's step times ``train.backbone_lr_multiplier`` (0
  freezes it: no update, no optimizer state), and for a ViT backbone a layer-wise
  decay ``train.layer_decay``: block i of L (``resblocks_i``, 0-based) gets
  ``layer_decay ** (L - i)``, the patch, class and positional embeddings and
  ``ln_pre`` ``layer_decay ** (L + 1)``, ``ln_post`` and ``proj`` 1. The head
  keeps the schedule's lr; gamma's step is times ``train.logit_scale_lr_multiplier``.

With the multipliers at 1 and ``optimizer='adam'`` the chain is exactly the one the
recipe tests prove against torch (nothing is added to it).
"""

from __future__ import annotations

import functools
import math
import re
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
OPTIMIZERS = ("adam", "adamw")

# Where a ViT backbone's parameters sit in the layer decay (models/vit.py names): below the
# first block, or above the last one.
VIT_EMBEDDINGS = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
VIT_TOP = ("ln_post", "proj")
_BLOCK = re.compile(r"^resblocks_(\d+)$")


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


def _key(entry: Any) -> str:
    return str(getattr(entry, "key", entry))


def _is_backbone(path: tuple) -> bool:
    return len(path) > 1 and _key(path[0]) == "backbone"


def layer_decay_exponents(backbone_params: Any) -> dict[str, int]:
    """The layer-decay exponent of each top-level entry of a ViT backbone's params.

    Args:
      backbone_params: params['backbone'] of a ViT (`models/vit.py` names:
        conv1, class_embedding, positional_embedding, ln_pre, resblocks_0 ..
        resblocks_{L-1}, ln_post, proj).

    Returns:
      {name: e}: the entry's learning rate is multiplied by layer_decay ** e; L - i
      for resblocks_i, L + 1 for the embeddings and ln_pre, 0 for ln_post and proj.

    Raises:
      ValueError: if the backbone has no transformer blocks (layer decay needs them), or
        an entry that is neither a block nor a known ViT parameter.
    """
    names = [str(k) for k in backbone_params]
    blocks = sorted(int(m.group(1)) for n in names if (m := _BLOCK.match(n)))
    if not blocks:
        raise ValueError(
            "train.layer_decay != 1 scales the learning rate per transformer block, but the "
            f"backbone has no blocks (resblocks_0, resblocks_1, ...; its parameters: "
            f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}). Use a ViT backbone "
            "(vit_* or clip_*) or set train.layer_decay=1.0."
        )
    depth = len(blocks)
    if blocks != list(range(depth)):
        raise ValueError(f"ViT blocks are not numbered 0..{depth - 1}: {blocks}")
    exponents = {}
    for name in names:
        if m := _BLOCK.match(name):
            exponents[name] = depth - int(m.group(1))
        elif name in VIT_EMBEDDINGS:
            exponents[name] = depth + 1
        elif name in VIT_TOP:
            exponents[name] = 0
        else:
            raise ValueError(
                f"train.layer_decay: the backbone parameter {name!r} is neither a transformer "
                f"block nor one of {VIT_EMBEDDINGS + VIT_TOP}; its depth is unknown."
            )
    return exponents


def lr_multipliers(params: Any, backbone_lr_multiplier: float, layer_decay: float) -> Any:
    """The factor of each parameter's learning rate (the module docstring gives the rule).

    Args:
      params: the model's params, the backbone under params['backbone'].
      backbone_lr_multiplier: factor of every backbone parameter.
      layer_decay: per-block decay for a ViT backbone (1: none).

    Returns:
      A pytree of Python floats with the structure of `params`: 1.0 outside the
      backbone, backbone_lr_multiplier * layer_decay ** e inside it.

    Raises:
      ValueError: when a multiplier is set but params has no 'backbone', or layer decay
        is asked of a backbone without transformer blocks.
    """
    if "backbone" not in params:
        raise ValueError(
            "train.backbone_lr_multiplier / train.layer_decay need the backbone's parameters "
            "under params['backbone']; these params have none."
        )
    exponents = {}
    if layer_decay != 1.0:
        exponents = layer_decay_exponents(params["backbone"])

    def factor(path, _):
        if not _is_backbone(path):
            return 1.0
        return float(backbone_lr_multiplier) * float(layer_decay) ** exponents.get(_key(path[1]), 0)

    return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_lr_multipliers(
    backbone_lr_multiplier: float, layer_decay: float
) -> optax.GradientTransformation:
    """Multiplies each update by its `lr_multipliers` factor (stateless).

    Applied after the learning rate (and, for AdamW, after the decay), so that a
    parameter's whole step is scaled, as a torch parameter group's lr scales it.
    The factors are read from the tree's paths at trace time: constants of the step.
    """

    def factors(tree):
        return lr_multipliers(tree, backbone_lr_multiplier, layer_decay)

    def init_fn(params):
        factors(params)  # an unsuitable backbone is reported before training starts
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        scaled = jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, factors(updates))
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


def _frozen_backbone_labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _is_backbone(path) else "trained", params
    )


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """Adam with coupled L2 or AdamW, the configured learning rate and beta1 schedules.

    'adam': ``-lr_t * adam(g + weight_decay * w)`` (torch.optim.Adam with
    weight_decay); 'adamw': ``-lr_t * (adam(g) + weight_decay * w)``
    (torch.optim.AdamW); the decay only where `decay_mask` says. The logit scale
    gamma's step is multiplied by ``train.logit_scale_lr_multiplier``, the
    backbone's by ``train.backbone_lr_multiplier`` and, per block of a ViT, by
    ``train.layer_decay`` (see `lr_multipliers`); a backbone multiplier of 0
    freezes the backbone (its updates are zero and Adam keeps no moments for it).

    Args:
      config: the experiment config (section `train`).
      total_steps: T, the number of optimizer steps of the run.

    Returns:
      (optimizer, learning-rate schedule).
    """
    t = config.train
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown train.optimizer {t.optimizer!r}: use one of {OPTIMIZERS}.")
    if t.backbone_lr_multiplier < 0 or not 0.0 < t.layer_decay <= 1.0:
        raise ValueError(
            "train.backbone_lr_multiplier must be >= 0 and train.layer_decay in (0, 1]; got "
            f"{t.backbone_lr_multiplier} and {t.layer_decay}."
        )
    schedule = lr_schedule(config, total_steps)
    decay = optax.add_decayed_weights(
        t.weight_decay, mask=functools.partial(decay_mask, decay_2d_bias=t.decay_2d_bias)
    )
    adam = scale_by_torch_adam(beta1_schedule(config, total_steps))
    # Coupled L2 enters Adam with the gradient; AdamW's decay bypasses Adam's scaling.
    parts = [decay, adam] if t.optimizer == "adam" else [adam, decay]
    parts.append(optax.scale_by_learning_rate(schedule))
    if t.logit_scale_lr_multiplier != 1.0:
        parts.append(optax.masked(optax.scale(t.logit_scale_lr_multiplier), _logit_scale_mask))
    frozen = t.backbone_lr_multiplier == 0.0
    if (t.backbone_lr_multiplier != 1.0 and not frozen) or t.layer_decay != 1.0:
        parts.append(scale_by_lr_multipliers(t.backbone_lr_multiplier, t.layer_decay))
    tx = optax.chain(*parts)
    if frozen:
        tx = optax.multi_transform(
            {"trained": tx, "frozen": optax.set_to_zero()}, _frozen_backbone_labels
        )
    return tx, schedule
