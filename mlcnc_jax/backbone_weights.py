"""Where a run's pre-trained weights come from, and how they replace the fresh backbone.

`config.model.pretrained` names torchvision ImageNet weights, a CLIP image encoder, Google's
or timm's ImageNet-21k ViT weights, a trunk file of this project, or the workdir of an
earlier run (e.g. configs/pretrain.py); `check_pretrained_path` refuses a missing one before
any data is read, saying where such weights come from.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from mlcnc_jax import checkpoint
from mlcnc_jax.models import clip, make_backbone, pretrained, vit


def pretrained_path(config: ml_collections.ConfigDict) -> str:
    """config.model.pretrained, or '' for a run from scratch ('' or 'none')."""
    path = str(config.model.pretrained)
    return "" if path.strip().lower() in ("", "none") else path


def _clip_backbone(config: ml_collections.ConfigDict) -> vit.ViT | None:
    # The configured backbone when it is a CLIP-layout ViT (CLIP's ln_pre, bias-free patch
    # convolution): building the module is cheap (no weights) and covers registered ones.
    try:
        backbone = make_backbone(config.model.backbone)
    except ValueError:
        return None
    if isinstance(backbone, vit.ViT) and backbone.ln_pre and not backbone.patch_bias:
        return backbone
    return None


def check_pretrained_path(config: ml_collections.ConfigDict) -> None:
    """Fails at once, saying where the weights go, when config.model.pretrained is missing."""
    path = pretrained_path(config)
    if not path or os.path.exists(os.path.expanduser(path)):
        return
    from mlcnc_jax.models import vit_weights

    if config.model.backbone in vit_weights.IMAGENET_VITS:  # Google's or timm's weights
        raise FileNotFoundError(
            vit_weights.missing_weights_message(os.path.expanduser(path), config.model.backbone)
            + " Or train from scratch with --config.model.pretrained=none."
        )
    backbone = _clip_backbone(config)
    if backbone is not None:
        raise FileNotFoundError(
            clip.missing_weights_message(
                os.path.expanduser(path), clip.architecture_of(backbone), config.model.backbone
            )
            + " Or train from scratch with --config.model.pretrained=none."
        )
    raise FileNotFoundError(
        f"Pretrained backbone weights not found: {path}. config.model.pretrained names either "
        f"torchvision's ImageNet weights for {config.model.backbone} (.safetensors, or .pth with "
        "torch installed; see README, 'Real benchmarks') or the workdir of a "
        "configs/pretrain.py run (built-in data). Put them there, pass "
        "--config.model.pretrained=PATH, or train from scratch with --config.model.pretrained=none."
    )


def _is_vit(backbone_params: Any, backbone: nn.Module | None) -> bool:
    if backbone is not None:
        return isinstance(backbone, vit.ViT)
    return "positional_embedding" in backbone_params and "conv1" in backbone_params


def load_pretrained(variables: dict, path: str, backbone: nn.Module | None = None) -> dict:
    """Replaces the backbone weights: torchvision or CLIP file, or a workdir of this project.

    A workdir's latest checkpoint gives its backbone (e.g. a CPU backbone
    pre-trained on other classes); a trunk file of this project its backbone; for a
    ViT backbone a file is a CLIP image encoder (`models.clip.load_clip_backbone`),
    otherwise torchvision ImageNet weights (.safetensors / .pth).

    Args:
      variables: the model's freshly initialised variables.
      path: the weights (config.model.pretrained).
      backbone: the configured backbone module, so that a CLIP file's architecture is
        checked against it (heads, ln_pre, patch bias: what shapes cannot show); without
        it a ViT is recognised from its parameters.
    """
    path = os.path.expanduser(path)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        target = variables["params"]["backbone"]
        if pretrained.read_trunk(path) is None and _is_vit(target, backbone):
            from mlcnc_jax.models import vit_weights

            if vit_weights.is_standard_vit(backbone):
                return vit_weights.load_vit_backbone(path, variables, backbone)
            return clip.load_clip_backbone(path, variables, backbone)
        return pretrained.load_pretrained_backbone(path, variables)
    source_ckpt = checkpoint.Checkpointer(os.path.abspath(path), {})
    if source_ckpt.latest_step() is None:
        raise FileNotFoundError(
            f"config.model.pretrained={path} has no checkpoint under {path}/checkpoints."
        )
    saved = source_ckpt.restore_variables(check=False)
    variables = dict(variables)
    mismatch = ValueError(
        f"The backbone in {path} does not match config.model.backbone="
        "(different architecture or width): pre-train with the same backbone."
    )
    for collection in ("params", "batch_stats"):
        # A backbone without batch statistics (a ViT) has none on either side.
        target = variables.get(collection, {}).get("backbone")
        source = (saved.get(collection) or {}).get("backbone")
        if target is None and not source:
            continue
        if target is None or source is None:
            raise mismatch
        if jax.tree.structure(target) != jax.tree.structure(source) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(source))
        ):
            raise mismatch
        variables[collection] = {
            **variables[collection],
            "backbone": jax.tree.map(jnp.asarray, source),
        }
    return variables
