"""Backbones (a registry by name), model families (`families`) and `create_model`.

A backbone is any linen module called as `module(images, train)` on images
[B, H, W, 3] that returns tokens [B, N, C]. To add one, register a factory
`factory(dtype, axis_name) -> module` under a name, then select it with
`--config.model.backbone=NAME`:

    from mlcnc_jax import models

    models.register_backbone("my_net", lambda dtype, axis_name: MyNet(dtype=dtype))

`dtype` is the compute dtype (config.dtype); `axis_name` is the pmap axis over
which BatchNorm statistics are averaged (None under jit), for backbones that
have BatchNorm.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mlcnc_jax.models import resnet, vit
from mlcnc_jax.models.families import ModelFamily, family_names, get_family, register_family
from mlcnc_jax.models.mlcnc import MLCNC, Baseline
from mlcnc_jax.models.resnet import ResNet, get_backbone

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

BackboneFactory = Callable[[Any, "str | None"], nn.Module]
_BACKBONES: dict[str, BackboneFactory] = {}

__all__ = [
    "MLCNC",
    "Baseline",
    "ModelFamily",
    "ResNet",
    "backbone_names",
    "create_model",
    "family_names",
    "get_family",
    "get_backbone",
    "make_backbone",
    "register_backbone",
    "register_family",
]


def register_backbone(name: str, factory: BackboneFactory) -> BackboneFactory:
    """Registers `factory(dtype, axis_name) -> module` as the backbone `name`.

    Args:
      name: the value of config.model.backbone that selects it.
      factory: returns a linen module mapping (images [B, H, W, 3], train) to
        tokens [B, N, C].

    Returns:
      The factory, unchanged.
    """
    _BACKBONES[name] = factory
    return factory


def backbone_names() -> tuple[str, ...]:
    """The registered backbone names."""
    return tuple(_BACKBONES)


def make_backbone(name: str, dtype: Any = jnp.float32, axis_name: str | None = None) -> nn.Module:
    """The registered backbone `name`, built for `dtype` and `axis_name`."""
    if name not in _BACKBONES:
        raise ValueError(
            f"unknown model.backbone {name!r}; valid: {', '.join(_BACKBONES)} "
            "(models.register_backbone adds one)"
        )
    return _BACKBONES[name](dtype, axis_name)


def _resnet_factory(name: str, dtype: Any, axis_name: str | None) -> nn.Module:
    return get_backbone(name, dtype=dtype, axis_name=axis_name)


def _vit_factory(name: str, dtype: Any, axis_name: str | None) -> nn.Module:
    return vit.get_vit(name, dtype=dtype, axis_name=axis_name)


for _name in resnet.BACKBONES:
    register_backbone(_name, functools.partial(_resnet_factory, _name))
for _name in vit.VIT_BACKBONES:
    register_backbone(_name, functools.partial(_vit_factory, _name))
for _name in vit.HYBRID_CONFIGS:
    register_backbone(_name, functools.partial(vit.get_hybrid_vit, _name))


def create_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    axis_name: str | None = None,
    backbone: nn.Module | None = None,
) -> nn.Module:
    """Builds the model described by `config.model` and `config.dtype`.

    Args:
        config: project config (schema in mlcnc_jax/configuration/_schema.py).
        num_classes: K.
        axis_name: device axis for BatchNorm statistics under jax.pmap, or None.
        backbone: a module mapping (images, train) to tokens [B, N, C], used instead of
            the registered `config.model.backbone` (see `register_backbone`).

    Returns:
        The module of the model family `config.model.name` (see `families`).

    Raises:
        ValueError: for an unknown model name, backbone, dtype, attention or classifier,
            or text embeddings (classifier='text') of the wrong shape.
        FileNotFoundError: for classifier='text' without its text-embeddings file.
    """
    m = config.model
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; valid: {', '.join(DTYPES)}")
    family = get_family(m.name)
    dtype = DTYPES[config.dtype]
    if backbone is None:
        backbone = make_backbone(m.backbone, dtype=dtype, axis_name=axis_name)
    return family.make(config, num_classes, backbone, dtype)
