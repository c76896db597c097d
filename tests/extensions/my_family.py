"""A model family: max-pooled tokens and a linear classifier (registered as 'max_pool')."""

import jax.numpy as jnp
from flax import linen as nn

from mlcnc_jax.models import families


class MaxPool(nn.Module):
    """Backbone tokens, max over the tokens, a linear classifier."""

    backbone: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool):
        features = self.backbone(images, train).astype(jnp.float32).max(axis=1)
        return {"logits": nn.Dense(self.num_classes)(features), "pooled": features}


class MaxPoolFamily(families.ModelFamily):
    """No prototypes, no warm-up; the neural-collapse measures read the pooled features."""

    name = "max_pool"
    eval_features = "pooled"

    def make(self, config, num_classes, backbone, dtype):
        return MaxPool(backbone=backbone, num_classes=num_classes)
