"""Builds a long-tailed subset of any multi-label dataset (Distribution-Balanced Loss protocol).

The protocol of Wu et al. (ECCV 2020), which produced COCO-LT and VOC-LT:

1. A reference profile: the Pareto density with shape `b` (6) sampled at K evenly spaced points
   between its 0 and 0.99 quantiles, scaled so the first class gets `max_count` images and the
   floor is `min_count`.
2. Classes ranked by the sum over the other classes of the conditional co-occurrence
   probability P(this class | other class), highest first: classes that appear alongside many
   others come first and get the largest targets, since they are drawn in anyway.
3. Going down the ranking, each class is brought to its target: images containing it are added
   at random when it has too few, or removed at random when co-occurrence has already given it
   too many. A class with fewer images than its target keeps all it has.

Everything random comes from one seeded numpy generator over sorted candidates, so the same
labels and seed always give the same subset.

Command line:

  python -m mlcnc_jax.data.lt_builder --labels=train.csv --max_count=800 --output=lt.json

`--labels` is a COCO-format JSON, a CSV (`image path,space-separated class names`), a JSON in
the form of the official split files (`train_image_ids`, `train_labels`, `class_names`) or a
.npy [N, K] multi-hot matrix. The split is written as JSON (the form of the official split
files), the class table and groups are printed and the class histogram is written as PNG.
Train on the subset with `--config.data.train_split_file=lt.json` (coco_json and csv data).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import numpy as np

from mlcnc_jax.data.dataset import HEAD_MIN, TAIL_MAX, class_groups
from mlcnc_jax.errors import UserError

PARETO_SHAPE = 6.0
PARETO_TAIL_QUANTILE = 0.99


def pareto_profile(
    num_classes: int,
    max_count: int,
    shape: float = PARETO_SHAPE,
    min_count: int = 1,
    tail_quantile: float = PARETO_TAIL_QUANTILE,
) -> np.ndarray:
    """The target number of images per ranked class.

    Args:
      num_classes: K.
      max_count: images of the first (largest) class.
      shape: Pareto shape b.
      min_count: the floor of the profile.
      tail_quantile: the profile spans the Pareto quantiles [0, tail_quantile].

    Returns:
      [K] int64, non-increasing, first entry `max_count`.
    """
    # Pareto(b) with scale 1: pdf(x) = b / x^(b+1) for x >= 1; ppf(q) = (1 - q)^(-1/b).
    x = np.linspace(1.0, (1.0 - tail_quantile) ** (-1.0 / shape), num_classes)
    pdf = shape / x ** (shape + 1.0)
    return (pdf * (max_count - min_count) / shape + min_count).astype(np.int64)


def co_occurrence_rank(labels: np.ndarray) -> np.ndarray:
    """Class indices ordered by summed conditional co-occurrence probability, highest first.

    Args:
      labels: [N, K] multi-hot.

    Returns:
      [K] class indices.
    """
    y = np.asarray(labels, np.float64)
    co = y.T @ y  # co[i, j]: images with both i and j
    count = np.diag(co).copy()
    cond = np.divide(co, count[:, None], out=np.zeros_like(co), where=count[:, None] > 0)
    # cond[i, j] = P(j | i); a class scores the sum over i of P(it | i).
    return np.argsort(-cond.sum(axis=0), kind="stable")


def build_long_tail(
    labels: np.ndarray,
    max_count: int,
    shape: float = PARETO_SHAPE,
    min_count: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Selects a long-tailed subset of a multi-label dataset.

    Args:
      labels: [N, K] multi-hot labels of the full dataset.
      max_count: target images of the first-ranked class.
      shape: Pareto shape of the profile.
      min_count: floor of the profile.
      seed: random seed.

    Returns:
      Sorted indices of the selected images.
    """
    y = np.asarray(labels) > 0
    if y.ndim != 2:
        raise ValueError(f"labels must be [N, K], got shape {y.shape}")
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    k = y.shape[1]
    profile = pareto_profile(k, max_count, shape, min_count)
    rng = np.random.default_rng(seed)
    selected = np.zeros(len(y), bool)
    current = np.zeros(k, np.int64)
    for target, c in zip(profile, co_occurrence_rank(y), strict=True):
        need = int(target - current[c])
        if need < 0:
            pool = np.flatnonzero(selected & y[:, c])
            change = rng.choice(pool, size=-need, replace=False)
            selected[change] = False
            current -= y[change].sum(axis=0)
        elif need > 0:
            pool = np.flatnonzero(~selected & y[:, c])
            change = rng.choice(pool, size=min(need, len(pool)), replace=False)
            selected[change] = True
            current += y[change].sum(axis=0)
    return np.flatnonzero(selected)


