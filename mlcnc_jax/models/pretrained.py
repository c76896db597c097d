"""Loads pre-trained weights into the Flax backbone: torchvision ResNets and this project's trunks.

torchvision's state-dict keys map one to one onto the module names of
`mlcnc_jax.models.resnet` (`layer1.0.downsample.1.running_var` ->
`batch_stats/layer1_0/downsample_1/var`). `.safetensors` files need only the
`safetensors` package; `.pth`/`.pt` files need torch.

A *trunk* file is this project's own `.safetensors` of a whole pre-trained model
(keys `params/backbone/...`, `batch_stats/backbone/...`, `params/classifier/...`), with
metadata saying what it is (see `save_trunk`); the built-in one ships in
`mlcnc_jax/trunks/`.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

# Keys of torchvision checkpoints that the trunk does not use.
_IGNORED = re.compile(r"^fc\.|\.num_batches_tracked$|^num_batches_tracked$")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict from disk as numpy arrays.

    Args:
        path: a `.safetensors` file (no torch needed) or a `.pth`/`.pt` file
            (needs torch). A checkpoint that wraps the weights in a 'state_dict' or
            'model' entry, or prefixes them with 'module.' (DataParallel), is unwrapped.

    Returns:
        Mapping from torchvision key to float32 array.

    Raises:
        FileNotFoundError: if the file does not exist.
        ImportError: for a .pth/.pt file when torch is not installed.
        ValueError: for any other file extension.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        raw: Mapping[str, Any] = load_file(path)
    elif ext in (".pth", ".pt"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"reading {path} needs torch (pip install torch), or convert the file to "
                ".safetensors first, which needs only the safetensors package"
            ) from e
        raw = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(raw, Mapping) and wrapper in raw and isinstance(raw[wrapper], Mapping):
                raw = raw[wrapper]
        raw = {k: v.detach().float().numpy() for k, v in raw.items() if hasattr(v, "numpy")}
    else:
        raise ValueError(f"unsupported weights file {path}: expected .safetensors, .pth or .pt")
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        out[key] = np.asarray(value, dtype=np.float32)
    return out


def _flax_module_path(torch_module: str) -> tuple[str, ...]:
    # "layer1.0.downsample.1" -> ("layer1_0", "downsample_1"); "bn1" -> ("bn1",)
    parts = torch_module.split(".")
    path: list[str] = []
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            path.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            path.append(parts[i])
            i += 1
    return tuple(path)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def convert_torchvision_resnet(state_dict: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Converts a torchvision ResNet state dict into `ResNet` variables.

    Args:
        state_dict: torchvision key -> array (see `load_state_dict`). `fc.*` and
            `num_batches_tracked` entries are ignored.

    Returns:
        {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays for
        the `ResNet` module.

    Raises:
        ValueError: for a key that is not part of a torchvision ResNet.
    """
    params: dict = {}
    stats: dict = {}
    for key, value in state_dict.items():
        if _IGNORED.search(key):
            continue
        if "." not in key:
            raise ValueError(f"unexpected key {key!r} in a torchvision ResNet state dict")
        module, leaf = key.rsplit(".", 1)
        path = _flax_module_path(module)
        value = np.asarray(value, dtype=np.float32)
        if leaf == "weight" and value.ndim == 4:
            # torch conv [out, in, kh, kw] -> flax [kh, kw, in, out]
            _set(params, (*path, "kernel"), np.transpose(value, (2, 3, 1, 0)))
        elif leaf == "weight" and value.ndim == 1:
            _set(params, (*path, "scale"), value)
        elif leaf == "bias" and value.ndim == 1:
            _set(params, (*path, "bias"), value)
        elif leaf == "running_mean":
            _set(stats, (*path, "mean"), value)
        elif leaf == "running_var":
            _set(stats, (*path, "var"), value)
        else:
            raise ValueError(
                f"unexpected key {key!r} (shape {value.shape}) in a torchvision ResNet state dict"
            )
    return {"params": params, "batch_stats": stats}


def _check_same_tree(path: str, collection: str, expected: Any, loaded: Any) -> None:
    exp = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    got = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(loaded)
    }
    missing = sorted(set(exp) - set(got))
    unexpected = sorted(set(got) - set(exp))
    mismatched = [
        f"{k}: model {exp[k]} vs file {got[k]}"
        for k in sorted(set(exp) & set(got))
        if exp[k] != got[k]
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"pretrained weights {path} do not fit the configured backbone ({collection}):",
        ]
        for title, items in (
            ("missing in file", missing),
            ("not in model", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                shown = ", ".join(items[:5]) + (
                    f", ... ({len(items)} in all)" if len(items) > 5 else ""
                )
                lines.append(f"  {title}: {shown}")
        lines.append("  Check that config.model.backbone matches the architecture of the weights.")
        raise ValueError("\n".join(lines))


TRUNK_FORMAT = "mlcnc_jax.trunk/1"


def save_trunk(path: str, variables: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Writes a model's params and batch statistics as a trunk `.safetensors` file.

    Args:
        path: output file.
        variables: model variables ({'params': ..., 'batch_stats': ...}); the backbone must be
            the submodule named 'backbone'.
        metadata: strings stored in the file's header (backbone name, image size, classes,
            the command that made it, its score).
    """
    from safetensors.numpy import save_file

    flat = {}
    for collection in ("params", "batch_stats"):
        for keys, value in flax.traverse_util.flatten_dict(
            flax.core.unfreeze(variables.get(collection, {}))
        ).items():
            flat["/".join((collection, *keys))] = np.ascontiguousarray(value, np.float32)
    save_file(flat, path, metadata={**metadata, "format": TRUNK_FORMAT})


def read_trunk(path: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The variables and metadata of a trunk file, or None for any other weights file."""
    path = os.path.expanduser(path)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        metadata = dict(f.metadata() or {})
        if metadata.get("format") != TRUNK_FORMAT:
            return None
        flat = {tuple(k.split("/")): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return flax.traverse_util.unflatten_dict(flat), metadata


def load_pretrained_backbone(path: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Replaces the backbone of a model's variables with torchvision weights.

    Args:
        path: `.safetensors`/`.pth`/`.pt` file of a torchvision ResNet, or a trunk file
            of this project (`save_trunk`).
        variables: full model variables (from `model.init`) with the backbone under
            params['backbone'] and batch_stats['backbone'].

    Returns:
        A copy of `variables` whose backbone params and batch statistics come from
        the file (float32); every other entry is unchanged.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if names or shapes in the file do not match the backbone.
    """
    variables = flax.core.unfreeze(variables)
    for collection in ("params", "batch_stats"):
        if "backbone" not in variables.get(collection, {}):
            raise ValueError(
                f"variables have no {collection}['backbone'] to load {path} into; pass the "
                "variables of a model whose backbone submodule is named 'backbone'"
            )
    trunk = read_trunk(path)
    if trunk is not None:
        converted = {c: trunk[0].get(c, {}).get("backbone", {}) for c in ("params", "batch_stats")}
    else:
        converted = convert_torchvision_resnet(load_state_dict(path))
    out = dict(variables)
    for collection in ("params", "batch_stats"):
        _check_same_tree(path, collection, variables[collection]["backbone"], converted[collection])
        new = dict(variables[collection])
        new["backbone"] = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float32), converted[collection]
        )
        out[collection] = new
    return out
