"""Inspecting a long-tailed split: per-class table, head/medium/tail groups, class histogram."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from mlcnc_jax.data.dataset import MultiLabelDataset, Split
from mlcnc_jax.groups import COLOURS as GROUP_COLOURS
from mlcnc_jax.groups import GROUPS, group_of

HISTOGRAM_FILE = "class_histogram.png"


def format_class_table(
    class_names: Sequence[str],
    class_freq: Sequence[int],
    class_split: dict[str, list[int]],
    test_freq: Sequence[int] | None = None,
    test_header: str = "test",
) -> str:
    """A text table of the classes, most frequent first: index, name, group, counts.

    Args:
      class_names: [K] names.
      class_freq: [K] training images per class.
      class_split: {'head', 'medium', 'tail'} class index lists.
      test_freq: [K] test images per class, or None.
      test_header: the heading of the `test_freq` column.

    Returns:
      The table, one line per class after a header.
    """
    freq = np.asarray(class_freq)
    groups = group_of(class_split, len(freq))
    width = max([len("class")] + [len(n) for n in class_names])
    header = f"{'idx':>4}  {'class':<{width}}  {'group':<6}  {'train':>7}"
    if test_freq is not None:
        header += f"  {test_header:>7}"
    lines = [header, "-" * len(header)]
    for i in np.argsort(-freq, kind="stable"):
        line = f"{i:>4}  {class_names[i]:<{width}}  {groups[i]:<6}  {int(freq[i]):>7}"
        if test_freq is not None:
            line += f"  {int(test_freq[i]):>7}"
        lines.append(line)
    return "\n".join(lines)


def plot_class_histogram(
    class_names: Sequence[str],
    class_freq: Sequence[int],
    class_split: dict[str, list[int]],
    path: str,
    title: str = "",
) -> str:
    """Writes a bar chart of images per class, sorted by frequency and coloured by group.

    Args:
      class_names: [K] names.
      class_freq: [K] training images per class.
      class_split: {'head', 'medium', 'tail'} class index lists.
      path: the PNG file to write.
      title: the chart title.

    Returns:
      `path`.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    freq = np.asarray(class_freq)
    order = np.argsort(-freq, kind="stable")
    groups = group_of(class_split, len(freq))
    k = len(freq)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * k + 2), 4.5))
    ax.bar(
        np.arange(k),
        freq[order],
        color=[GROUP_COLOURS.get(groups[i], "grey") for i in order],
    )
    ax.set_xticks(np.arange(k))
    ax.set_xticklabels([class_names[i] for i in order], rotation=90, fontsize=6 if k > 30 else 8)
    ax.set_ylabel("training images")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(
        handles=[
            Patch(color=c, label=f"{g} ({len(class_split.get(g, []))})")
            for g, c in GROUP_COLOURS.items()
        ]
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def images_without_labels(split: Split) -> list:
    """The ids of the images of `split` that have no class at all."""
    return [split.ids[i] for i in np.flatnonzero(split.labels.sum(axis=1) == 0)]


def _identity(image) -> str | bytes:
    # A file by what its path points to; an encoded image by its content.
    if isinstance(image, bytes):
        return hashlib.sha1(image).digest()
    return os.path.realpath(os.path.expanduser(image))


def shared_images(train: Split, test: Split) -> list:
    """The images that are in both splits (a test image seen in training inflates the results).

    Files are the same when their paths point to the same file (however spelt, links
    resolved); encoded images when their bytes are equal.

    Args:
      train: the training split.
      test: the test split.

    Returns:
      The shared images (test paths, or test ids for encoded images), in test order.
    """
    seen = {_identity(image) for image in train.images}
    return [
        image if isinstance(image, str) else test.ids[i]
        for i, image in enumerate(test.images)
        if _identity(image) in seen
    ]


def data_warnings(dataset: MultiLabelDataset) -> list[str]:
    """Warnings about a dataset: images without labels, and images in both train and test.

    Args:
      dataset: the dataset.

    Returns:
      One sentence per problem found (none: an empty list).
    """
    found = []
    for name, split in (("training", dataset.train), ("test", dataset.test)):
        empty = images_without_labels(split)
        if empty:
            found.append(
                f"{len(empty)} of {len(split)} {name} images have no labels, e.g. {empty[0]!r}: "
                "they count as negatives of every class (check their annotation rows)"
            )
    shared = shared_images(dataset.train, dataset.test)
    if shared:
        found.append(
            f"{len(shared)} test images are also training images (a leak: the test results "
            f"overstate), e.g. {shared[0]!r}: remove them from one of the splits"
        )
    return found


def data_stats(dataset: MultiLabelDataset, workdir: str) -> dict:
    """Prints the training split's statistics and writes the class histogram to `workdir`.

    The last printed line is one JSON object with `num_train_images`, `class_freq` (dataset
    class order), `head`, `medium`, `tail` (class index lists), `num_test_images`, the
    `warnings` of `data_warnings` (also printed before it), and more.

    Args:
      dataset: the dataset.
      workdir: where `class_histogram.png` goes.

    Returns:
      The dict printed as JSON.
    """
    freq = dataset.train.class_freq
    test_freq = dataset.test.class_freq
    split = dataset.class_split
    print(f"dataset {dataset.name}: {dataset.num_classes} classes")
    print(f"training images: {len(dataset.train)}   test images: {len(dataset.test)}")
    print(format_class_table(dataset.class_names, freq, split, test_freq))
    for group in GROUPS:
        members = split[group]
        print(f"{group} ({len(members)}): {', '.join(dataset.class_names[i] for i in members)}")
    os.makedirs(workdir, exist_ok=True)
    histogram = plot_class_histogram(
        dataset.class_names,
        freq,
        split,
        os.path.join(workdir, HISTOGRAM_FILE),
        title=f"{dataset.name}: {len(dataset.train)} training images",
    )
    print(f"class histogram: {histogram}")
    warnings = data_warnings(dataset)
    for line in warnings:
        print(f"WARNING: {line}")
    result = {
        "name": dataset.name,
        "num_classes": dataset.num_classes,
        "num_train_images": len(dataset.train),
        "num_test_images": len(dataset.test),
        "class_names": list(dataset.class_names),
        "class_freq": [int(n) for n in freq],
        "test_class_freq": [int(n) for n in test_freq],
        "head": [int(i) for i in split["head"]],
        "medium": [int(i) for i in split["medium"]],
        "tail": [int(i) for i in split["tail"]],
        "histogram": histogram,
        "num_train_without_labels": len(images_without_labels(dataset.train)),
        "num_test_without_labels": len(images_without_labels(dataset.test)),
        "num_test_in_train": len(shared_images(dataset.train, dataset.test)),
        "warnings": warnings,
    }
    print(json.dumps(result), flush=True)
    return result
