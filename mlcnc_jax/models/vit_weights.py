"""ImageNet-21k weights for the standard `vit_*` backbones: Google's .npz and timm's naming.

Google's checkpoints (the vision_transformer and big_vision releases, e.g. the AugReg
`B_16-i21k-300ep-...npz`), keys under an optional 'opt/target/' or 'params/' prefix:

    embedding/kernel [p, p, 3, C], /bias                     -> conv1/kernel, bias (HWIO already)
    cls [1, 1, C]                                            -> class_embedding [C]
    Transformer/posembed_input/pos_embedding [1, 1+N, C]     -> positional_embedding [1+N, C]
      (big_vision: pos_embedding at the top level)
    Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_2    -> resblocks_{i}/ln_1, ln_2
    .../MultiHeadDotProductAttention_1/{query,key,value}     -> attn/{q,k,v}_proj
        kernel [C, H, Dh], bias [H, Dh]                         (heads flattened: [C, C], [C])
    .../MultiHeadDotProductAttention_1/out kernel [H, Dh, C] -> attn/out_proj [C, C]
    .../MlpBlock_3/Dense_0, Dense_1                          -> mlp/c_fc, c_proj
    Transformer/encoder_norm                                 -> ln_post
      (big_vision numbers the sub-modules MultiHeadDotProductAttention_0, MlpBlock_0,
       LayerNorm_0 / LayerNorm_1, and may stack the blocks as Transformer/encoderblock/...
       with the block index first)

timm's VisionTransformer state dict (its .safetensors on the hub, or a .pth / .bin):

    patch_embed.proj.weight [C, 3, p, p], .bias   -> conv1 (OIHW -> HWIO)
    cls_token [1, 1, C], pos_embed [1, 1+N, C]    -> class_embedding, positional_embedding
    blocks.{i}.norm1, norm2                       -> resblocks_{i}/ln_1, ln_2
    blocks.{i}.attn.qkv.weight [3C, C], .bias     -> attn/{q,k,v}_proj (split, transposed)
    blocks.{i}.attn.proj, mlp.fc1, mlp.fc2        -> attn/out_proj, mlp/c_fc, c_proj (transposed)
    norm                                          -> ln_post

The classification head (`head`, `pre_logits`) is not part of the trunk and is ignored.
A checkpoint whose patch grid differs from the backbone's (`image_size // patch_size`) has
its positional grid resized at load with the backbone's `pos_interpolation` (torch's
bicubic by default, `vit.resize_matrix`). Registers, layer scale, pooling heads and
models without a class token are refused by name.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mlcnc_jax.models import clip
from mlcnc_jax.models.pretrained import _check_same_tree, _set
from mlcnc_jax.models.vit import ViT, interpolate_pos_embedding

_GCS = "gs://vit_models"
# backbone -> (Google's ImageNet-21k .npz, timm's name on the Hugging Face hub).
KNOWN_CHECKPOINTS = {
    "vit_ti16": (
        f"{_GCS}/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
        "timm/vit_tiny_patch16_224.augreg_in21k",
    ),
    "vit_s16": (
        f"{_GCS}/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
        "timm/vit_small_patch16_224.augreg_in21k",
    ),
    "vit_b16": (
        f"{_GCS}/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz "
        f"(or the original {_GCS}/imagenet21k/ViT-B_16.npz)",
        "timm/vit_base_patch16_224.augreg_in21k",
    ),
    "vit_b32": (
        f"{_GCS}/augreg/B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0.npz "
        f"(or the original {_GCS}/imagenet21k/ViT-B_32.npz)",
        "timm/vit_base_patch32_224.augreg_in21k",
    ),
}

# The ImageNet-sized standard ViTs (models/vit.py), whose weights come from these releases.
IMAGENET_VITS = ("vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l14")

_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_GOOGLE_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_IGNORED_PREFIXES = ("head", "pre_logits", "fc_norm.")  # classifier, not the trunk


def missing_weights_message(path: str, backbone_name: str) -> str:
    """What to put at `path` for a standard ViT backbone and where such files come from."""
    known = KNOWN_CHECKPOINTS.get(backbone_name)
    where = (
        f"Google's ImageNet-21k checkpoint {known[0]}, or timm's {known[1]} (its model.safetensors)"
        if known
        else "Google's ImageNet-21k .npz (vision_transformer / big_vision releases, "
        f"{_GCS}/augreg/...) or a timm VisionTransformer state dict of the same size"
    )
    return (
        f"ViT weights not found: {path}. For the backbone {backbone_name} put there {where}. "
        "Google's .npz is read as it is; timm's as .safetensors (or .pth / .bin with torch). "
        "A checkpoint for another image size has its position embedding resized at load. "
        "Weights are never downloaded at run time."
    )


def _google_state(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        raw = {k: np.asarray(f[k]) for k in f.files}
    for prefix in ("opt/target/", "params/img/", "params/"):
        if f"{prefix}embedding/kernel" in raw:
            raw = {k.removeprefix(prefix): v for k, v in raw.items() if k.startswith(prefix)}
            break
    if "Transformer/encoderblock/LayerNorm_0/scale" in raw:  # scanned: block index first
        stacked = {k: v for k, v in raw.items() if k.startswith("Transformer/encoderblock/")}
        raw = {k: v for k, v in raw.items() if k not in stacked}
        for key, value in stacked.items():
            leaf = key.removeprefix("Transformer/encoderblock/")
            for i in range(value.shape[0]):
                raw[f"Transformer/encoderblock_{i}/{leaf}"] = value[i]
    return {k: v.astype(np.float32) for k, v in raw.items()}


def read_vit_state(path: str, backbone_name: str = "") -> tuple[str, dict[str, np.ndarray]]:
    """Reads a ViT checkpoint: ('google', npz arrays) or ('timm', state dict).

    Raises:
        FileNotFoundError: a missing file (the message says what to put there).
        ValueError: a file that is neither layout.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path, backbone_name))
    if path.lower().endswith(".npz"):
        state = _google_state(path)
        if "embedding/kernel" not in state:
            raise ValueError(
                f"{path} is not a Google ViT checkpoint: no embedding/kernel (with or without "
                "an 'opt/target/' or 'params/' prefix)"
            )
        return "google", state
    state = clip.read_state_dict(path)
    if "patch_embed.proj.weight" not in state:
        raise ValueError(
            f"{path} is not a timm VisionTransformer: no patch_embed.proj.weight (Google's "
            "checkpoints are read from their .npz)"
        )
    return "timm", state


