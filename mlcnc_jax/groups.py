"""Head, medium and tail: the class groups of a long-tailed split, in one place.

A class with at least HEAD_MIN training images is 'head', one with fewer than
TAIL_MAX is 'tail', the rest 'medium' (docs/method.md §4). Reports, plots and
benchmarks take the names, order and colours from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GROUPS = ("head", "medium", "tail")
HEAD_MIN = 100  # a class with >= HEAD_MIN training images is "head"
TAIL_MAX = 20  # a class with < TAIL_MAX training images is "tail"; between is "medium"
COLOURS = {"head": "tab:blue", "medium": "tab:orange", "tail": "tab:red"}


def class_groups(
    class_freq: Sequence[int], head_min: int = HEAD_MIN, tail_max: int = TAIL_MAX
) -> dict[str, list[int]]:
    """Splits classes into head / medium / tail by their training frequency.

    Args:
      class_freq: [K] number of training images per class.
      head_min: classes with at least this many images are head.
      tail_max: classes with fewer than this many images are tail.

    Returns:
      {'head': [...], 'medium': [...], 'tail': [...]} of class indices.
    """
    freq = np.asarray(class_freq)
    return {
        "head": [int(i) for i in np.flatnonzero(freq >= head_min)],
        "medium": [int(i) for i in np.flatnonzero((freq >= tail_max) & (freq < head_min))],
        "tail": [int(i) for i in np.flatnonzero(freq < tail_max)],
    }


def group_of(class_split: dict[str, list[int]], num_classes: int) -> list[str]:
    """Per class, the name of its group ('head', 'medium' or 'tail'; '' for none)."""
    names = [""] * num_classes
    for group in GROUPS:
        for i in class_split.get(group, []):
            names[i] = group
    return names
