"""The pure train and eval steps, and `compile_train_step`: the one place choosing jit or pmap."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from mlcnc_jax import prototypes
from mlcnc_jax.models.families import ModelFamily
from mlcnc_jax.objective import Objective
from mlcnc_jax.state import TrainState


def normalize_images(
    images: jax.Array, image_norm: tuple[Sequence[float], Sequence[float]] | None
) -> jax.Array:
    """uint8 pixels -> float32 (x / 255 - mean) / std, on the device; other dtypes pass.

    The input pipeline hands over uint8 images (a quarter of float32's bytes to copy to
    the device); floating images (a user's iterator, the in-memory arrays) are taken as
    already normalised.

    Args:
      images: [..., 3] uint8 pixels, or floating images.
      image_norm: (mean, std) per channel of [0, 1] images; None: (0, 1).
    """
    if images.dtype != jnp.uint8:
        return images
    x = images.astype(jnp.float32) / 255.0
    if image_norm is None:
        return x
    mean, std = image_norm
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def ema_update(ema: Any, new: Any, decay: float) -> Any:
    """One step of the exponential moving average: decay * ema + (1 - decay) * new."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new)


def update_prototypes(
    protos: prototypes.PrototypeState,
    projected: jax.Array,
    labels: jax.Array,
    step: jax.Array,
    steps_per_epoch: int,
) -> prototypes.PrototypeState:
    """Adds the batch to the prototype statistics; closes the epoch after its last step.

    `step` is the index of the step just taken (0-based): the epoch ends when
    step + 1 is a multiple of `steps_per_epoch`.
    """
    protos = prototypes.accumulate(protos, projected, labels)
    epoch_end = (step + 1) % steps_per_epoch == 0
    ended = prototypes.end_epoch(protos)
    return jax.tree.map(lambda a, b: jnp.where(epoch_end, a, b), ended, protos)


def example_dropout(first_index: jax.Array | int):
    """A method interceptor that draws every `nn.Dropout` mask per example.

    Example b of the global batch (index `first_index + b`, its position in the
    global batch) gets the mask of key fold_in(module key, index), so the masks do
    not depend on how the batch is split over devices: jit over a mesh, pmap and
    one device draw the same. Leading axis of the dropped array: the batch.

    Args:
      first_index: global index of this device's first example (0 under jit).

    Returns:
      An interceptor for `flax.linen.intercept_methods`.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        x = args[0]
        deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
        deterministic = module.deterministic if deterministic is None else deterministic
        if deterministic or module.rate == 0.0 or module.broadcast_dims or x.ndim == 0:
            return next_fun(*args, **kwargs)
        keep = 1.0 - module.rate
        key = module.make_rng(module.rng_collection)
        index = first_index + jnp.arange(x.shape[0])
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
        mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(keys)
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))

    return interceptor


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    family: ModelFamily,
    tx: optax.GradientTransformation,
    loss_fn: Objective,
    lr_schedule: Callable,
    steps_per_epoch: int,
    ema_decay: float,
    axis_name: str | None = None,
    image_norm: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch.

    Under jit the batch is the global batch. Under pmap (`axis_name` set) each
    device holds a shard: the model outputs are all-gathered so every loss sees
    the global batch, and gradients are averaged with `lax.pmean` (the
    all-gather's transpose sums the cotangents of the replicated loss, so the
    mean is the global gradient).

    Args:
      state: the training state.
      batch: {'image': [B, H, W, 3] (uint8 pixels or normalised floats), 'labels': [B, K]}.
      model: the model (`models.create_model`).
      family: its `ModelFamily` (which outputs the losses read, whether it keeps
        prototypes); the rest of the outputs never leaves the step.
      tx: the optimizer (`optim.create_optimizer`).
      loss_fn: the objective (`objective.make_objective`).
      lr_schedule: the learning-rate schedule (reported in the metrics).
      steps_per_epoch: the prototypes close an epoch after every this many steps.
      ema_decay: decay of the weights' moving average.
      axis_name: the pmap axis, or None under jit.
      image_norm: (mean, std) of uint8 images (`normalize_images`).

    Returns:
      (new state, metrics) with the total loss, each term and the learning rate.
    """
    # One key for the global batch; dropout masks come per example (`example_dropout`).
    rng = jax.random.fold_in(state.rng, state.step)
    labels = batch["labels"]
    images = normalize_images(batch["image"], image_norm)
    first_index = 0
    if axis_name is not None:
        first_index = jax.lax.axis_index(axis_name) * labels.shape[0]

    def compute_loss(params):
        variables = {
            "params": params,
            "batch_stats": state.batch_stats,
            **({"etf": state.etf} if state.etf else {}),
        }
        with nn.intercept_methods(example_dropout(first_index)):
            outputs, mutated = model.apply(
                variables,
                images,
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
        gathered = {k: outputs[k] for k in family.loss_outputs}
        all_labels = labels
        if axis_name is not None:
            gathered = jax.lax.all_gather(gathered, axis_name, tiled=True)
            all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
        gathered.update({k: outputs[k] for k in family.shared_outputs})
        total, terms = loss_fn(gathered, all_labels, prototypes=state.prototypes, step=state.step)
        return total, (total, terms, gathered, all_labels, mutated.get("batch_stats", {}))

    grads, (total, terms, outputs, all_labels, batch_stats) = jax.grad(compute_loss, has_aux=True)(
        state.params
    )
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema, {"params": params, "batch_stats": batch_stats}, ema_decay)

    protos = state.prototypes
    if family.keeps_prototypes:
        protos = update_prototypes(
            protos, outputs[family.prototype_output], all_labels, state.step, steps_per_epoch
        )

    step_metrics = {
        "loss": total,
        **{f"loss_{k}": v for k, v in terms.items()},
        "learning_rate": lr_schedule(state.step),
        **family.step_metrics(params),
    }

    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema=ema,
        prototypes=protos,
    )
    return new_state, step_metrics


def compile_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: Objective,
    lr_schedule: Callable,
    *,
    family: ModelFamily,
    steps_per_epoch: int,
    ema_decay: float,
    axis_name: str | None = None,
    image_norm: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Callable:
    """`train_step` bound to its settings and compiled, the state donated.

    jax.jit by default; jax.pmap over the local devices when `axis_name` is given.
    """
    step_fn = functools.partial(
        train_step,
        model=model,
        family=family,
        tx=tx,
        loss_fn=loss_fn,
        lr_schedule=lr_schedule,
        steps_per_epoch=steps_per_epoch,
        ema_decay=ema_decay,
        axis_name=axis_name,
        image_norm=None if image_norm is None else tuple(map(tuple, image_norm)),
    )
    if axis_name:
        return jax.pmap(step_fn, axis_name=axis_name, donate_argnums=(0,))
    return jax.jit(step_fn, donate_argnums=(0,))


def eval_step(
    variables: dict,
    images: jax.Array,
    *,
    model: nn.Module,
    family: ModelFamily,
    image_norm: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, jax.Array]:
    """Scores (sigmoid of the logits) and the family's features for the neural-collapse measures."""
    outputs = model.apply(variables, normalize_images(images, image_norm), train=False)
    return {
        "scores": jax.nn.sigmoid(outputs["logits"].astype(jnp.float32)),
        "features": outputs[family.eval_features],
    }
