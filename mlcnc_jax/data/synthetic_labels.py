"""Label plans of the built-in `synthetic_lt` dataset: which classes each image holds.

Two class sets exist:

* 'target': the benchmark. 20 classes: the ten digits (in the font of the 'pretrain'
  letters: other classes of the same visual domain, as VOC's are of ImageNet's) and ten
  drawn shapes, chosen to stay apart from each other and from the digits at 32 px.
  The train split is long-tailed like VOC-LT (about 1,100 images; 6 head, 6
  medium and 8 tail classes, tail classes co-occurring with head classes); the
  test split is nearly balanced (120 images anchored on each class).
  A second training split of the same classes, `train_split='dbloss'`, comes from the
  long-tailed split builder (lt_builder.py, the protocol that made COCO-LT and VOC-LT)
  applied to a balanced pool with more objects per image, so that a verdict on the
  built-in data does not hang on one hand-made split.
* 'pretrain': 20 other classes (letters and other shapes, never digits), balanced
  and larger (10,000 train images), to pre-train a CPU backbone the way ImageNet
  pre-training precedes the real benchmarks.

Every plan is deterministic from the seed: the per-class counts, which classes are
head/medium/tail and the label of every image. This module needs numpy only (no
TensorFlow, no PIL), so the config checks can import its names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlcnc_jax.data import dataset as dataset_lib

DIGIT_CLASSES = tuple(f"digit_{d}" for d in range(10))
TARGET_SHAPES = (
    "circle",
    "ring",
    "delta",
    "square",
    "hash",
    "cross",
    "bullseye",
    "crescent",
    "bowtie",
    "dots",
)
# Letters that do not resemble a digit (no O, I, S, Z, L, ...).
PRETRAIN_LETTERS = ("A", "B", "E", "F", "G", "H", "K", "M", "P", "R", "W", "Y")
PRETRAIN_SHAPES = (
    "pentagon",
    "hexagon",
    "ellipse",
    "trapezoid",
    "frame",
    "checker",
    "stripes",
    "zigzag",
)
CLASS_SETS = {
    "target": DIGIT_CLASSES + TARGET_SHAPES,
    "pretrain": tuple(f"letter_{c}" for c in PRETRAIN_LETTERS) + PRETRAIN_SHAPES,
}

# The values of config.data.synthetic_classes and config.data.synthetic_train_split.
SYNTHETIC_CLASSES = tuple(CLASS_SETS)
SYNTHETIC_TRAIN_SPLITS = ("planned", "dbloss")

# Long-tailed train profile of 'target': n_r = round(MAX * exp(-DECAY * r)) for rank r.
# With these values ranks 0-5 have >= 100 images, 6-11 have 20-99 and 12-19 < 20,
# the 6/6/8 head/medium/tail split of VOC-LT.
TRAIN_MAX_COUNT = 400
TRAIN_DECAY = 0.26
TEST_PER_CLASS = 120  # target test: images anchored on each class
PRETRAIN_TRAIN_PER_CLASS = 500
PRETRAIN_TEST_PER_CLASS = 60
# Further classes per 'pretrain' image (0, 1, 2): mostly one or two objects, object-centric
# like the ImageNet pre-training it stands in for.
PRETRAIN_EXTRA_P = (0.5, 0.35, 0.15)
# train_split='dbloss': a balanced pool of DBLOSS_POOL_PER_CLASS images anchored on each
# class, with more objects per image than the test split (its own object mix), cut to a
# long tail by lt_builder.build_long_tail (Pareto profile from DBLOSS_MAX_COUNT down to
# DBLOSS_MIN_COUNT images, the first-ranked class largest).
# With these values: about 1,100 images (seed 0: 1,094; 6/7/7 head/medium/tail; 1.84
# objects per image against the planned split's 1.58).
DBLOSS_POOL_PER_CLASS = 1000
DBLOSS_EXTRA_P = (0.3, 0.35, 0.25, 0.1)
DBLOSS_MAX_COUNT = 1500
DBLOSS_MIN_COUNT = 4


def train_class_counts(
    num_classes: int = 20, max_count: int = TRAIN_MAX_COUNT, decay: float = TRAIN_DECAY
) -> np.ndarray:
    """Training images per class rank of the long-tailed 'target' split.

    Args:
      num_classes: number of classes K.
      max_count: images of the most frequent class.
      decay: exponential decay per rank.

    Returns:
      [K] int64 counts, non-increasing; rank r gets round(max_count * exp(-decay * r)),
      at least 1.
    """
    ranks = np.arange(num_classes)
    return np.maximum(1, np.round(max_count * np.exp(-decay * ranks))).astype(np.int64)


def plan_train_labels(num_classes: int, seed: int) -> np.ndarray:
    """Label matrix of the long-tailed train split, with exact per-class counts.

    Which class gets which rank of `train_class_counts` is a seeded permutation.
    Every positive of a non-head class opens its own image, which usually also
    holds one or two head classes (tail classes co-occur with head classes as in
    real data); the remaining head positives fill images of 1-3 head classes.

    Args:
      num_classes: K.
      seed: plan seed.

    Returns:
      [N, K] uint8 multi-hot labels; column sums equal the planned counts.
    """
    rng = np.random.default_rng([seed, 7001])
    counts = np.zeros(num_classes, np.int64)
    counts[rng.permutation(num_classes)] = train_class_counts(num_classes)
    head = [c for c in range(num_classes) if counts[c] >= dataset_lib.HEAD_MIN]
    left = counts.copy()

    def take(pool: Sequence[int], n: int, exclude: Sequence[int] = ()) -> list[int]:
        # Draw n distinct classes from `pool`, weighted by their remaining positives.
        cands = np.array([c for c in pool if left[c] > 0 and c not in exclude], np.int64)
        n = min(n, len(cands))
        if n == 0:
            return []
        p = left[cands] / left[cands].sum()
        chosen = [int(c) for c in rng.choice(cands, size=n, replace=False, p=p)]
        left[chosen] -= 1
        return chosen

    rows = []
    rare = [c for c in range(num_classes) if c not in head for _ in range(counts[c])]
    for c in rng.permutation(rare):
        if left[c] == 0:  # already used as a companion of another rare class
            continue
        left[c] -= 1
        row = [int(c)]
        if rng.random() < 0.75:
            row += take(head, 1 + int(rng.random() < 0.25))
        if rng.random() < 0.1:
            row += take([k for k in range(num_classes) if k not in head], 1, row)
        rows.append(row)
    while left[head].sum() > 0:
        rows.append(take(head, int(rng.choice([1, 2, 3], p=[0.7, 0.25, 0.05]))))
    order = rng.permutation(len(rows))
    labels = np.zeros((len(rows), num_classes), np.uint8)
    for i, j in enumerate(order):
        labels[i, rows[j]] = 1
    return labels


def plan_dbloss_train_labels(num_classes: int, seed: int) -> np.ndarray:
    """Label matrix of the 'dbloss' train split: lt_builder's long tail of a balanced pool.

    Args:
      num_classes: K.
      seed: plan seed (of the pool and of the builder's random choices).

    Returns:
      [N, K] uint8 multi-hot labels, the selected pool images in pool order.
    """
    from mlcnc_jax.data import lt_builder

    pool = plan_anchored_labels(
        num_classes, DBLOSS_POOL_PER_CLASS, seed, 7006, extra_p=DBLOSS_EXTRA_P
    )
    keep = lt_builder.build_long_tail(pool, DBLOSS_MAX_COUNT, min_count=DBLOSS_MIN_COUNT, seed=seed)
    return pool[keep]


def plan_anchored_labels(
    num_classes: int,
    per_class: int,
    seed: int,
    salt: int,
    extra_p: Sequence[float] = (0.4, 0.3, 0.2, 0.1),
) -> np.ndarray:
    """Nearly balanced labels: `per_class` images anchored on each class, plus a few others.

    Args:
      num_classes: K.
      per_class: images whose first object is each class.
      seed: plan seed.
      salt: separates the streams of different splits.
      extra_p: probabilities of 0, 1, 2, ... further classes in an image.

    Returns:
      [K * per_class, K] uint8 multi-hot labels; every class has >= per_class positives.
    """
    rng = np.random.default_rng([seed, salt])
    anchors = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    labels = np.zeros((len(anchors), num_classes), np.uint8)
    for i, a in enumerate(anchors):
        extra = rng.choice(len(extra_p), p=extra_p)
        others = rng.choice(np.delete(np.arange(num_classes), a), size=extra, replace=False)
        labels[i, a] = 1
        labels[i, others] = 1
    return labels


def split_labels(classes: str, seed: int, split: str, train_split: str = "planned") -> np.ndarray:
    """The planned [N, K] labels of one split (cheap: nothing is rendered).

    Args:
      classes: 'target' or 'pretrain'.
      seed: generation seed.
      split: 'train' or 'test'.
      train_split: 'planned' or 'dbloss' (which long tail the 'target' train split is).

    Returns:
      [N, K] uint8 multi-hot labels, in image order.
    """
    k = len(CLASS_SETS[classes])
    if classes == "target":
        if split == "train":
            if train_split == "dbloss":
                return plan_dbloss_train_labels(k, seed)
            return plan_train_labels(k, seed)
        return plan_anchored_labels(k, TEST_PER_CLASS, seed, 7002)
    per_class = PRETRAIN_TRAIN_PER_CLASS if split == "train" else PRETRAIN_TEST_PER_CLASS
    return plan_anchored_labels(
        k, per_class, seed, 7004 if split == "train" else 7005, extra_p=PRETRAIN_EXTRA_P
    )
