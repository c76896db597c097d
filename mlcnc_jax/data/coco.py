"""COCO-format annotations and the COCO-LT benchmark.

COCO-LT trains on the 1,909 images of the official long-tailed split of COCO 2017 train and
tests on val2017 (the 4,952 images with annotations, or all 5,000). Class order: COCO category
ids ascending. An image is positive for a class if it has any annotation of that class.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from mlcnc_jax.data import splits
from mlcnc_jax.data.dataset import HEAD_MIN, TAIL_MAX, MultiLabelDataset, Split, class_groups
from mlcnc_jax.errors import UserError

TRAIN_ANNOTATIONS = os.path.join("annotations", "instances_train2017.json")
TEST_ANNOTATIONS = os.path.join("annotations", "instances_val2017.json")
TRAIN_IMAGES = "train2017"
TEST_IMAGES = "val2017"


@dataclasses.dataclass
class CocoAnnotations:
    """The parts of a COCO-format annotation file a classifier needs.

    Attributes:
      path: the annotation file.
      category_ids: [K] COCO category ids, ascending (the class order).
      class_names: [K] category names in that order.
      image_ids: image ids in file order.
      file_names: image id -> file name relative to the image directory.
      image_classes: image id -> sorted class indices of its annotations.
    """

    path: str
    category_ids: list[int]
    class_names: list[str]
    image_ids: list[int]
    file_names: dict[int, str]
    image_classes: dict[int, list[int]]

    def labels(self, image_ids: Sequence[int], num_classes: int | None = None) -> np.ndarray:
        """[N, K] uint8 multi-hot labels of `image_ids`."""
        out = np.zeros((len(image_ids), num_classes or len(self.class_names)), np.uint8)
        for row, image_id in enumerate(image_ids):
            out[row, self.image_classes[image_id]] = 1
        return out


def read_coco_annotations(path: str) -> CocoAnnotations:
    """Reads a COCO-format annotation file (`images`, `annotations`, `categories`).

    Args:
      path: the JSON file.

    Returns:
      The parsed annotations.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not COCO-format or an annotation names an unknown image or
        category.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    missing = [k for k in ("images", "annotations", "categories") if k not in d]
    if missing:
        raise UserError(f"{path} is not a COCO-format annotation file: no {missing} field")
    cats = sorted(d["categories"], key=lambda c: int(c["id"]))
    category_ids = [int(c["id"]) for c in cats]
    index = {cid: i for i, cid in enumerate(category_ids)}
    image_ids = [int(im["id"]) for im in d["images"]]
    # A repeated id would merge two images' labels into one scored twice (and drop the
    # other); a repeated file name would score one image under two ids.
    for what, values in (
        ("image id", image_ids),
        ("file_name", [im["file_name"] for im in d["images"]]),
    ):
        repeated = _repeated(values)
        if repeated:
            raise UserError(
                f"{path}: {len(repeated)} {what}(s) appear more than once in `images` (first: "
                f"{', '.join(map(repr, repeated[:5]))}): give every image its own id and file; "
                "remove the duplicates"
            )
    file_names = {int(im["id"]): im["file_name"] for im in d["images"]}
    classes: dict[int, set[int]] = {i: set() for i in image_ids}
    for ann in d["annotations"]:
        image_id, cat = int(ann["image_id"]), int(ann["category_id"])
        if image_id not in classes:
            raise UserError(f"{path}: an annotation names image id {image_id}, not in `images`")
        if cat not in index:
            raise UserError(f"{path}: an annotation names category id {cat}, not in `categories`")
        classes[image_id].add(index[cat])
    return CocoAnnotations(
        path=path,
        category_ids=category_ids,
        class_names=[c["name"] for c in cats],
        image_ids=image_ids,
        file_names=file_names,
        image_classes={i: sorted(c) for i, c in classes.items()},
    )


def _repeated(values: Sequence) -> list:
    """The values that occur more than once, in order of their first repeat."""
    seen, repeated = set(), []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated


def check_ids_present(ids: Sequence, known, what: str, where: str, fix: str) -> None:
    """Raises a ValueError naming the ids of `ids` that are not in `known`."""
    absent = [i for i in ids if i not in known]
    if absent:
        raise UserError(
            f"{len(absent)} image ids of the {what} are not in {where} (first: "
            f"{', '.join(map(str, absent[:5]))}): {fix}"
        )


def warn_label_mismatch(official: np.ndarray, from_annotations: np.ndarray, what: str) -> None:
    """Logs how many images' official split labels differ from their annotations."""
    differ = int(np.any(official != from_annotations, axis=1).sum())
    if differ:
        logging.warning(
            "%d images of the %s have labels in the split files that differ from their "
            "annotations; the split files' labels are used (they define the benchmark).",
            differ,
            what,
        )


def benchmark_groups(
    split: splits.LongTailSplit, class_freq: np.ndarray, head_min: int, tail_max: int
) -> dict[str, list[int]]:
    """The official head/medium/tail groups, or groups from the thresholds when changed."""
    if (head_min, tail_max) == (HEAD_MIN, TAIL_MAX):
        return split.class_split
    return class_groups(class_freq, head_min, tail_max)


def _require_dir(path: str, what: str, fix: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} not found: {fix}")
    return path


