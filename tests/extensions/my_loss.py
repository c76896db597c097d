"""A loss term: one function of the loss inputs (registered as 'mean_logit')."""

import jax.numpy as jnp

from mlcnc_jax import objective


def mean_logit(inputs: objective.LossInputs):
    """The mean squared logit: small, smooth and easy to check by hand."""
    return jnp.mean(inputs.outputs["logits"] ** 2)
