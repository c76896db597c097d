"""Converts OpenAI CLIP / open_clip ViT image encoders into the Flax `ViT`.

Key mapping (torch -> Flax, under the backbone's params):

    conv1.weight [C, 3, p, p]                -> conv1/kernel [p, p, 3, C]  (OIHW -> HWIO)
    class_embedding [C]                      -> class_embedding
    positional_embedding [1 + g*g, C]        -> positional_embedding
    ln_pre / ln_post .weight, .bias          -> ln_pre / ln_post scale, bias
    transformer.resblocks.{i}.ln_1, ln_2     -> resblocks_{i}/ln_1, ln_2
    ....attn.in_proj_weight [3C, C], _bias   -> resblocks_{i}/attn/{q,k,v}_proj (split, transposed)
    ....attn.out_proj                        -> resblocks_{i}/attn/out_proj (transposed)
    ....mlp.c_fc, mlp.c_proj                 -> resblocks_{i}/mlp/c_fc, c_proj (transposed)
    proj [C, D]                              -> proj (CLIP computes x @ proj: no transpose)

A full CLIP model's keys carry the prefix `visual.` (the text tower's
`transformer.*`, `token_embedding.*`, ... are then ignored); a visual-only file has
no prefix. A DataParallel `module.` prefix and a 'state_dict' / 'model' wrapper are
removed. Half-precision files (OpenAI ships fp16) are read as float32.

The architecture is read from the weights (width, layers, patch size, image
resolution from the positional embedding, heads = width / 64 as in CLIP) and
checked against the configured backbone. The activation is not visible in the
weights: OpenAI's models and open_clip's '-quickgelu' ones need QuickGELU (the
`clip_vit_*` variants), open_clip's own LAION trainings plain GELU
(`openclip_vit_*`). CLIP's ModifiedResNet image encoders are not supported.
"""

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mlcnc_jax.models.pretrained import _check_same_tree, _set
from mlcnc_jax.models.vit import VIT_CONFIGS, ViT

# The width of one attention head in every CLIP ViT (OpenAI and open_clip defaults).
CLIP_HEAD_WIDTH = 64

_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_TOP_LEVEL = {
    "conv1.weight",
    "class_embedding",
    "positional_embedding",
    "ln_pre.weight",
    "ln_pre.bias",
    "ln_post.weight",
    "ln_post.bias",
    "proj",
}
_BLOCK_LEAVES = {
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
}

# Where the released weights of each architecture come from, for the missing-file message:
# OpenAI's file name and URL (CLIP's clip.py; the URL's last folder is the file's sha256).
_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_KNOWN_FILES = {
    (768, 16, 224): (
        "ViT-B-16.pt",
        f"{_OPENAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        "ViT-B-16",
    ),
    (768, 32, 224): (
        "ViT-B-32.pt",
        f"{_OPENAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        "ViT-B-32",
    ),
    (1024, 14, 224): (
        "ViT-L-14.pt",
        f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        "ViT-L-14",
    ),
    (1024, 14, 336): (
        "ViT-L-14-336px.pt",
        f"{_OPENAI}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/"
        "ViT-L-14-336px.pt",
        None,
    ),
}


@dataclasses.dataclass(frozen=True)
class ClipVisionArch:
    """Architecture of a CLIP ViT image encoder, as read from its weights.

    Attributes:
        width: token width C.
        layers: number of residual attention blocks.
        patch_size: patch side p.
        image_size: resolution of the positional embedding (grid * patch_size).
        heads: attention heads, width / 64 (CLIP's convention; not visible in the weights).
        mlp_dim: hidden width of the MLP.
        output_dim: width of `proj`, or None for a file without it.
    """

    width: int
    layers: int
    patch_size: int
    image_size: int
    heads: int
    mlp_dim: int
    output_dim: int | None

    def describe(self) -> str:
        """One line such as 'width 768, 12 layers, patch 16, 224 px, 12 heads, ...'."""
        return (
            f"width {self.width}, {self.layers} layers, patch {self.patch_size}, "
            f"{self.image_size} px, {self.heads} heads, MLP {self.mlp_dim}, "
            f"output dim {self.output_dim}"
        )