def _heads_flat(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1) if w.ndim == 3 else w.reshape(-1)


def convert_google(state: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], int | None]:
    """Google .npz arrays -> `ViT` params; also the heads the kernels show (None: no blocks)."""
    params: dict = {}
    unknown, heads = [], None
    big_vision = "pos_embedding" in state
    attn, mlp, ln2 = (
        ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
        if big_vision
        else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    )
    for key, value in state.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if key in ("embedding/kernel", "embedding/bias"):
            _set(params, ("conv1", key.split("/")[1]), value)
        elif key == "cls":
            params["class_embedding"] = value.reshape(-1)
        elif key in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
            params["positional_embedding"] = value.reshape(-1, value.shape[-1])
        elif key.startswith("Transformer/encoder_norm/"):
            _set(params, ("ln_post", key.rsplit("/", 1)[1]), value)
        elif m := _GOOGLE_BLOCK.match(key):
            block, leaf = f"resblocks_{m.group(1)}", m.group(2)
            module, _, kind = leaf.rpartition("/")
            if module in ("LayerNorm_0", ln2):
                _set(params, (block, "ln_1" if module == "LayerNorm_0" else "ln_2", kind), value)
            elif module.startswith(f"{attn}/"):
                name = module.split("/")[1]
                if name == "out":  # kernel [H, Dh, C] -> [C_in = H * Dh, C]
                    w = value.reshape(-1, value.shape[-1]) if kind == "kernel" else value
                    _set(params, (block, "attn", "out_proj", kind), w)
                elif name in ("query", "key", "value"):
                    if kind == "kernel":
                        heads = int(value.shape[1])
                    _set(params, (block, "attn", f"{name[0]}_proj", kind), _heads_flat(value))
                else:
                    unknown.append(key)
            elif module in (f"{mlp}/Dense_0", f"{mlp}/Dense_1"):
                name = "c_fc" if module.endswith("0") else "c_proj"
                _set(params, (block, "mlp", name, kind), value)
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    _refuse(unknown, "a Google ViT checkpoint")
    return params, heads


