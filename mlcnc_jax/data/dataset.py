"""Multi-label dataset records shared by every source and the input pipeline.

A source (synthetic, COCO, VOC, CSV, ...) turns files on disk into a
`MultiLabelDataset`: for each split, where each image lives (a file path or its
encoded bytes) and its multi-hot labels. The tf.data pipeline only ever sees
these records, so every source trains and evaluates through the same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mlcnc_jax.groups import HEAD_MIN, TAIL_MAX, class_groups  # noqa: F401 (re-exported)


@dataclasses.dataclass
class Split:
    """One split of a multi-label dataset.

    Attributes:
      images: per image, either a file path (str) or the encoded image (bytes,
        JPEG or PNG), all of one kind; or the decoded pixels of every image as one
        [N, H, W, 3] array at the training size (held in memory, batched without
        TensorFlow: `feeds`).
      labels: [N, K] uint8 multi-hot labels.
      ids: per image, its identifier in the source (COCO id, VOC name, ...).
    """

    images: Sequence[str] | Sequence[bytes] | np.ndarray
    labels: np.ndarray
    ids: Sequence

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.uint8)
        if self.labels.ndim != 2:
            raise ValueError(f"labels must be [N, K], got shape {self.labels.shape}")
        if not (len(self.images) == len(self.labels) == len(self.ids)):
            raise ValueError(
                f"images ({len(self.images)}), labels ({len(self.labels)}) and ids "
                f"({len(self.ids)}) must have the same length"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_freq(self) -> np.ndarray:
        """[K] int64: number of images that contain each class."""
        return self.labels.astype(np.int64).sum(axis=0)


@dataclasses.dataclass
class MultiLabelDataset:
    """A long-tailed multi-label dataset: train and test splits plus class facts.

    Attributes:
      name: dataset name, e.g. 'coco_lt'.
      class_names: [K] class names in label order.
      train: the (long-tailed) training split.
      test: the test split.
      class_split: {'head', 'medium', 'tail'} class index lists. Defaults to the
        groups computed from the training frequencies.
      full_test_size: when `test` is an evenly spaced part of the test split
        (eval.max_images), the whole split's size; None when `test` is the whole split.
    """

    name: str
    class_names: list[str]
    train: Split
    test: Split
    class_split: dict[str, list[int]] | None = None
    full_test_size: int | None = None

    def __post_init__(self):
        k = len(self.class_names)
        for split_name, split in (("train", self.train), ("test", self.test)):
            if split.labels.shape[1] != k:
                raise ValueError(
                    f"{split_name} labels have {split.labels.shape[1]} classes but there are "
                    f"{k} class names"
                )
        if self.class_split is None:
            self.class_split = class_groups(self.train.class_freq)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_freq(self) -> np.ndarray:
        """[K] training images per class."""
        return self.train.class_freq