def _require_file(path: str, what: str, fix: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found: {fix}")
    return path


_ROOT_FIX = (
    "set --config.data.root to the COCO 2017 folder holding annotations/instances_train2017.json, "
    "annotations/instances_val2017.json, train2017/ and val2017/ (from cocodataset.org)"
)


def load_coco_lt(
    root: str,
    split_dir: str = "",
    download_splits: bool = False,
    test_all: bool = False,
    image_source: str = "files",
    tfds_data_dir: str = "",
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
) -> MultiLabelDataset:
    """Loads COCO-LT: the official long-tailed split of COCO 2017 train, tested on val2017.

    Args:
      root: COCO 2017 folder (annotations/, train2017/, val2017/). Unused for the split files
        when `split_dir` is set and `image_source` is 'tfds'.
      split_dir: directory of the split files; '' means `<root>/lt_splits`.
      download_splits: fetch missing split files from the original repository.
      test_all: test on all 5,000 val2017 images instead of the 4,952 with annotations.
      image_source: 'files' (the user's copy under `root`) or 'tfds' (tfds-prepared coco/2017;
        images become encoded bytes).
      tfds_data_dir: tfds data_dir ('' = tfds default).
      head_min: head classes have at least this many training images.
      tail_max: tail classes have fewer than this many training images.

    Returns:
      The dataset; split images are file paths ('files') or encoded JPEG bytes ('tfds').
    """
    split = splits.load_long_tail_split(
        "coco_lt", split_dir or splits.default_split_dir(root), download_splits
    )
    if image_source == "tfds":
        return _load_coco_lt_tfds(split, test_all, tfds_data_dir, head_min, tail_max)
    if image_source != "files":
        raise UserError(f"config.data.image_source must be 'files' or 'tfds', got {image_source!r}")
    root = _require_dir(root, "COCO directory", _ROOT_FIX)
    train_ann = read_coco_annotations(
        _require_file(os.path.join(root, TRAIN_ANNOTATIONS), "COCO annotation file", _ROOT_FIX)
    )
    test_ann = read_coco_annotations(
        _require_file(os.path.join(root, TEST_ANNOTATIONS), "COCO annotation file", _ROOT_FIX)
    )
    k = split.labels.shape[1]
    if len(train_ann.class_names) != k:
        raise UserError(
            f"{train_ann.path} has {len(train_ann.class_names)} categories but COCO-LT has {k}: "
            "use the COCO 2017 instances annotations"
        )
    check_ids_present(
        split.image_ids,
        train_ann.file_names,
        "COCO-LT split",
        train_ann.path,
        "the split belongs to COCO 2017 train; point --config.data.root at COCO 2017",
    )
    warn_label_mismatch(split.labels, train_ann.labels(split.image_ids), "COCO-LT split")
    train = Split(
        images=[os.path.join(root, TRAIN_IMAGES, train_ann.file_names[i]) for i in split.image_ids],
        labels=split.labels,
        ids=list(split.image_ids),
    )
    test_ids = sorted(i for i in test_ann.image_ids if test_all or test_ann.image_classes[i])
    test = Split(
        images=[os.path.join(root, TEST_IMAGES, test_ann.file_names[i]) for i in test_ids],
        labels=test_ann.labels(test_ids),
        ids=test_ids,
    )
    return MultiLabelDataset(
        name="coco_lt",
        class_names=train_ann.class_names,
        train=train,
        test=test,
        class_split=benchmark_groups(split, train.class_freq, head_min, tail_max),
    )


def _tfds_coco_records(split_name: str, data_dir: str):
    """Yields (image id, encoded image, class indices) of tfds coco/2017; and the class names."""
    import tensorflow_datasets as tfds  # lazy: only this image source needs tensorflow

    builder = tfds.builder("coco/2017", data_dir=data_dir or None)
    names = list(builder.info.features["objects"]["label"].names)
    ds = builder.as_dataset(split=split_name, decoders={"image": tfds.decode.SkipDecoding()})

    def records():
        for ex in tfds.as_numpy(ds):
            yield (
                int(ex["image/id"]),
                bytes(ex["image"]),
                sorted(set(ex["objects"]["label"].tolist())),
            )

    return names, records()


def _load_coco_lt_tfds(
    split: splits.LongTailSplit, test_all: bool, data_dir: str, head_min: int, tail_max: int
) -> MultiLabelDataset:
    wanted = {i: row for row, i in enumerate(split.image_ids)}
    names, records = _tfds_coco_records("train", data_dir)
    found: dict[int, bytes] = {}
    for image_id, image, _ in records:
        if image_id in wanted:
            found[image_id] = image
    check_ids_present(
        split.image_ids,
        found,
        "COCO-LT split",
        "tfds coco/2017 train",
        "prepare coco/2017 with tfds (tfds build coco/2017) or use --config.data.image_source=files",
    )
    train = Split(
        images=[found[i] for i in split.image_ids], labels=split.labels, ids=list(split.image_ids)
    )
    _, records = _tfds_coco_records("validation", data_dir)
    test_records = sorted(r for r in records if test_all or r[2])
    labels = np.zeros((len(test_records), len(names)), np.uint8)
    for row, (_, _, classes) in enumerate(test_records):
        labels[row, classes] = 1
    test = Split(
        images=[r[1] for r in test_records], labels=labels, ids=[r[0] for r in test_records]
    )
    return MultiLabelDataset(
        name="coco_lt",
        class_names=names,
        train=train,
        test=test,
        class_split=benchmark_groups(split, train.class_freq, head_min, tail_max),
    )