def read_labels(path: str, label_separator: str = " ") -> tuple[list, np.ndarray, list[str]]:
    """Reads a label matrix from a COCO-format JSON, a CSV, a split JSON or a .npy file.

    Args:
      path: the file (see the module docstring).
      label_separator: for a CSV, what separates class names (as config.data.label_separator).

    Returns:
      (image ids, [N, K] uint8 labels, class names).
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label file {path} not found")
    if path.endswith(".npy"):
        labels = np.load(path, allow_pickle=False)
        if labels.ndim != 2:
            raise UserError(f"{path}: expected an [N, K] multi-hot matrix, got {labels.shape}")
        return (
            list(range(len(labels))),
            (labels > 0).astype(np.uint8),
            [f"class_{i}" for i in range(labels.shape[1])],
        )
    if path.endswith(".csv"):
        from mlcnc_jax.data import custom

        images, classes = custom.read_csv(path, label_separator=label_separator)
        names = sorted({c for cs in classes for c in cs})
        index = {n: i for i, n in enumerate(names)}
        labels = np.zeros((len(images), len(names)), np.uint8)
        for row, cs in enumerate(classes):
            labels[row, [index[c] for c in cs]] = 1
        return images, labels, names
    with open(path) as f:
        d = json.load(f)
    if "annotations" in d and "images" in d:
        from mlcnc_jax.data import coco

        ann = coco.read_coco_annotations(path)
        return list(ann.image_ids), ann.labels(ann.image_ids), ann.class_names
    if "train_labels" in d:
        k = len(d["class_names"])
        labels = np.zeros((len(d["train_labels"]), k), np.uint8)
        for row, classes in enumerate(d["train_labels"]):
            labels[row, classes] = 1
        return list(d["train_image_ids"]), labels, list(d["class_names"])
    raise UserError(
        f"{path}: not a COCO-format file (images, annotations, categories) nor a split file "
        "(train_image_ids, train_labels, class_names)"
    )


def split_record(
    image_ids: Sequence,
    labels: np.ndarray,
    class_names: Sequence[str],
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
    **parameters,
) -> dict:
    """The JSON record of a split, in the form of the official split files."""
    labels = np.asarray(labels)
    freq = labels.astype(np.int64).sum(axis=0)
    return {
        "protocol": "Distribution-Balanced Loss long-tailed subset (Pareto profile)",
        "parameters": {"head_min": head_min, "tail_max": tail_max, **parameters},
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "train_image_ids": [i.item() if isinstance(i, np.generic) else i for i in image_ids],
        "train_labels": [[int(c) for c in np.flatnonzero(row)] for row in labels],
        "class_freq": [int(n) for n in freq],
        "class_split": class_groups(freq, head_min, tail_max),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns the written split record."""
    parser = argparse.ArgumentParser(
        prog="python -m mlcnc_jax.data.lt_builder",
        description="Build a long-tailed subset of a multi-label dataset (DB-loss protocol).",
    )
    parser.add_argument("--labels", required=True, help="COCO JSON, CSV, split JSON or .npy")
    parser.add_argument("--output", required=True, help="the split JSON to write")
    parser.add_argument("--max_count", type=int, required=True, help="images of the top class")
    parser.add_argument("--shape", type=float, default=PARETO_SHAPE, help="Pareto shape")
    parser.add_argument("--min_count", type=int, default=1, help="floor of the profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--label_separator",
        default=" ",
        help="CSV: what separates class names (as config.data.label_separator)",
    )
    parser.add_argument("--head_min", type=int, default=HEAD_MIN)
    parser.add_argument("--tail_max", type=int, default=TAIL_MAX)
    parser.add_argument("--plot", default="", help="histogram PNG (default: output with .png)")
    args = parser.parse_args(argv)

    from mlcnc_jax.data import stats

    ids, labels, names = read_labels(args.labels, args.label_separator)
    chosen = build_long_tail(labels, args.max_count, args.shape, args.min_count, args.seed)
    record = split_record(
        [ids[i] for i in chosen],
        labels[chosen],
        names,
        args.head_min,
        args.tail_max,
        source=os.path.abspath(args.labels),
        max_count=args.max_count,
        shape=args.shape,
        min_count=args.min_count,
        seed=args.seed,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f)
    plot = args.plot or os.path.splitext(args.output)[0] + ".png"
    groups = record["class_split"]
    stats.plot_class_histogram(
        names, record["class_freq"], groups, plot, title=f"{len(chosen)} of {len(ids)} images"
    )
    print(f"selected {len(chosen)} of {len(ids)} images, {len(names)} classes")
    print(stats.format_class_table(names, record["class_freq"], groups, labels.sum(axis=0), "all"))
    for g in ("head", "medium", "tail"):
        print(f"{g} ({len(groups[g])}): {', '.join(names[i] for i in groups[g])}")
    print(f"split: {args.output}\nhistogram: {plot}")
    return record


if __name__ == "__main__":
    main()
