"""The VOC-LT benchmark: the official long-tailed split of VOC2012 trainval, tested on VOC2007 test.

`root` is the VOCdevkit folder holding `VOC2012/` (JPEGImages/, Annotations/) and `VOC2007/`
(JPEGImages/, Annotations/, ImageSets/Main/test.txt). Classes in alphabetical order. An image is
positive for a class if it has any object of that class (objects marked difficult included).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from mlcnc_jax.data import splits
from mlcnc_jax.data.coco import benchmark_groups, check_ids_present, warn_label_mismatch
from mlcnc_jax.data.dataset import HEAD_MIN, TAIL_MAX, MultiLabelDataset, Split
from mlcnc_jax.errors import UserError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}

_ROOT_FIX = (
    "set --config.data.root to the VOCdevkit folder holding VOC2012/ (trainval: JPEGImages/, "
    "Annotations/) and VOC2007/ (test: JPEGImages/, Annotations/, ImageSets/Main/test.txt)"
)


def parse_voc_xml(path: str) -> list[int]:
    """Sorted class indices of the objects in one VOC annotation file.

    Args:
      path: the XML file.

    Returns:
      Class indices (alphabetical class order).

    Raises:
      ValueError: the XML is malformed or names an unknown class.
    """
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise UserError(f"{path} is not a valid VOC annotation ({e})") from e
    classes = set()
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in _INDEX:
            raise UserError(f"{path}: unknown VOC class {name!r}")
        classes.add(_INDEX[name])
    return sorted(classes)


def _labels(annotation_dir: str, ids: list[str]) -> np.ndarray:
    labels = np.zeros((len(ids), len(VOC_CLASSES)), np.uint8)
    for row, image_id in enumerate(ids):
        labels[row, parse_voc_xml(os.path.join(annotation_dir, image_id + ".xml"))] = 1
    return labels


def _find_year(root: str, year: str) -> str:
    for candidate in (os.path.join(root, year), os.path.join(root, "VOCdevkit", year)):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"{year} directory not found in {root}: {_ROOT_FIX}")


def load_voc_lt(
    root: str,
    split_dir: str = "",
    download_splits: bool = False,
    image_source: str = "files",
    tfds_data_dir: str = "",
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
) -> MultiLabelDataset:
    """Loads VOC-LT.

    Args:
      root: the VOCdevkit folder (VOC2007/ and VOC2012/).
      split_dir: directory of the split files; '' means `<root>/lt_splits`.
      download_splits: fetch missing split files from the original repository.
      image_source: 'files' (the user's copy under `root`) or 'tfds' (tfds-prepared voc/2012
        and voc/2007; images become encoded bytes).
      tfds_data_dir: tfds data_dir ('' = tfds default).
      head_min: head classes have at least this many training images.
      tail_max: tail classes have fewer than this many training images.

    Returns:
      The dataset: 1,142 training images, VOC2007 test (4,952 images).
    """
    split = splits.load_long_tail_split(
        "voc_lt", split_dir or splits.default_split_dir(root), download_splits
    )
    if image_source == "tfds":
        return _load_voc_lt_tfds(split, tfds_data_dir, head_min, tail_max)
    if image_source != "files":
        raise UserError(f"config.data.image_source must be 'files' or 'tfds', got {image_source!r}")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"VOC directory {root} not found: {_ROOT_FIX}")
    voc2012, voc2007 = _find_year(root, "VOC2012"), _find_year(root, "VOC2007")

    ann_dir = os.path.join(voc2012, "Annotations")
    if not os.path.isdir(ann_dir):
        raise FileNotFoundError(f"VOC annotation directory {ann_dir} not found: {_ROOT_FIX}")
    available = {f[:-4] for f in os.listdir(ann_dir) if f.endswith(".xml")}
    check_ids_present(
        split.image_ids,
        available,
        "VOC-LT split",
        ann_dir,
        "the split belongs to VOC2012 trainval; point --config.data.root at the VOCdevkit folder",
    )
    warn_label_mismatch(split.labels, _labels(ann_dir, split.image_ids), "VOC-LT split")
    train = Split(
        images=[os.path.join(voc2012, "JPEGImages", i + ".jpg") for i in split.image_ids],
        labels=split.labels,
        ids=list(split.image_ids),
    )

    test_list = os.path.join(voc2007, "ImageSets", "Main", "test.txt")
    if not os.path.isfile(test_list):
        raise FileNotFoundError(
            f"VOC2007 test list {test_list} not found: unpack VOCtest_06-Nov-2007.tar into the "
            "VOCdevkit folder"
        )
    with open(test_list) as f:
        test_ids = [line.strip() for line in f if line.strip()]
    test_ann = os.path.join(voc2007, "Annotations")
    check_ids_present(
        test_ids,
        {f[:-4] for f in os.listdir(test_ann)} if os.path.isdir(test_ann) else set(),
        "VOC2007 test list",
        test_ann,
        "unpack the VOC2007 test annotations (VOCtest_06-Nov-2007.tar) into the VOCdevkit folder",
    )
    test = Split(
        images=[os.path.join(voc2007, "JPEGImages", i + ".jpg") for i in test_ids],
        labels=_labels(test_ann, test_ids),
        ids=test_ids,
    )
    return MultiLabelDataset(
        name="voc_lt",
        class_names=list(VOC_CLASSES),
        train=train,
        test=test,
        class_split=benchmark_groups(split, train.class_freq, head_min, tail_max),
    )


def _tfds_voc_records(name: str, split_name: str, data_dir: str):
    """Yields (image name without extension, encoded image, class indices) of a tfds VOC split."""
    import tensorflow_datasets as tfds  # lazy: only this image source needs tensorflow

    ds = tfds.load(
        name,
        split=split_name,
        data_dir=data_dir or None,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    for ex in tfds.as_numpy(ds):
        filename = ex["image/filename"].decode()
        yield os.path.splitext(filename)[0], bytes(ex["image"]), sorted(set(ex["labels"].tolist()))


def _load_voc_lt_tfds(
    split: splits.LongTailSplit, data_dir: str, head_min: int, tail_max: int
) -> MultiLabelDataset:
    wanted = set(split.image_ids)
    found = {
        i: image
        for i, image, _ in _tfds_voc_records("voc/2012", "train+validation", data_dir)
        if i in wanted
    }
    check_ids_present(
        split.image_ids,
        found,
        "VOC-LT split",
        "tfds voc/2012 train+validation",
        "prepare voc/2012 with tfds or use --config.data.image_source=files",
    )
    train = Split(
        images=[found[i] for i in split.image_ids], labels=split.labels, ids=list(split.image_ids)
    )
    test_records = sorted(_tfds_voc_records("voc/2007", "test", data_dir))
    labels = np.zeros((len(test_records), len(VOC_CLASSES)), np.uint8)
    for row, (_, _, classes) in enumerate(test_records):
        labels[row, classes] = 1
    test = Split(
        images=[r[1] for r in test_records], labels=labels, ids=[r[0] for r in test_records]
    )
    return MultiLabelDataset(
        name="voc_lt",
        class_names=list(VOC_CLASSES),
        train=train,
        test=test,
        class_split=benchmark_groups(split, train.class_freq, head_min, tail_max),
    )