def missing_weights_message(path: str, arch: ClipVisionArch | None, backbone: str = "") -> str:
    """What to put at `path` for a CLIP backbone, where to get it and how to convert it.

    Args:
        path: the missing weights file.
        arch: the configured backbone's architecture (None: unknown).
        backbone: the configured backbone's name (config.model.backbone), for the message.

    Returns:
        The message of the FileNotFoundError.
    """
    what = "a CLIP image encoder"
    source = "a .pt file"
    if arch is not None:
        named = f" {backbone}" if backbone else ""
        what = f"the CLIP ViT of the backbone{named} ({arch.describe()})"
        known = _KNOWN_FILES.get((arch.width, arch.patch_size, arch.image_size))
        if known:
            name, url, open_clip_name = known
            what += f": OpenAI's {name} ({url})"
            if open_clip_name:
                what += f" or open_clip's {open_clip_name} open_clip_model.safetensors"
            source = name
    return (
        f"CLIP weights not found: {path}. Put there {what}: the state dict of a full CLIP model "
        "(keys 'visual.*') or of its visual tower alone, as .safetensors, or as the released "
        ".pt / a .pth / .bin when torch is installed. To make the .safetensors once (needs "
        'torch): python -c "import torch, safetensors.torch as s; '
        f"m = torch.jit.load('{source}', map_location='cpu'); "
        "s.save_file({k: v.float().contiguous() for k, v in m.state_dict().items() "
        f"if k.startswith('visual.')}}, '{path}')\". Weights are never downloaded at run time."
    )


def _missing_file_message(path: str, arch: ClipVisionArch | None) -> str:
    return missing_weights_message(path, arch)


def _torch_state_dict(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs torch (pip install torch), or convert the file to "
            ".safetensors first, which needs only the safetensors package"
        ) from e
    # OpenAI's released .pt files are TorchScript archives, which torch.load does not
    # read as a plain state dict; anything else is an ordinary pickled checkpoint.
    try:
        return torch.jit.load(path, map_location="cpu").state_dict()
    except (RuntimeError, ValueError):
        pass
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if hasattr(raw, "state_dict") and not isinstance(raw, Mapping):
        raw = raw.state_dict()
    return raw


def _safetensors_state_dict(path: str) -> Mapping[str, Any]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:
        # numpy has no bfloat16: read such files through jax, which has.
        from safetensors.flax import load_file as load_jax

        return {k: np.asarray(v.astype(jnp.float32)) for k, v in load_jax(path).items()}