def convert_timm(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """timm VisionTransformer state dict -> `ViT` params."""
    params: dict = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if key == "patch_embed.proj.weight":  # OIHW -> HWIO
            _set(params, ("conv1", "kernel"), np.transpose(value, (2, 3, 1, 0)))
        elif key == "patch_embed.proj.bias":
            _set(params, ("conv1", "bias"), value)
        elif key == "cls_token":
            params["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            params["positional_embedding"] = value.reshape(-1, value.shape[-1])
        elif key in ("norm.weight", "norm.bias"):
            _set(params, ("ln_post", "scale" if key.endswith("weight") else "bias"), value)
        elif m := _TIMM_BLOCK.match(key):
            block, leaf = f"resblocks_{m.group(1)}", m.group(2)
            module, _, kind = leaf.rpartition(".")
            if module == "attn.qkv":
                parts = np.split(value, 3, axis=0)
                for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                    w = part.T if kind == "weight" else part
                    _set(params, (block, "attn", name, "kernel" if kind == "weight" else "bias"), w)
                continue
            target = {
                "norm1": ("ln_1",),
                "norm2": ("ln_2",),
                "attn.proj": ("attn", "out_proj"),
                "mlp.fc1": ("mlp", "c_fc"),
                "mlp.fc2": ("mlp", "c_proj"),
            }.get(module)
            if target is None or kind not in ("weight", "bias"):
                unknown.append(key)
            elif target[0].startswith("ln_"):
                _set(params, (block, *target, "scale" if kind == "weight" else "bias"), value)
            else:
                w = value.T if kind == "weight" else value
                _set(params, (block, *target, "kernel" if kind == "weight" else "bias"), w)
        else:
            unknown.append(key)
    _refuse(unknown, "a timm VisionTransformer of this project's ViT")
    return params


def _refuse(unknown: list[str], what: str) -> None:
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (
            f", ... ({len(unknown)} in all)" if len(unknown) > 8 else ""
        )
        raise ValueError(
            f"keys that are not part of {what} (registers, layer scale, pooling heads and "
            f"models without a class token are not supported): {shown}"
        )


def _fit_to(params: dict, backbone: ViT, heads: int | None, path: str) -> dict:
    # Check the architecture against the backbone; resize the positional grid if needed.
    diffs = []
    if "class_embedding" not in params:
        diffs.append("class token: the weights have none (a global-pooling ViT)")
    kernel = params.get("conv1", {}).get("kernel")
    if kernel is None:
        raise ValueError(f"{path}: no patch embedding")
    width, patch = int(kernel.shape[-1]), int(kernel.shape[0])
    layers = sum(1 for k in params if re.fullmatch(r"resblocks_\d+", k))
    mlp = params["resblocks_0"]["mlp"]["c_fc"]["kernel"].shape[1] if layers else None
    want_mlp = backbone.mlp_dim or 4 * backbone.width
    for name, got, want in (
        ("width", width, backbone.width),
        ("layers", layers, backbone.depth),
        ("patch_size", patch, backbone.patch_size),
        ("mlp_dim", mlp, want_mlp),
    ):
        if got != want:
            diffs.append(f"{name}: weights {got} vs backbone {want}")
    if heads is not None and heads != backbone.num_heads:
        diffs.append(f"heads: weights {heads} vs backbone {backbone.num_heads}")
    if backbone.ln_pre or not backbone.patch_bias or backbone.output_dim is not None:
        diffs.append("the backbone is CLIP-layout (ln_pre / no patch bias / proj): use a vit_*")
    if diffs:
        raise ValueError(
            f"ViT weights {path} do not fit the configured backbone:\n"
            + "\n".join(f"  {d}" for d in diffs)
        )
    pos = params["positional_embedding"]
    grid = backbone.image_size // backbone.patch_size
    n = pos.shape[0] - 1
    if math.isqrt(n) ** 2 != n:
        raise ValueError(f"{path}: the position embedding has {n} patch rows, not a square grid")
    if n != grid * grid:
        params["positional_embedding"] = np.asarray(
            interpolate_pos_embedding(jnp.asarray(pos), (grid, grid), backbone.pos_interpolation)
        )
    return params


def load_vit_params(path: str, backbone: ViT, backbone_name: str = "") -> dict[str, Any]:
    """Reads a Google .npz or timm ViT checkpoint into the params of `backbone`.

    Args:
        path: the checkpoint (.npz: Google's; .safetensors / .pth / .bin: timm's).
        backbone: the configured standard `ViT` (patch bias, no ln_pre, no proj).
        backbone_name: its name (config.model.backbone), for the missing-file message.

    Returns:
        The 'params' collection (float32 jax arrays).

    Raises:
        FileNotFoundError: a missing file (the message names it and where to get it).
        ValueError: weights that do not fit the backbone (each difference named).
    """
    kind, state = read_vit_state(path, backbone_name)
    if kind == "google":
        params, heads = convert_google(state)
    else:
        params, heads = convert_timm(state), None
    params = _fit_to(params, backbone, heads, path)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def is_standard_vit(backbone: Any) -> bool:
    """Whether `backbone` is a standard (timm / Google layout) ViT, not CLIP's."""
    return isinstance(backbone, ViT) and backbone.patch_bias and not backbone.ln_pre


def load_vit_backbone(
    path: str, variables: Mapping[str, Any], backbone: ViT, backbone_name: str = ""
) -> dict[str, Any]:
    """Replaces params['backbone'] of a model's variables with the checkpoint's ViT trunk.

    Raises:
        FileNotFoundError, ValueError: as `load_vit_params`.
    """
    variables = flax.core.unfreeze(variables)
    target = variables["params"]["backbone"]
    params = load_vit_params(path, backbone, backbone_name)
    _check_same_tree(path, "params", target, params)
    out = dict(variables)
    out["params"] = {**variables["params"], "backbone": params}
    return out
