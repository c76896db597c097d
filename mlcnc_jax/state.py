"""The training state (plain data), the step plan of a run, and how to make a fresh state."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from mlcnc_jax.data import sampling


@flax.struct.dataclass
class TrainState:
    """Everything a killed run needs to resume exactly (the data position is `step`)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    etf: Any  # frozen ETF label embedding and classifier ({} for the baseline model)
    opt_state: Any
    ema: Any  # {'params', 'batch_stats'}: exponential moving average of the weights
    prototypes: Any  # prototypes.PrototypeState, or None for the baseline model
    rng: jax.Array

    def variables(self) -> dict:
        """The raw weights as the model's variable dict (params, batch_stats, etf)."""
        return {
            "params": self.params,
            "batch_stats": self.batch_stats,
            **({"etf": self.etf} if self.etf else {}),
        }

    def ema_variables(self) -> dict:
        """The EMA weights as the model's variable dict."""
        return {**self.ema, **({"etf": self.etf} if self.etf else {})}


@flax.struct.dataclass
class Schedule:
    """Step counts of a run (its step plan), derived from the config and the training split."""

    steps_per_epoch: int = flax.struct.field(pytree_node=False)
    total_steps: int = flax.struct.field(pytree_node=False)
    warmup_steps: int = flax.struct.field(pytree_node=False)


def make_schedule(config: ml_collections.ConfigDict, train_labels: np.ndarray) -> Schedule:
    """Steps per epoch (the sampler's epoch unless the config fixes it), total and warm-up steps."""
    if config.train.steps_per_epoch > 0:
        steps_per_epoch = int(config.train.steps_per_epoch)
    else:
        size = sampling.epoch_size(train_labels, config.data.sampling)
        steps_per_epoch = max(1, math.ceil(size / config.train.batch_size))
    warmup_epochs = config.loss.warmup_epochs if config.model.name == "mlcnc" else 0
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * int(config.train.num_epochs),
        warmup_steps=steps_per_epoch * int(warmup_epochs),
    )


def init_variables(model: nn.Module, example_input: jax.Array, rng: jax.Array) -> dict:
    """Initialises the model's variables (params, batch_stats, etf) from an example input."""
    variables = jax.jit(functools.partial(model.init, train=False))(
        {"params": rng, "dropout": rng}, example_input
    )
    return flax.core.unfreeze(variables)


def create_train_state(
    variables: dict,
    tx: optax.GradientTransformation,
    *,
    rng: jax.Array,
    prototypes: Any = None,
) -> TrainState:
    """The state at step 0: the given weights, a fresh optimizer state, the EMA at the weights.

    Args:
      variables: the model's variables ('params', and 'batch_stats' / 'etf' when it has them).
      tx: the optimizer.
      rng: the state's root key (dropout keys are folded from it inside the step).
      prototypes: a `prototypes.PrototypeState`, or None for a model without FPC.

    Returns:
      A TrainState whose every leaf is its own buffer (the step donates the state,
      and a buffer must not be donated twice).
    """
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        etf=variables.get("etf", {}),
        opt_state=tx.init(params),
        ema={"params": params, "batch_stats": batch_stats},
        prototypes=prototypes,
        rng=rng,
    )
    return jax.tree.map(jnp.copy, state)