def read_state_dict(path: str, missing_message: str = "") -> dict[str, np.ndarray]:
    """Reads a whole weights file as float32 numpy arrays (both CLIP towers, say).

    Args:
        path: `.safetensors` (no torch needed), or `.pt` / `.pth` / `.bin` (needs torch;
            TorchScript archives as OpenAI releases them, or pickled state dicts).
        missing_message: the message of the FileNotFoundError (default: names the path).

    Returns:
        Key -> float32 array, with a 'state_dict' / 'model' wrapper and a DataParallel
        `module.` prefix removed; entries that are not tensors are dropped.

    Raises:
        FileNotFoundError: if the file does not exist.
        ImportError: for a torch format when torch is not installed.
        ValueError: for another extension.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_message or f"weights file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        raw: Mapping[str, Any] = _safetensors_state_dict(path)
    elif ext in (".pt", ".pth", ".bin"):
        raw = _torch_state_dict(path)
        for wrapper in ("state_dict", "model"):
            if isinstance(raw, Mapping) and wrapper in raw and isinstance(raw[wrapper], Mapping):
                raw = raw[wrapper]
        raw = {k: v.detach().float().numpy() for k, v in raw.items() if hasattr(v, "detach")}
    else:
        raise ValueError(
            f"unsupported CLIP weights file {path}: expected .safetensors, .pt, .pth or .bin"
        )
    return {k.removeprefix("module."): np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def load_clip_state_dict(path: str, arch: ClipVisionArch | None = None) -> dict[str, np.ndarray]:
    """Reads the visual tower of a CLIP checkpoint as float32 numpy arrays.

    Args:
        path: `.safetensors` (no torch needed), or `.pt` / `.pth` / `.bin` (needs torch;
            TorchScript archives as OpenAI releases them, or pickled state dicts).
        arch: the expected architecture, only used to say which file is needed when
            `path` does not exist.

    Returns:
        Visual-tower key (without any 'visual.' prefix) -> float32 array.

    Raises:
        FileNotFoundError: if the file does not exist (the message says what to put there).
        ImportError: for a torch format when torch is not installed.
        ValueError: for another extension, or a file without a CLIP ViT visual tower.
    """
    path = os.path.expanduser(path)
    state = read_state_dict(path, _missing_file_message(path, arch))
    if any(k.startswith("visual.") for k in state):
        # A full CLIP model: the text tower also has 'transformer.resblocks.*' keys.
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if "conv1.weight" not in state or "positional_embedding" not in state:
        if any(k.startswith(("layer1.", "attnpool.")) for k in state):
            raise ValueError(
                f"{path} holds a CLIP ModifiedResNet image encoder, which is not supported; "
                "use a CLIP ViT (e.g. ViT-B-16)"
            )
        if any(k.startswith("trunk.") for k in state):
            raise ValueError(
                f"{path} holds an open_clip image encoder built on a timm trunk, which is not "
                "supported; use a CLIP ViT in OpenAI's layout (e.g. ViT-B-16)"
            )
        raise ValueError(
            f"{path} is not a CLIP ViT image encoder: no conv1.weight / positional_embedding "
            "(with or without the 'visual.' prefix)"
        )
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


def infer_clip_architecture(state_dict: Mapping[str, np.ndarray]) -> ClipVisionArch:
    """Reads the architecture of a CLIP ViT visual tower from its weights.

    Args:
        state_dict: visual-tower key (no 'visual.' prefix) -> array.

    Returns:
        The architecture; heads is width / 64, CLIP's convention.

    Raises:
        ValueError: if the positional embedding is not a class row plus a square grid.
    """
    conv = state_dict["conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    n = int(state_dict["positional_embedding"].shape[0]) - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"positional_embedding has {n} patch rows, not a square grid")
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    mlp = state_dict.get("transformer.resblocks.0.mlp.c_fc.weight")
    proj = state_dict.get("proj")
    return ClipVisionArch(
        width=width,
        layers=len(blocks),
        patch_size=patch,
        image_size=grid * patch,
        heads=max(width // CLIP_HEAD_WIDTH, 1),
        mlp_dim=int(mlp.shape[0]) if mlp is not None else 4 * width,
        output_dim=int(proj.shape[1]) if proj is not None else None,
    )


def architecture_of(backbone: ViT) -> ClipVisionArch:
    """The `ClipVisionArch` a `ViT` module is configured for."""
    return ClipVisionArch(
        width=backbone.width,
        layers=backbone.depth,
        patch_size=backbone.patch_size,
        image_size=(backbone.image_size // backbone.patch_size) * backbone.patch_size,
        heads=backbone.num_heads,
        mlp_dim=backbone.mlp_dim or 4 * backbone.width,
        output_dim=backbone.output_dim,
    )


def _matching_variants(arch: ClipVisionArch) -> list[str]:
    names = []
    for name, cfg in VIT_CONFIGS.items():
        if not cfg.get("ln_pre"):
            continue
        if architecture_of(ViT(**cfg)) == arch:
            names.append(name)
    return names


def _mismatches(arch: ClipVisionArch, want: ClipVisionArch) -> list[str]:
    return [
        f"{f.name}: weights {getattr(arch, f.name)} vs backbone {getattr(want, f.name)}"
        for f in dataclasses.fields(ClipVisionArch)
        if getattr(arch, f.name) != getattr(want, f.name)
    ]


def _raise_mismatch(arch: ClipVisionArch, diffs: list[str], path: str) -> None:
    lines = [
        f"CLIP weights {path or '(state dict)'} do not fit the configured backbone:",
        *(f"  {d}" for d in diffs),
        f"  the weights are: {arch.describe()}",
    ]
    variants = _matching_variants(arch)
    if variants:
        lines.append(f"  backbones with this architecture: {', '.join(variants)}")
    raise ValueError("\n".join(lines))


def check_clip_architecture(arch: ClipVisionArch, backbone: ViT, path: str = "") -> None:
    """Raises a ValueError naming every difference between the weights and the backbone.

    Args:
        arch: the architecture of the weights (`infer_clip_architecture`).
        backbone: the configured `ViT`.
        path: the weights file, for the message.

    Raises:
        ValueError: if width, layers, patch size, resolution, heads, MLP or output
            width differ, or the backbone lacks CLIP's ln_pre / bias-free patch conv.
    """
    diffs = _mismatches(arch, architecture_of(backbone))
    if not backbone.ln_pre:
        diffs.append("ln_pre: weights have it, backbone has ln_pre=False")
    if backbone.patch_bias:
        diffs.append("patch_bias: CLIP's patch convolution has no bias, backbone has one")
    if diffs:
        _raise_mismatch(arch, diffs, path)


def set_block_leaf(params: dict, block: str, leaf: str, value: np.ndarray) -> None:
    """Puts one torch leaf of a CLIP residual attention block into the Flax params.

    Args:
        params: the nested params being built.
        block: the Flax block name ('resblocks_3').
        leaf: the torch key below the block ('attn.in_proj_weight', 'mlp.c_fc.bias', ...).
        value: the float32 array.
    """
    if leaf == "attn.in_proj_weight":
        # Packed [q; k; v] rows of torch's MultiheadAttention, each [C, C] (out, in).
        for name, w in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
            _set(params, (block, "attn", name, "kernel"), w.T)
    elif leaf == "attn.in_proj_bias":
        for name, b in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
            _set(params, (block, "attn", name, "bias"), b)
    elif leaf.startswith("ln_"):
        module, kind = leaf.split(".")
        _set(params, (block, module, "scale" if kind == "weight" else "bias"), value)
    else:  # attn.out_proj, mlp.c_fc, mlp.c_proj: torch Linear [out, in] -> [in, out]
        *modules, kind = leaf.split(".")
        if kind == "weight":
            _set(params, (block, *modules, "kernel"), value.T)
        else:
            _set(params, (block, *modules, "bias"), value)


def convert_clip_visual(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Converts a CLIP ViT visual-tower state dict into `ViT` params.

    Args:
        state_dict: visual-tower key (no 'visual.' prefix) -> array, in OpenAI's layout.

    Returns:
        Nested dict of float32 numpy arrays: the 'params' collection of a CLIP `ViT`
        (ln_pre=True, patch_bias=False).

    Raises:
        ValueError: for a key that is not part of a CLIP ViT visual tower (e.g. open_clip's
            layer scale or attention pooling, which the `ViT` does not have).
    """
    params: dict = {}
    unknown = []
    for key, value in state_dict.items():
        value = np.asarray(value, dtype=np.float32)
        if key in _TOP_LEVEL:
            module, _, leaf = key.rpartition(".")
            if key == "conv1.weight":
                # torch conv [out, in, kh, kw] -> flax [kh, kw, in, out]
                _set(params, ("conv1", "kernel"), np.transpose(value, (2, 3, 1, 0)))
            elif module in ("ln_pre", "ln_post"):
                _set(params, (module, "scale" if leaf == "weight" else "bias"), value)
            else:  # class_embedding, positional_embedding, proj keep their layout
                params[key] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m is None or m.group(2) not in _BLOCK_LEAVES:
            unknown.append(key)
            continue
        set_block_leaf(params, f"resblocks_{m.group(1)}", m.group(2), value)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (
            f", ... ({len(unknown)} in all)" if len(unknown) > 8 else ""
        )
        raise ValueError(f"keys that are not part of a CLIP ViT visual tower: {shown}")
    return params


