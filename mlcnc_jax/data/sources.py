"""Dataset registry: `config.data` -> `MultiLabelDataset`, with image checks and validation carving.

Sources (config.data.name):
  synthetic_lt  the built-in long-tailed data (no download)
  coco_lt       COCO-LT from the user's COCO 2017 copy (or tfds coco/2017)
  voc_lt        VOC-LT from the user's VOCdevkit (or tfds voc/2012 + voc/2007)
  coco_json     the user's own COCO-format annotation files
  csv           the user's own CSV files (image path, class names)

coco_json and csv take an lt_builder split file (config.data.train_split_file) choosing
the training images.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from mlcnc_jax.data import coco, custom, voc
from mlcnc_jax.data.dataset import MultiLabelDataset, Split, class_groups
from mlcnc_jax.errors import UserError

DatasetLoader = Callable[[ml_collections.ConfigDict], MultiLabelDataset]
_LOADERS: dict[str, DatasetLoader] = {}
# The user-file formats: config.data.train_split_file applies, groups follow the kept images.
_CUSTOM = ("coco_json", "csv")


def register_dataset(name: str, loader: DatasetLoader) -> DatasetLoader:
    """Registers `loader(config) -> MultiLabelDataset` as `config.data.name = name`.

    The loader reads what it needs from `config.data` (new fields go in the schema,
    mlcnc_jax/configuration/_schema.py); everything after it (image checks, validation carving, sampling, the input pipeline,
    evaluation and reports) works on the record it returns. Usable as a decorator.
    """
    _LOADERS[name] = loader
    return loader


def dataset_names() -> tuple[str, ...]:
    """The registered `config.data.name` values."""
    return tuple(_LOADERS)


def _synthetic(config: ml_collections.ConfigDict) -> MultiLabelDataset:
    from mlcnc_jax.data import synthetic  # lazy: it needs tensorflow-datasets

    return synthetic.load(config)


def _coco_lt(config: ml_collections.ConfigDict) -> MultiLabelDataset:
    d = config.data
    return coco.load_coco_lt(
        d.root,
        d.split_dir,
        d.download_splits,
        d.coco_test_all,
        d.image_source,
        d.tfds_data_dir,
        d.head_min,
        d.tail_max,
    )


def _voc_lt(config: ml_collections.ConfigDict) -> MultiLabelDataset:
    d = config.data
    return voc.load_voc_lt(
        d.root,
        d.split_dir,
        d.download_splits,
        d.image_source,
        d.tfds_data_dir,
        d.head_min,
        d.tail_max,
    )


def _coco_json(config: ml_collections.ConfigDict) -> MultiLabelDataset:
    d = config.data
    return custom.load_coco_json(
        d.train_annotations,
        d.train_images,
        d.test_annotations,
        d.test_images,
        name=d.name,
        head_min=d.head_min,
        tail_max=d.tail_max,
    )


def _csv(config: ml_collections.ConfigDict) -> MultiLabelDataset:
    d = config.data
    return custom.load_csv(
        d.train_annotations,
        d.train_images,
        d.test_annotations,
        d.test_images,
        name=d.name,
        head_min=d.head_min,
        tail_max=d.tail_max,
        label_separator=d.label_separator,
    )


for _name, _loader in (
    ("synthetic_lt", _synthetic),
    ("coco_lt", _coco_lt),
    ("voc_lt", _voc_lt),
    ("coco_json", _coco_json),
    ("csv", _csv),
):
    register_dataset(_name, _loader)
# Show a progress bar when checking at least this many images.
_PROGRESS_MIN = 500


def load_dataset(config: ml_collections.ConfigDict) -> MultiLabelDataset:
    """Builds the dataset named by `config.data.name`.

    File-based sources have every image checked (`check_images`). With
    `config.data.val_fraction > 0` the returned dataset's test split is a validation split
    carved from the training split (`carve_validation`), for model selection without the test
    split.

    Args:
      config: the experiment config (fields of `config.data` and `config.seed`).

    Returns:
      The dataset.
    """
    d = config.data
    if d.name not in _LOADERS:
        raise UserError(
            f"unknown config.data.name {d.name!r}; expected one of {list(_LOADERS)} "
            "(data.sources.register_dataset adds one)"
        )
    dataset = _LOADERS[d.name](config)

    if d.train_split_file:
        if d.name not in _CUSTOM:
            raise UserError(
                f"config.data.train_split_file is for coco_json and csv data, not {d.name!r}: "
                "leave it '' (the benchmarks take their split files from config.data.split_dir)"
            )
        # Before the image check, so only the chosen images are read.
        dataset = custom.apply_split_file(dataset, d.train_split_file, d.head_min, d.tail_max)
    if d.name != "synthetic_lt":
        train = check_images(dataset.train, d.skip_corrupt)
        test = check_images(dataset.test, d.skip_corrupt)
        class_split = dataset.class_split
        if d.name in _CUSTOM:  # groups follow the training counts, so recount after skipping
            class_split = class_groups(train.class_freq, d.head_min, d.tail_max)
        dataset = dataclasses.replace(dataset, train=train, test=test, class_split=class_split)
    if d.val_fraction > 0:
        dataset = carve_validation(dataset, d.val_fraction, config.seed)
    check_split_sizes(dataset, config)
    if 0 < config.eval.max_images < len(dataset.test):
        dataset = dataclasses.replace(
            dataset,
            test=spaced_subset(dataset.test, config.eval.max_images),
            full_test_size=len(dataset.test),
        )
    return dataset


def check_split_sizes(dataset: MultiLabelDataset, config: ml_collections.ConfigDict) -> None:
    """Stops a run whose training or test split is empty, before anything is trained.

    An empty test split would otherwise be found after the whole training (nothing to
    score); an empty training split gives no batches. A batch larger than the training split
    is allowed (the sampler repeats images) with a warning.

    Raises:
      UserError: a split holds no images; the message names where they come from.
    """
    d = config.data
    where = {
        "train": f"config.data.train_annotations = {d.train_annotations!r}",
        "test": f"config.data.test_annotations = {d.test_annotations!r}",
    }
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        if len(split) == 0:
            source = where[name] if d.name in _CUSTOM else f"config.data.root = {d.root!r}"
            extra = " (or data.val_fraction left no images for it)" if d.val_fraction > 0 else ""
            raise UserError(
                f"the {name} split of {dataset.name} holds no images ({source}){extra}: give it "
                "at least one image"
            )
    if config.train.batch_size > len(dataset.train):
        logging.warning(
            "config.train.batch_size = %d is larger than the %d training images: every batch "
            "repeats images",
            config.train.batch_size,
            len(dataset.train),
        )


def spaced_subset(split: Split, n: int) -> Split:
    """`n` images of `split`, evenly spaced over it (first and last included), in order."""
    return subset(split, np.round(np.linspace(0, len(split) - 1, n)).astype(np.int64))


def subset(split: Split, indices) -> Split:
    """The images of `split` at `indices`, in that order."""
    indices = np.asarray(indices, np.int64)
    return Split(
        images=[split.images[i] for i in indices],
        labels=split.labels[indices],
        ids=[split.ids[i] for i in indices],
    )


def decode_error(path: str) -> str | None:
    """Why the training input pipeline cannot decode the image file `path`, or None.

    The check runs the pipeline's own decoder (`pipeline._decode`, TensorFlow's
    decode_image), so a file Pillow reads but TensorFlow does not (TIFF, for one) fails here,
    before training, and not in the middle of an epoch.

    Args:
      path: an image file.

    Returns:
      None when it decodes fully; otherwise the decoder's reason, one line.
    """
    import tensorflow as tf

    from mlcnc_jax.data import pipeline  # the decoder training uses

    try:
        pipeline._decode(tf.io.read_file(path))
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", str(e))
        # Drop TensorFlow's '{{function_node ...}}' prefix and '[Op:DecodeImage]' suffix.
        message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", message).strip()
        return f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"
    return None


def decode_errors(paths: Sequence[str]) -> list[str | None]:
    """`decode_error` of every file of `paths`, in parallel; a missing file is an error too.

    For a batch of user files (e.g. prediction inputs) that should go on past the bad ones.

    Args:
      paths: image files.

    Returns:
      Per path, None (it decodes) or the reason it does not, e.g. 'not found'.
    """
    from tqdm import tqdm

    def one(path: str) -> str | None:
        return "not found" if not os.path.isfile(path) else decode_error(path)

    # TensorFlow's kernels run without the GIL, so threads use all cores.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(
            tqdm(
                pool.map(one, paths, chunksize=16),
                total=len(paths),
                desc="checking images",
                disable=len(paths) < _PROGRESS_MIN,
            )
        )


def check_images(split: Split, skip_corrupt: bool) -> Split:
    """Checks that every image file of `split` exists and decodes fully with the training decoder.

    Splits whose images are encoded bytes (tfds sources) are returned unchanged.

    Args:
      split: a split whose images are file paths.
      skip_corrupt: drop images that cannot be decoded (and log how many) instead of failing.

    Returns:
      The split, without the undecodable images when `skip_corrupt`.

    Raises:
      FileNotFoundError: an image file does not exist (always, whatever `skip_corrupt`).
      ValueError: an image cannot be decoded and `skip_corrupt` is False.
    """
    if not len(split) or not isinstance(split.images[0], str):
        return split
    missing = [p for p in split.images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image files not found, e.g. {missing[0]}"
            + (f" and {missing[1]}" if len(missing) > 1 else "")
            + ": check config.data.root / the image folders (the annotations name these files)"
        )
    errors = decode_errors(split.images)
    bad = [i for i, e in enumerate(errors) if e is not None]
    if not bad:
        return split
    if not skip_corrupt:
        first = bad[0]
        raise UserError(
            f"{len(bad)} images cannot be decoded by the input pipeline (JPEG, PNG, GIF, BMP "
            f"and WebP can), e.g. {split.images[first]} ({errors[first]}). Replace or convert "
            "them, or skip such images with --config.data.skip_corrupt=True"
        )
    logging.warning(
        "skipped %d of %d images that cannot be decoded (e.g. %s: %s)",
        len(bad),
        len(split),
        split.images[bad[0]],
        errors[bad[0]],
    )
    keep = np.setdiff1d(np.arange(len(split)), bad)
    return subset(split, keep)


def carve_validation(dataset: MultiLabelDataset, fraction: float, seed: int) -> MultiLabelDataset:
    """Moves a fraction of the training images into a validation split.

    Images are visited in a seeded random order and moved while every class they contain keeps
    at least one training image, so no class loses all its training data where that can be
    avoided. The class groups stay those of `dataset`, so validation and test metrics per group
    are comparable.

    Args:
      dataset: the dataset.
      fraction: share of the training images to move, in (0, 1).
      seed: the random seed.

    Returns:
      A dataset named `<name>_val` whose train split is the rest and whose test split is the
      validation split.
    """
    if not 0 < fraction < 1:
        raise UserError(f"config.data.val_fraction must be in [0, 1), got {fraction}")
    labels = dataset.train.labels.astype(np.int64)
    n = len(labels)
    target = int(round(fraction * n))
    remaining = labels.sum(axis=0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A1]))
    val = []
    for i in rng.permutation(n):
        if len(val) == target:
            break
        if np.all(remaining[labels[i] > 0] > 1):
            val.append(i)
            remaining -= labels[i]
    val_idx = np.sort(np.asarray(val, np.int64))
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return MultiLabelDataset(
        name=dataset.name + "_val",
        class_names=list(dataset.class_names),
        train=subset(dataset.train, train_idx),
        test=subset(dataset.train, val_idx),
        class_split=dataset.class_split,
    )
