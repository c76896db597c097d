"""Class text embeddings for the text classifier (config.model.classifier='text').

The file is a `.npy` array [K, d] of one embedding per class, in the dataset's class
order: e.g. CLIP's text embeddings of 'a photo of a {name}'. This project has no text
tower: the file is made outside it, once (the README shows how), and only read here.

The MLC-NC model turns the L2-normalised rows into a frozen classifier with the same
place and shape as the ETF classifier V [K*p, K] (`etf.gram_frame`): its columns have
the pairwise cosines of the text embeddings instead of the ETF's -1/(K-1), so the
two geometries are compared with everything else equal.
"""

from __future__ import annotations

import os

import numpy as np

# How to make the file, for the missing-file message (the text tower is not part of this
# project).
MAKE_TEXT_EMBEDDINGS = (
    "To make it once with OpenAI's CLIP package (pip install git+https://github.com/openai/CLIP): "
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
