"""The optimizer: Adam with L2 weight decay on weights only, and its learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import optax


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """Adam with L2 weight decay on weight matrices and kernels only, and its lr schedule.

    The decay is added to the gradient before Adam (torch.optim.Adam's
    weight_decay, as the reference code), not decoupled as in AdamW.

    Returns:
      (optimizer, learning-rate schedule).
    """
    lr = config.train.learning_rate
    if config.train.schedule == "one_cycle":
        # torch's OneCycleLR defaults: start at lr/25, end at lr/25e4, cosine annealing.
        schedule = optax.cosine_onecycle_schedule(
            transition_steps=max(total_steps, 1),
            peak_value=lr,
            pct_start=config.train.warmup_fraction,
            div_factor=25.0,
            final_div_factor=1e4,
        )
    elif config.train.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    else:
        raise ValueError(
            f"Unknown train.schedule {config.train.schedule!r}: use 'one_cycle' or 'constant'."
        )
    if config.train.optimizer != "adam":
        raise ValueError(f"Unknown train.optimizer {config.train.optimizer!r}: use 'adam'.")

    def is_weight(params):
        # Decay kernels and weight matrices; never biases (some are 2-D: one per class) or scalars.
        def keep(path, p):
            name = str(getattr(path[-1], "key", path[-1]))
            return p.ndim > 1 and "bias" not in name

        return jax.tree_util.tree_map_with_path(keep, params)

    tx = optax.chain(
        optax.add_decayed_weights(config.train.weight_decay, mask=is_weight),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(schedule),
    )
    return tx, schedule
