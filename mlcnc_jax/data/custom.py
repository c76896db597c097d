"""The user's own multi-label data: COCO-format annotation files or CSV files.

- `coco_json`: one COCO-format file for training and one for testing, each with the folder its
  `file_name`s are relative to. Classes: the training file's categories, ids ascending.
- `csv`: one row per image, `image path,class names separated by spaces` (or by
  `config.data.label_separator`), standard CSV quoting, UTF-8 (a byte order mark is fine); an
  optional header row starting with `image`, `path`, `file` or `filename`. Relative paths are taken relative to
  the given image folder (or the CSV's own folder when that is ''). Classes: the class names
  found in the training file, sorted.

Head/medium/tail groups come from the training counts.
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
from absl import logging

from mlcnc_jax.data.coco import read_coco_annotations
from mlcnc_jax.data.dataset import HEAD_MIN, TAIL_MAX, MultiLabelDataset, Split, class_groups
from mlcnc_jax.errors import UserError

_HEADER_WORDS = {"image", "images", "path", "file", "filename", "file_name", "image_path"}


def _require_no_empty_classes(class_names: list[str], freq: np.ndarray, source: str) -> None:
    # A class without training images cannot be learned nor drawn by the class-aware sampler.
    empty = [name for name, n in zip(class_names, freq, strict=True) if n == 0]
    if empty:
        raise UserError(
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
      train_images: folder the training `file_name`s are relative to ('' = the file's folder).
      test_annotations: COCO-format JSON of the test images.
      test_images: folder the test `file_name`s are relative to ('' = the file's folder).
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
            raise UserError(f"config.data.{key} is empty: set it to a COCO-format JSON file")
        if not os.path.isfile(os.path.expanduser(path)):
            raise FileNotFoundError(
                f"annotation file {path} not found: set --config.data.{key} to an existing file"
            )
    train_ann = read_coco_annotations(train_annotations)
    test_ann = read_coco_annotations(test_annotations)
    names = train_ann.class_names
    if len(set(names)) != len(names):
        raise UserError(f"{train_ann.path}: category names are not unique")
    unknown = sorted(set(test_ann.class_names) - set(names))
    if unknown:
        raise UserError(
            f"{test_ann.path} has categories {unknown} that {train_ann.path} lacks: both files "
            "must declare the same categories"
        )
    # Test category index -> training class index, by name.
    remap = np.array([names.index(n) for n in test_ann.class_names], np.int64)

    def split(ann, image_dir: str, class_map: np.ndarray | None) -> Split:
        # '' = the annotation file's folder, as for CSV files.
        image_dir = (
            os.path.expanduser(image_dir)
            if image_dir
            else os.path.dirname(os.path.abspath(ann.path))
        )
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


def split_labels(field: str, separator: str = " ") -> list[str]:
    """The class names of a CSV label field.

    Args:
      field: the label field of one row (already unquoted by the CSV reader).
      separator: what separates class names: " " (any run of whitespace) or another string,
        e.g. ";" or "|", in which case class names may contain spaces.

    Returns:
      The class names, stripped, empty ones dropped.
    """
    if separator.strip() == "":
        return field.split()
    return [name.strip() for name in field.split(separator) if name.strip()]


# Characters that in a class name usually mean a separator or a quote went wrong.
_SUSPECT = (",", ";", "|", '"', "'")


def read_csv(
    path: str, image_dir: str = "", label_separator: str = " "
) -> tuple[list[str], list[list[str]]]:
    """Reads a CSV of `image path,class names` rows.

    Fields follow the CSV rules: a field with commas or quotes is quoted, `"cat,dog"`, and a
    quote inside it is doubled; a UTF-8 byte order mark is ignored. A row with only a path (or an empty
    label field) is an image with no labels. With `label_separator` "," the class names may
    also fill several fields: `img.jpg,cat,dog`.

    Args:
      path: the CSV file.
      image_dir: folder relative image paths are taken from ('' = the CSV's folder).
      label_separator: what separates class names in the label field (see `split_labels`).

    Returns:
      (image paths, per image its class names).

    Raises:
      FileNotFoundError: the file does not exist.
      UserError: a row has more than two fields (unless the separator is ","), an image is
        listed twice with different labels, or the file is not UTF-8 (exact repeats of a
        row are dropped with one warning).
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file {path} not found")
    if not label_separator:
        raise UserError("config.data.label_separator is empty: use ' ' (the default), ';' or '|'")
    base = os.path.expanduser(image_dir) if image_dir else os.path.dirname(os.path.abspath(path))
    images, classes = [], []
    suspect: dict[str, int] = {}
    first_line: dict[str, tuple[int, int]] = {}  # image path -> (its first line, its row)
    exact_repeats: list[int] = []
    # utf-8-sig drops a byte order mark, which would otherwise hide the header row.
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line_no}: not UTF-8 text (byte {data[e.start : e.start + 1]!r} at offset "
            f"{e.start}): save the CSV as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path})"
        ) from None
    for line_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row or not "".join(row).strip():
            continue
        if line_no == 1 and row[0].strip().lower() in _HEADER_WORDS:
            continue
        if label_separator == ",":
            names = [n for field in row[1:] for n in split_labels(field, ",")]
        elif len(row) > 2:
            raise UserError(
                f"{path}:{line_no}: expected 2 fields 'image path,class names', got "
                f"{len(row)}: {row!r}. Quote a label field that holds commas "
                '(img.jpg,"cat,dog"), or set --config.data.label_separator=, when the class '
                "names are separated by commas"
            )
        else:
            names = split_labels(row[1], label_separator) if len(row) == 2 else []
        for name in names:
            if any(ch in name for ch in _SUSPECT):
                suspect.setdefault(name, line_no)
        image = os.path.join(base, row[0].strip())
        if image in first_line:
            # The same image twice would be scored (or sampled) twice: one row per image.
            earlier, at = first_line[image]
            if sorted(set(classes[at])) != sorted(set(names)):
                raise UserError(
                    f"{path}:{line_no}: image {row[0].strip()!r} is listed again with other "
                    f"labels than on line {earlier}: give each image one row with all of its "
                    "class names"
                )
            exact_repeats.append(line_no)
            continue
        first_line[image] = (line_no, len(images))
        images.append(image)
        classes.append(names)
    if exact_repeats:
        logging.warning(
            "%s: %d row(s) repeat an earlier row exactly (first: line %d); each image is kept once",
            path,
            len(exact_repeats),
            exact_repeats[0],
        )
    if suspect:
        name, line_no = next(iter(suspect.items()))
        logging.warning(
            "%s: %d class name(s) contain a comma, semicolon, bar or quote, e.g. %r (line %d). "
            "If those are several classes, set --config.data.label_separator to the character "
            "between them (now %r); quote fields with commas as CSV does",
            path,
            len(suspect),
            name,
            line_no,
            label_separator,
        )
    return images, classes


