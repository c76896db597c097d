"""The user's own multi-label data: COCO-format annotation files or CSV files.

- `coco_json`: one COCO-format file for training and one for testing, each with the folder its
  `file_name`s are relative to. Classes: the training file's categories, ids ascending.
- `csv`: one row per image, `image path,class names separated by spaces`; an optional header
  row starting with `image`, `path`, `file` or `filename`. Relative paths are taken relative to
  the given image folder (or the CSV's own folder when that is ''). Classes: the class names
  found in the training file, sorted.

Head/medium/tail groups come from the training counts.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from mlcnc_jax.data.coco import read_coco_annotations
from mlcnc_jax.data.dataset import HEAD_MIN, TAIL_MAX, MultiLabelDataset, Split, class_groups

_HEADER_WORDS = {"image", "images", "path", "file", "filename", "file_name", "image_path"}


def _require_no_empty_classes(class_names: list[str], freq: np.ndarray, source: str) -> None:
    # A class without training images cannot be learned nor drawn by the class-aware sampler.
    empty = [name for name, n in zip(class_names, freq, strict=True) if n == 0]
    if empty:
        raise ValueError(
            f"classes {empty} have no training images in {source}: add training images of "
            "them or remove them from the class list"
        )


def load_coco_json(
    train_annotations: str,
    train_images: str,
    test_annotations: str,
    test_images: str,
    name: str = "coco_json",
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
) -> MultiLabelDataset:
    """Loads a dataset described by two COCO-format annotation files.

    Args:
      train_annotations: COCO-format JSON of the training images.
      train_images: folder the training `file_name`s are relative to.
      test_annotations: COCO-format JSON of the test images.
      test_images: folder the test `file_name`s are relative to.
      name: dataset name.
      head_min: head classes have at least this many training images.
      tail_max: tail classes have fewer than this many training images.

    Returns:
      The dataset, classes ordered by category id; test categories are matched by name.
    """
    for path, key in (
        (train_annotations, "train_annotations"),
        (test_annotations, "test_annotations"),
    ):
        if not path:
            raise ValueError(f"config.data.{key} is empty: set it to a COCO-format JSON file")
        if not os.path.isfile(os.path.expanduser(path)):
            raise FileNotFoundError(
                f"annotation file {path} not found: set --config.data.{key} to an existing file"
            )
    train_ann = read_coco_annotations(train_annotations)
    test_ann = read_coco_annotations(test_annotations)
    names = train_ann.class_names
    if len(set(names)) != len(names):
        raise ValueError(f"{train_ann.path}: category names are not unique")
    unknown = sorted(set(test_ann.class_names) - set(names))
    if unknown:
        raise ValueError(
            f"{test_ann.path} has categories {unknown} that {train_ann.path} lacks: both files "
            "must declare the same categories"
        )
    # Test category index -> training class index, by name.
    remap = np.array([names.index(n) for n in test_ann.class_names], np.int64)

    def split(ann, image_dir: str, class_map: np.ndarray | None) -> Split:
        image_dir = os.path.expanduser(image_dir)
        labels = np.zeros((len(ann.image_ids), len(names)), np.uint8)
        for row, image_id in enumerate(ann.image_ids):
            classes = ann.image_classes[image_id]
            labels[row, class_map[classes] if class_map is not None else classes] = 1
        return Split(
            images=[os.path.join(image_dir, ann.file_names[i]) for i in ann.image_ids],
            labels=labels,
            ids=list(ann.image_ids),
        )

    train = split(train_ann, train_images, None)
    test = split(test_ann, test_images, remap)
    _require_no_empty_classes(names, train.class_freq, train_ann.path)
    return MultiLabelDataset(
        name=name,
        class_names=list(names),
        train=train,
        test=test,
        class_split=class_groups(train.class_freq, head_min, tail_max),
    )


def read_csv(path: str, image_dir: str = "") -> tuple[list[str], list[list[str]]]:
    """Reads a CSV of `image path,space-separated class names` rows.

    Args:
      path: the CSV file.
      image_dir: folder relative image paths are taken from ('' = the CSV's folder).

    Returns:
      (image paths, per image its class names).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: a row does not have exactly two fields.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file {path} not found")
    base = os.path.expanduser(image_dir) if image_dir else os.path.dirname(os.path.abspath(path))
    images, classes = [], []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if line_no == 1 and row[0].strip().lower() in _HEADER_WORDS:
                continue
            if len(row) != 2:
                raise ValueError(
                    f"{path}:{line_no}: expected 2 fields 'image path,class names separated by "
                    f"spaces', got {len(row)}: {row!r}"
                )
            images.append(os.path.join(base, row[0].strip()))
            classes.append(row[1].split())
    return images, classes


def load_csv(
    train_csv: str,
    train_images: str,
    test_csv: str,
    test_images: str,
    name: str = "csv",
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
) -> MultiLabelDataset:
    """Loads a dataset described by two CSV files (see `read_csv`).

    Args:
      train_csv: CSV of the training images.
      train_images: folder relative training paths are taken from ('' = the CSV's folder).
      test_csv: CSV of the test images.
      test_images: folder relative test paths are taken from ('' = the CSV's folder).
      name: dataset name.
      head_min: head classes have at least this many training images.
      tail_max: tail classes have fewer than this many training images.

    Returns:
      The dataset; classes are the training file's class names, sorted.
    """
    for path, key in ((train_csv, "train_annotations"), (test_csv, "test_annotations")):
        if not path:
            raise ValueError(f"config.data.{key} is empty: set it to a CSV file")
    train_paths, train_classes = read_csv(train_csv, train_images)
    test_paths, test_classes = read_csv(test_csv, test_images)
    names = sorted({c for cs in train_classes for c in cs})
    unknown = sorted({c for cs in test_classes for c in cs} - set(names))
    if unknown:
        raise ValueError(
            f"{test_csv} names classes {unknown} that no image of {train_csv} has: add training "
            "images of them or drop them from the test file"
        )
    index = {n: i for i, n in enumerate(names)}

    def split(paths: list[str], classes: list[list[str]]) -> Split:
        labels = np.zeros((len(paths), len(names)), np.uint8)
        for row, cs in enumerate(classes):
            labels[row, [index[c] for c in cs]] = 1
        return Split(images=paths, labels=labels, ids=list(paths))

    train = split(train_paths, train_classes)
    return MultiLabelDataset(
        name=name,
        class_names=names,
        train=train,
        test=split(test_paths, test_classes),
        class_split=class_groups(train.class_freq, head_min, tail_max),
    )
