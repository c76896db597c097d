"""Class text embeddings for the text classifier (config.model.classifier='text').

The embeddings are a `.npy` array [K, d] of one embedding per class, in the dataset's
class order: e.g. CLIP's text embeddings of 'a photo of a {name}'. Either
config.model.text_embeddings names such a file made elsewhere, or (when it is empty)
config.model.class_prompts turns the dataset's class names into prompts that CLIP's text
tower (`clip_text`, from config.model.text_weights or else config.model.pretrained)
embeds once at the start of a run (`prepare_class_text`); the array is stored in the
workdir (class_text_embeddings.npy, with what made it in class_text_embeddings.json) and
config.model.text_embeddings then names it, in the config.json the run saves, so
evaluation and prediction read the stored file without the text tower.

The MLC-NC model turns the L2-normalised rows into a frozen classifier with the same
place and shape as the ETF classifier V [K*p, K] (`etf.gram_frame`): its columns have
the pairwise cosines of the text embeddings instead of the ETF's -1/(K-1), so the
two geometries are compared with everything else equal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

CLASS_TEXT_FILE = "class_text_embeddings.npy"
CLASS_TEXT_RECORD = "class_text_embeddings.json"

# How to make the file elsewhere, for the missing-file message.
MAKE_TEXT_EMBEDDINGS = (
    "Or leave config.model.text_embeddings empty and set config.model.class_prompts (e.g. "
    "\"('a photo of a {}.',)\"): the class names are then embedded at start with the CLIP "
    "text tower of config.model.text_weights (default: config.model.pretrained). "
    "To make it elsewhere with OpenAI's CLIP package (pip install git+https://github.com/openai/CLIP): "
    "python -c \"import clip, numpy, torch; m, _ = clip.load('ViT-B/16', device='cpu'); "
    "names = [...]; t = clip.tokenize([f'a photo of a {n}' for n in names]); "
    "numpy.save('FILE.npy', m.encode_text(t).float().detach().numpy())\" "
    "with names the dataset's class names in its class order ('class_names' in the last "
    "line of --mode=data_stats)."
)


def load_text_embeddings(
    path: str, num_classes: int, *, dataset: str = "", joint_dim: int | None = None
) -> np.ndarray:
    """Reads, checks and L2-normalises the class text embeddings.

    Args:
      path: the `.npy` file (config.model.text_embeddings).
      num_classes: K, the dataset's number of classes.
      dataset: the dataset's name (config.data.name), for the messages.
      joint_dim: the width of the backbone's image-text space (a CLIP ViT's `proj`
        output, 512 for ViT-B/16), which embeddings of the same CLIP have; None when the
        backbone has no such space (any d is accepted then).

    Returns:
      float32 [K, d], every row of unit norm.

    Raises:
      FileNotFoundError: when no path is set or the file is missing (the message says how
        to make it).
      ValueError: for an array that is not [K, d], a d other than `joint_dim`, or rows that
        are zero or not finite.
    """
    of = f" of {dataset}" if dataset else ""
    if not path:
        raise FileNotFoundError(
            "config.model.classifier='text' needs config.model.text_embeddings=FILE.npy: one "
            f"text embedding per class{of} ([{num_classes}, d]). {MAKE_TEXT_EMBEDDINGS}"
        )
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(
            f"Text embeddings not found: {full} (config.model.text_embeddings). Put there a "
            f".npy array [{num_classes}, d], one text embedding per class{of} in the "
            f"dataset's class order. {MAKE_TEXT_EMBEDDINGS}"
        )
    try:
        array = np.load(full, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{full} is not a .npy array of text embeddings: {e}") from e
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"Text embeddings {full} have shape {array.shape} and dtype {array.dtype}: expected "
            f"a float array [{num_classes}, d], one row per class{of}."
        )
    rows, d = array.shape
    if rows != num_classes:
        raise ValueError(
            f"Text embeddings {full} have {rows} rows, but the dataset{of} has K = "
            f"{num_classes} classes: one row per class, in the dataset's class order."
        )
    if joint_dim is not None and d != joint_dim:
        raise ValueError(
            f"Text embeddings {full} are {d}-dimensional, but the backbone's image-text space "
            f"is {joint_dim}-dimensional: make them with the text tower of the same CLIP as "
            "the image encoder (config.model.backbone)."
        )
    array = array.astype(np.float64)
    norms = np.linalg.norm(array, axis=1)
    bad = [i for i in range(rows) if not np.isfinite(norms[i]) or norms[i] == 0]
    if bad:
        raise ValueError(
            f"Text embeddings {full}: rows {bad[:10]} are zero or not finite (every class "
            "needs a direction)."
        )
    return (array / norms[:, None]).astype(np.float32)


def needs_class_names(config: ml_collections.ConfigDict) -> bool:
    """Whether the run embeds the class names (text classifier or zero-shot, no .npy given)."""
    m = config.model
    uses_text = m.classifier == "text" or bool(m.get("zero_shot", False))
    return uses_text and not str(m.text_embeddings).strip() and bool(m.get("class_prompts", ()))


def text_weights_path(config: ml_collections.ConfigDict) -> str:
    """The CLIP file the text tower is read from: model.text_weights, else model.pretrained."""
    path = str(config.model.get("text_weights", "")).strip() or str(config.model.pretrained)
    return "" if path.strip().lower() in ("", "none") else os.path.expanduser(path)


def check_text_weights(config: ml_collections.ConfigDict) -> None:
    """Fails before any data is read when the class names need a text tower that is missing.

    Raises:
        FileNotFoundError: no weights file is configured, or it does not exist.
    """
    if not needs_class_names(config):
        return
    path = text_weights_path(config)
    if not path:
        raise FileNotFoundError(
            "config.model.class_prompts embeds the class names with CLIP's text tower, but "
            "no CLIP weights are configured: set config.model.text_weights (or "
            "config.model.pretrained) to the whole CLIP model's file, or give the embeddings "
            "as config.model.text_embeddings=FILE.npy."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP weights for the text tower not found: {path} (config.model.text_weights, "
            "or config.model.pretrained when that is empty). Put there the whole CLIP "
            "model's weights (OpenAI's ViT-B-16.pt, or its state dict as .safetensors with "
            "every key, 'visual.*' and the text tower's); weights are never downloaded."
        )


def _activation(backbone_name: str) -> str:
    # The text tower's activation is the image encoder's (not visible in the weights).
    from mlcnc_jax.models import make_backbone  # noqa: PLC0415 (models imports this module)

    try:
        return getattr(make_backbone(backbone_name), "activation", "quick_gelu")
    except ValueError:
        return "quick_gelu"


def prepare_class_text(
    config: ml_collections.ConfigDict, class_names: Sequence[str], workdir: str
) -> ml_collections.ConfigDict:
    """Embeds the class names once and returns the config that names the stored file.

    With `needs_class_names(config)`, the K class names in every template of
    config.model.class_prompts are embedded by CLIP's text tower
    (`clip_text.class_embeddings`) and saved as `<workdir>/class_text_embeddings.npy`,
    unless that file already holds the embeddings of the same names, prompts and weights
    (recorded beside it). Only process 0 writes; the others wait for it.

    Args:
        config: the run's config (unchanged).
        class_names: the dataset's class names, in its class order.
        workdir: the run's directory (a local path).

    Returns:
        `config` itself when nothing is to embed, else a copy whose
        model.text_embeddings names the stored file.
    """
    if not needs_class_names(config):
        return config
    import jax  # noqa: PLC0415

    from mlcnc_jax import processes  # noqa: PLC0415
    from mlcnc_jax.models import clip_text  # noqa: PLC0415

    path = os.path.join(workdir, CLASS_TEXT_FILE)
    record_path = os.path.join(workdir, CLASS_TEXT_RECORD)
    weights = text_weights_path(config)
    record = {
        "class_names": list(class_names),
        "class_prompts": list(config.model.class_prompts),
        "text_weights": os.path.abspath(weights) if weights else "",
        "backbone": config.model.backbone,
    }
    if jax.process_index() == 0:
        old = None
        if os.path.isfile(record_path) and os.path.isfile(path):
            with open(record_path) as f:
                old = json.load(f)
        if old != record:
            check_text_weights(config)
            embeddings = clip_text.class_embeddings(
                weights,
                class_names,
                config.model.class_prompts,
                _activation(config.model.backbone),
            )
            os.makedirs(workdir, exist_ok=True)
            np.save(path, embeddings)
            with open(record_path, "w") as f:
                json.dump(record, f, indent=1)
    processes.sync("mlcnc_jax class text embeddings")
    config = config.copy_and_resolve_references()
    config.model.text_embeddings = path
    return config
