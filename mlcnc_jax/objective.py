"""The training objective: a registry of loss terms, weighted by `config.loss`.

A loss term is one function `term(inputs: LossInputs) -> scalar` registered under
a name; its weight is the config field `config.loss.<name>` (0 leaves it out).
`make_objective` builds the weighted sum once per run, with the class statistics
the terms need bound in, so the train step only calls
`loss_fn(outputs, labels, prototypes=..., step=...)`.

Adding a loss:

    from mlcnc_jax import losses, objective

    @objective.register_loss("my_loss")
    def my_loss(inputs: objective.LossInputs):
        return losses.bce_loss(inputs.outputs["logits"], inputs.labels)

and declare its weight, `c.loss.my_loss = 0.0`, in the schema,
mlcnc_jax/configuration/_schema.py (the config is locked); then `--config.loss.my_loss=1.0`
turns it on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlcnc_jax import losses, prototypes


@dataclasses.dataclass(frozen=True)
class ClassStats:
    """What some terms know of the training split (the DB loss: its class frequencies).

    Attributes:
      class_freq: [K] training images per class.
      num_train: number of training images.
    """

    class_freq: np.ndarray
    num_train: int


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """What every loss term receives.

    Attributes:
      outputs: the model outputs over the global batch: 'logits' [B, K] and, for
        MLC-NC, 'class_features' [B, K, D], 'label_embedding' [K, D] and
        'projected' [B, K, p].
      labels: [B, K] float {0, 1}.
      prototypes: the `prototypes.PrototypeState` of the run (None without FPC).
      config: `config.loss` (the terms' own hyper-parameters live there too).
      class_stats: the training split's `ClassStats`.
    """

    outputs: dict[str, jax.Array]
    labels: jax.Array
    prototypes: Any
    config: ml_collections.ConfigDict
    class_stats: ClassStats


LossTerm = Callable[[LossInputs], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Entry:
    fn: LossTerm
    requires: tuple[str, ...]


TERMS: dict[str, _Entry] = {}


def register_loss(
    name: str, *, requires: Sequence[str] = ("logits",)
) -> Callable[[LossTerm], LossTerm]:
    """Registers `term(inputs: LossInputs) -> scalar` as the loss term `name` (a decorator).

    Args:
      name: the term's name; its weight is `config.loss.<name>`.
      requires: model outputs the term reads; a model without them (e.g. the
        baseline has no class features) skips the term.

    Returns:
      The decorator, which returns the function unchanged.
    """

    def decorate(fn: LossTerm) -> LossTerm:
        TERMS[name] = _Entry(fn, tuple(requires))
        return fn

    return decorate


@register_loss("two_way")
def _two_way(x: LossInputs) -> jax.Array:
    c = x.config
    return losses.two_way_loss(x.outputs["logits"], x.labels, tp=c.two_way_tp, tn=c.two_way_tn)


@register_loss("bce")
def _bce(x: LossInputs) -> jax.Array:
    return losses.bce_loss(x.outputs["logits"], x.labels)


@register_loss("focal")
def _focal(x: LossInputs) -> jax.Array:
    return losses.focal_loss(x.outputs["logits"], x.labels)


@register_loss("asl")
def _asl(x: LossInputs) -> jax.Array:
    return losses.asymmetric_loss(x.outputs["logits"], x.labels)


@register_loss("db")
def _db(x: LossInputs) -> jax.Array:
    s = x.class_stats
    return losses.distribution_balanced_loss(
        x.outputs["logits"], x.labels, jnp.asarray(s.class_freq), s.num_train
    )


@register_loss("fla", requires=("class_features", "label_embedding"))
def _fla(x: LossInputs) -> jax.Array:
    return losses.alignment_loss(
        x.outputs["class_features"], x.outputs["label_embedding"], x.labels
    )


@register_loss("fpc", requires=("projected",))
def _fpc(x: LossInputs) -> jax.Array:
    protos, valid = prototypes.current(x.prototypes, x.config.prototypes)
    return losses.calibration_loss(
        x.outputs["projected"], protos, x.labels, tau=x.config.fpc_tau, valid=valid
    )


def weight_of(loss_config: ml_collections.ConfigDict, name: str) -> float:
    """The config weight of term `name`; raises, naming the fix, when it is not declared."""
    if name not in loss_config:
        raise ValueError(
            f"The loss term {name!r} has no weight in config.loss: declare "
            f"`c.loss.{name} = 0.0` in mlcnc_jax/configuration/_schema.py (the config is locked, so every "
            "weight must be declared there), then set it with --config.loss."
            f"{name}=WEIGHT."
        )
    return float(loss_config[name])


Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def make_objective(
    loss_config: ml_collections.ConfigDict,
    class_stats: ClassStats,
    *,
    warmup_steps: int = 0,
) -> Objective:
    """The weighted sum of the registered terms with a non-zero weight.

    During the first `warmup_steps` steps the total is FLA alone with weight
    `loss.warmup_fla` (the reference code's warm-up); FLA is then computed even
    when its own weight is 0.

    Args:
      loss_config: `config.loss`.
      class_stats: the training split's statistics.
      warmup_steps: steps of the FLA-only warm-up (0 for none).

    Returns:
      `loss_fn(outputs, labels, *, prototypes, step) -> (total, {term: value})`.
    """
    weights = {name: weight_of(loss_config, name) for name in TERMS}
    active = [name for name in TERMS if weights[name] or (name == "fla" and warmup_steps)]

    def loss_fn(
        outputs: dict[str, jax.Array],
        labels: jax.Array,
        *,
        prototypes: Any = None,
        step: jax.Array | int = 0,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        inputs = LossInputs(outputs, labels, prototypes, loss_config, class_stats)
        terms = {
            name: TERMS[name].fn(inputs)
            for name in active
            if all(k in outputs for k in TERMS[name].requires)
        }
        total = sum(weights[name] * value for name, value in terms.items())
        if warmup_steps and "fla" in terms:
            total = jnp.where(step < warmup_steps, loss_config.warmup_fla * terms["fla"], total)
        return total, terms

    return loss_fn