def _backbone_arch_from_params(params: Mapping[str, Any]) -> ClipVisionArch | None:
    # Read the configured backbone's architecture from its (possibly abstract) params,
    # so that a mismatch is named field by field even without the module at hand.
    try:
        kernel = params["conv1"]["kernel"]
        n = int(params["positional_embedding"].shape[0]) - 1
        width, patch = int(kernel.shape[-1]), int(kernel.shape[0])
        layers = sum(1 for k in params if re.fullmatch(r"resblocks_\d+", k))
        mlp = params["resblocks_0"]["mlp"]["c_fc"]["kernel"] if layers else None
    except (KeyError, TypeError):
        return None
    proj = params.get("proj")
    grid = math.isqrt(n)
    return ClipVisionArch(
        width=width,
        layers=layers,
        patch_size=patch,
        image_size=grid * patch,
        heads=max(width // CLIP_HEAD_WIDTH, 1),
        mlp_dim=int(mlp.shape[-1]) if mlp is not None else 4 * width,
        output_dim=int(proj.shape[1]) if proj is not None else None,
    )


def load_clip_params(path: str, backbone: ViT) -> dict[str, Any]:
    """Reads a CLIP checkpoint into the params of a standalone `ViT`.

    Args:
        path: CLIP weights file (see `load_clip_state_dict`).
        backbone: the `ViT` the params are for; its architecture is checked, heads
            included (CLIP uses width / 64).

    Returns:
        The 'params' collection (float32 jax arrays) for `backbone.apply`.

    Raises:
        FileNotFoundError: if the file does not exist (the message says what to put there).
        ValueError: if the weights do not fit `backbone`.
    """
    state = load_clip_state_dict(path, architecture_of(backbone))
    check_clip_architecture(infer_clip_architecture(state), backbone, path)
    params = convert_clip_visual(state)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


def load_clip_backbone(
    path: str, variables: Mapping[str, Any], backbone: ViT | None = None
) -> dict[str, Any]:
    """Replaces the backbone of a model's variables with a CLIP ViT image encoder.

    Args:
        path: CLIP weights file (see `load_clip_state_dict`).
        variables: full model variables (from `model.init`, possibly abstract) with the
            ViT backbone under params['backbone'].
        backbone: the configured `ViT`, when at hand, so that the number of heads and
            CLIP's ln_pre / bias-free patch convolution are checked too (the
            variables' shapes cannot show them).

    Returns:
        A copy of `variables` whose params['backbone'] comes from the file (float32);
        every other entry is unchanged.

    Raises:
        FileNotFoundError: if the file does not exist (the message says what to put there).
        ValueError: if the weights do not fit the backbone (each difference is named).
    """
    variables = flax.core.unfreeze(variables)
    if "backbone" not in variables.get("params", {}):
        raise ValueError(
            f"variables have no params['backbone'] to load {path} into; pass the variables "
            "of a model whose backbone submodule is named 'backbone'"
        )
    target = variables["params"]["backbone"]
    want = architecture_of(backbone) if backbone is not None else _backbone_arch_from_params(target)
    state = load_clip_state_dict(path, want)
    arch = infer_clip_architecture(state)
    if backbone is not None:
        check_clip_architecture(arch, backbone, path)
    elif want is not None and want != arch:
        _raise_mismatch(arch, _mismatches(arch, want), path)
    converted = convert_clip_visual(state)
    _check_same_tree(path, "params", target, converted)
    out = dict(variables)
    out["params"] = {
        **variables["params"],
        "backbone": jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), converted),
    }
    return out
