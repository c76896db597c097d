"""Backbones and the MLC-NC model."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mlcnc_jax.models.mlcnc import ATTENTIONS, CLASSIFIERS, MLCNC, Baseline
from mlcnc_jax.models.resnet import BACKBONES, ResNet, get_backbone

MODELS = ("mlcnc", "baseline")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = ["MLCNC", "Baseline", "ResNet", "create_model", "get_backbone"]


def create_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    axis_name: str | None = None,
    backbone: nn.Module | None = None,
) -> nn.Module:
    """Builds the model described by `config.model` and `config.dtype`.

    Args:
        config: project config (schema in configs/default.py).
        num_classes: K.
        axis_name: device axis for BatchNorm statistics under jax.pmap, or None.
        backbone: your own module mapping images to tokens [B, N, C], used instead of
            `config.model.backbone`.

    Returns:
        An `MLCNC` or `Baseline` module.

    Raises:
        ValueError: for an unknown model name, backbone, dtype, attention or classifier.
    """
    m = config.model
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; valid: {', '.join(DTYPES)}")
    if m.name not in MODELS:
        raise ValueError(f"unknown model.name {m.name!r}; valid: {', '.join(MODELS)}")
    if backbone is None and m.backbone not in BACKBONES:
        raise ValueError(f"unknown model.backbone {m.backbone!r}; valid: {', '.join(BACKBONES)}")
    dtype = DTYPES[config.dtype]
    if backbone is None:
        backbone = get_backbone(m.backbone, dtype=dtype, axis_name=axis_name)
    if m.name == "baseline":
        return Baseline(backbone=backbone, num_classes=num_classes, dtype=dtype)
    if m.attention not in ATTENTIONS:
        raise ValueError(f"unknown model.attention {m.attention!r}; valid: {', '.join(ATTENTIONS)}")
    if m.classifier not in CLASSIFIERS:
        raise ValueError(
            f"unknown model.classifier {m.classifier!r}; valid: {', '.join(CLASSIFIERS)}"
        )
    return MLCNC(
        backbone=backbone,
        num_classes=num_classes,
        embed_dim=m.embed_dim,
        proj_dim=m.proj_dim,
        attention=m.attention,
        num_heads=m.num_heads,
        attention_dropout=m.attention_dropout,
        classifier=m.classifier,
        alpha=m.alpha,
        logit_scale_init=m.logit_scale_init,
        etf_seed=m.etf_seed,
        param_init=m.param_init,
        dtype=dtype,
    )