def load_csv(
    train_csv: str,
    train_images: str,
    test_csv: str,
    test_images: str,
    name: str = "csv",
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
    label_separator: str = " ",
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
      label_separator: what separates class names in the label field (see `split_labels`).

    Returns:
      The dataset; classes are the training file's class names, sorted.
    """
    for path, key in ((train_csv, "train_annotations"), (test_csv, "test_annotations")):
        if not path:
            raise UserError(f"config.data.{key} is empty: set it to a CSV file")
    train_paths, train_classes = read_csv(train_csv, train_images, label_separator)
    test_paths, test_classes = read_csv(test_csv, test_images, label_separator)
    for paths, csv_path, key in (
        (train_paths, train_csv, "train_annotations"),
        (test_paths, test_csv, "test_annotations"),
    ):
        if not paths:
            raise UserError(
                f"{csv_path} (config.data.{key}) lists no images: add rows 'image path,class names'"
            )
    names = sorted({c for cs in train_classes for c in cs})
    unknown = sorted({c for cs in test_classes for c in cs} - set(names))
    if unknown:
        raise UserError(
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


def apply_split_file(
    dataset: MultiLabelDataset,
    split_file: str,
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
) -> MultiLabelDataset:
    """Keeps the training images that a split file of `python -m mlcnc_jax.data.lt_builder` chose.

    The split file (JSON: `class_names`, `train_image_ids`, ...) names training images by the
    ids lt_builder read: COCO image ids for a COCO-format file, image paths for a CSV (taken
    relative to the CSV's folder). The labels stay those of the annotation file; the groups are
    recounted on the kept images.

    Args:
      dataset: the full dataset (from `load_coco_json` or `load_csv`).
      split_file: the split JSON.
      head_min: head classes have at least this many training images.
      tail_max: tail classes have fewer than this many training images.

    Returns:
      The dataset with the chosen training images, in the split file's order.

    Raises:
      FileNotFoundError: no such split file.
      ValueError: its classes differ from the dataset's, or it names images the training
        annotations lack.
    """
    path = os.path.expanduser(split_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"split file {split_file} not found: set --config.data.train_split_file to the JSON "
            "that python -m mlcnc_jax.data.lt_builder --output wrote"
        )
    with open(path) as f:
        record = json.load(f)
    if "train_image_ids" not in record or "class_names" not in record:
        raise UserError(
            f"{path}: not a split file (it needs train_image_ids and class_names, as "
            "python -m mlcnc_jax.data.lt_builder writes)"
        )
    if list(record["class_names"]) != list(dataset.class_names):
        raise UserError(
            f"{path} has classes {record['class_names'][:5]}... but the training annotations "
            f"have {dataset.class_names[:5]}...: build the split from the same training file "
            "(--labels of lt_builder = config.data.train_annotations)"
        )

    def key(i):
        # CSV ids are paths: compare what they point to, however they are spelt.
        return os.path.normpath(os.path.abspath(i)) if isinstance(i, str) else i

    index = {key(i): row for row, i in enumerate(dataset.train.ids)}
    missing = [i for i in record["train_image_ids"] if key(i) not in index]
    if missing:
        raise UserError(
            f"{path} names {len(missing)} image(s) that the training annotations lack, e.g. "
            f"{missing[0]!r}: build the split from config.data.train_annotations (for a CSV, "
            "leave config.data.train_images '' or set it to the CSV's folder, as lt_builder "
            "reads paths relative to it)"
        )
    rows = np.asarray([index[key(i)] for i in record["train_image_ids"]], np.int64)
    train = Split(
        images=[dataset.train.images[r] for r in rows],
        labels=dataset.train.labels[rows],
        ids=[dataset.train.ids[r] for r in rows],
    )
    _require_no_empty_classes(dataset.class_names, train.class_freq, path)
    return MultiLabelDataset(
        name=dataset.name,
        class_names=list(dataset.class_names),
        train=train,
        test=dataset.test,
        class_split=class_groups(train.class_freq, head_min, tail_max),
    )
