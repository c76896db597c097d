"""The training state (plain data), the step counts of a run, and a run's fresh state."""

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

from mlcnc_jax.backbone_weights import load_pretrained, pretrained_path
from mlcnc_jax.data import sampling
from mlcnc_jax.models.families import get_family


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
class StepCounts:
    """How many steps a run takes: per epoch, in all, and of loss warm-up.

    Derived from the config and the training split (`step_counts`); the learning-rate
    schedule (`optim`) and the cost estimate (`--mode=plan`) are other things.
    """

    steps_per_epoch: int = flax.struct.field(pytree_node=False)
    total_steps: int = flax.struct.field(pytree_node=False)
    warmup_steps: int = flax.struct.field(pytree_node=False)


def step_counts(config: ml_collections.ConfigDict, train_labels: np.ndarray) -> StepCounts:
    """Steps per epoch (the sampler's epoch unless the config fixes it), total and warm-up steps.

    Warm-up steps are the model family's (`ModelFamily.warmup_epochs`).
    """

    if config.train.steps_per_epoch > 0:
        steps_per_epoch = int(config.train.steps_per_epoch)
    else:
        size = sampling.epoch_size(train_labels, config.data.sampling)
        steps_per_epoch = max(1, math.ceil(size / config.train.batch_size))
    warmup_epochs = get_family(config.model.name).warmup_epochs(config)
    return StepCounts(
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


def initial_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    num_classes: int,
    example_input: jax.Array | None = None,
) -> TrainState:
    """The fresh state of a run: initialised weights (pre-trained backbone when configured).

    Args:
      config: the experiment config (seed, image size, pretrained, model family, proj_dim).
      model: the model.
      tx: the optimizer.
      num_classes: K.
      example_input: one input the model takes (default: a [1, S, S, 3] zero image).
    """
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    if example_input is None:
        size = config.data.image_size
        example_input = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = init_variables(model, example_input, init_rng)
    if pretrained_path(config):
        variables = load_pretrained(
            variables, pretrained_path(config), backbone=getattr(model, "backbone", None)
        )
    protos = get_family(config.model.name).initial_prototypes(config, num_classes)
    return create_train_state(variables, tx, rng=state_rng, prototypes=protos)
