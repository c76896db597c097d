"""The built-in `synthetic_lt` dataset: a long-tailed multi-label benchmark that needs no download.

A tensorflow-datasets builder renders small RGB images holding 1-4 objects over
cluttered backgrounds. Two class sets exist:

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

Everything is deterministic from the builder config's seed: the per-class counts,
which classes are head/medium/tail, the label of every image and every pixel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import pathlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from mlcnc_jax import configuration
from mlcnc_jax.data import dataset as dataset_lib
from mlcnc_jax.errors import UserError

# Keep TensorFlow off the accelerators: JAX owns them.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # devices already initialised elsewhere; nothing to undo
    pass

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
MAX_OBJECTS = 4
# Difficulty. Object side as a fraction of the image side, by how many objects the image
# holds (1, 2, 3+); objects lie wholly inside the image and overlap each other by at most
# MAX_OVERLAP of the smaller one where PLACEMENT_TRIES random positions allow; a few
# distractor strokes under them, none over them. Version 1.x cut objects at the border and
# stacked them (side 0.45-0.75 whatever their number, occluding strokes on top): labels
# then named objects that were hidden, and a small ResNet reached only 30-45 mAP on the
# balanced 'pretrain' classes; version 2.0.0 keeps every labelled object visible.
# 'pretrain' uses OBJECT_SIDE, 'target' TARGET_OBJECT_SIDE (2.1.0: somewhat larger objects,
# whose digit strokes stay legible at 32 px; the price: on the test split 28 % of the objects
# placed after the first overlap an earlier one's box by more than MAX_OVERLAP, 16 % at
# OBJECT_SIDE).
OBJECT_SIDE = ((0.5, 0.75), (0.4, 0.55), (0.34, 0.46))
TARGET_OBJECT_SIDE = ((0.55, 0.8), (0.44, 0.58), (0.37, 0.49))
MAX_OVERLAP = 0.1
PLACEMENT_TRIES = 30
DISTRACTORS = (0, 3)
NOISE_MAX = 6.0
# train_split='dbloss': a balanced pool of DBLOSS_POOL_PER_CLASS images anchored on each
# class, with more objects per image than the test split (its own object mix), cut to a
# long tail by lt_builder.build_long_tail (Pareto profile from DBLOSS_MAX_COUNT down to
# DBLOSS_MIN_COUNT images, the first-ranked class largest).
TRAIN_SPLITS = configuration.SYNTHETIC_TRAIN_SPLITS
# With these values: about 1,100 images (seed 0: 1,094; 6/7/7 head/medium/tail; 1.84
# objects per image against the planned split's 1.58).
DBLOSS_POOL_PER_CLASS = 1000
DBLOSS_EXTRA_P = (0.3, 0.35, 0.25, 0.1)
DBLOSS_MAX_COUNT = 1500
DBLOSS_MIN_COUNT = 4
_SPLIT_CODES = {"train": 1, "test": 2}


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


# ----------------------------------------------------------------------------- rendering


def _polygon(points: Sequence[tuple[float, float]], res: int) -> Image.Image:
    """Mask of a polygon given in [-1, 1]^2 coordinates, rendered at res x res."""
    mask = Image.new("L", (res, res), 0)
    half = (res - 1) / 2
    ImageDraw.Draw(mask).polygon([(half + x * half, half - y * half) for x, y in points], fill=255)
    return mask


def _regular(n: int, radius: float = 1.0, phase: float = 90.0) -> list[tuple[float, float]]:
    return [
        (
            radius * math.cos(math.radians(phase + 360 * i / n)),
            radius * math.sin(math.radians(phase + 360 * i / n)),
        )
        for i in range(n)
    ]


def _shape_mask(kind: str, res: int, rng: np.random.Generator) -> Image.Image:
    """A white-on-black mask of one drawn shape, filling most of a res x res square."""
    m = Image.new("L", (res, res), 0)
    d = ImageDraw.Draw(m)
    r = res - 1
    w = max(1, round(res * 0.16))
    if kind == "circle":
        d.ellipse([0.05 * r, 0.05 * r, 0.95 * r, 0.95 * r], fill=255)
    elif kind == "ring":
        d.ellipse([0.05 * r, 0.05 * r, 0.95 * r, 0.95 * r], outline=255, width=w)
    elif kind == "ellipse":
        d.ellipse([0.02 * r, 0.28 * r, 0.98 * r, 0.72 * r], fill=255)
    elif kind == "crescent":
        d.ellipse([0.05 * r, 0.05 * r, 0.95 * r, 0.95 * r], fill=255)
        d.ellipse([0.3 * r, -0.05 * r, 1.15 * r, 0.8 * r], fill=0)
    elif kind == "square":
        return _polygon(_regular(4, 0.95, 45), res)
    elif kind == "pentagon":
        return _polygon(_regular(5, 0.95), res)
    elif kind == "hexagon":
        return _polygon(_regular(6, 0.95, 0), res)
    elif kind == "cross":
        a = 0.3
        return _polygon(
            [
                (-a, 1),
                (a, 1),
                (a, a),
                (1, a),
                (1, -a),
                (a, -a),
                (a, -1),
                (-a, -1),
                (-a, -a),
                (-1, -a),
                (-1, a),
                (-a, a),
            ],
            res,
        )
    elif kind == "bowtie":
        m = _polygon([(-1, 0.75), (0, 0), (-1, -0.75)], res)
        m.paste(255, mask=_polygon([(1, 0.75), (0, 0), (1, -0.75)], res))
        return m
    elif kind == "dots":
        # Three separate disks at the corners of a triangle.
        rad = 0.21 * r
        for x, y in _regular(3, 0.7):
            cx, cy = r / 2 + x * r / 2, r / 2 - y * r / 2
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=255)
    elif kind == "hash":
        # '#': two horizontal and two vertical bars.
        for t in (0.3, 0.7):
            d.rectangle([t * r - w / 2, 0.05 * r, t * r + w / 2, 0.95 * r], fill=255)
            d.rectangle([0.05 * r, t * r - w / 2, 0.95 * r, t * r + w / 2], fill=255)
    elif kind == "bullseye":
        # A disk inside a ring.
        d.ellipse([0.05 * r, 0.05 * r, 0.95 * r, 0.95 * r], outline=255, width=w)
        d.ellipse([0.33 * r, 0.33 * r, 0.67 * r, 0.67 * r], fill=255)
    elif kind == "delta":
        # A hollow triangle.
        m = _polygon(_regular(3, 0.95), res)
        m.paste(0, mask=_polygon(_regular(3, 0.4), res))
        return m
    elif kind == "trapezoid":
        return _polygon([(-1, -0.6), (1, -0.6), (0.5, 0.6), (-0.5, 0.6)], res)
    elif kind == "frame":
        d.rectangle([0.08 * r, 0.08 * r, 0.92 * r, 0.92 * r], outline=255, width=w)
    elif kind == "checker":
        cells = 4
        for i in range(cells):
            for j in range(cells):
                if (i + j) % 2 == 0:
                    d.rectangle(
                        [i * r / cells, j * r / cells, (i + 1) * r / cells, (j + 1) * r / cells],
                        fill=255,
                    )
    elif kind == "stripes":
        n = 4
        for i in range(n):
            d.rectangle([0.05 * r, (i + 0.2) * r / n, 0.95 * r, (i + 0.7) * r / n], fill=255)
    elif kind == "zigzag":
        pts = [(0.05 * r + i * 0.9 * r / 4, (0.2 if i % 2 else 0.8) * r) for i in range(5)]
        d.line(pts, fill=255, width=w, joint="curve")
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return m


def _glyph_mask(letter: str, res: int) -> Image.Image:
    """A letter or digit in PIL's default font, scaled to fill a res x res square."""
    font = ImageFont.load_default(size=res)
    canvas = Image.new("L", (2 * res, 2 * res), 0)
    ImageDraw.Draw(canvas).text((res // 2, res // 4), letter, fill=255, font=font)
    box = canvas.getbbox()
    glyph = canvas.crop(box)
    scale = 0.95 * res / max(glyph.size)
    glyph = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.BILINEAR
    )
    out = Image.new("L", (res, res), 0)
    out.paste(glyph, ((res - glyph.width) // 2, (res - glyph.height) // 2))
    return out


class _Renderer:
    """Draws the images of one builder config."""

    def __init__(self, classes: str, image_size: int, seed: int):
        self.names = CLASS_SETS[classes]
        self.size = image_size
        self.object_side = TARGET_OBJECT_SIDE if classes == "target" else OBJECT_SIDE

    def _mask(
        self, name: str, res: int, split: str, rng: np.random.Generator
    ) -> tuple[Image.Image, float]:
        """Mask of one object at res x res, and its allowed rotation range (degrees)."""
        if name.startswith("digit_"):
            return _glyph_mask(name[-1], res), 25.0  # 6 and 9 must stay apart
        if name.startswith("letter_"):
            return _glyph_mask(name[-1], res), 25.0
        return _shape_mask(name, res, rng), 180.0

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        blobs = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize(
            (s, s), Image.BICUBIC
        )
        img = 0.55 * img + 0.45 * np.asarray(blobs, np.float64)
        return img

    def _strokes(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int) -> None:
        # Distractors: pen-like polylines, arcs and irregular blobs of random colours.
        s = self.size
        for _ in range(n):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            width = max(1, round(s / 64 * rng.uniform(1, 3.5)))
            kind = rng.integers(3)
            if kind == 0:
                pts = [tuple(rng.uniform(-0.1, 1.1, 2) * s) for _ in range(rng.integers(2, 5))]
                draw.line(pts, fill=colour, width=width, joint="curve")
            elif kind == 1:
                x0, y0 = rng.uniform(-0.2, 0.9, 2) * s
                w, h = rng.uniform(0.1, 0.5, 2) * s
                a0 = rng.uniform(0, 360)
                draw.arc(
                    [x0, y0, x0 + w, y0 + h],
                    a0,
                    a0 + rng.uniform(60, 300),
                    fill=colour,
                    width=width,
                )
            else:
                cx, cy = rng.uniform(0, 1, 2) * s
                rad = rng.uniform(0.04, 0.12) * s
                angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 9)))
                radii = rad * rng.uniform(0.5, 1.3, len(angles))
                draw.polygon(
                    [
                        (cx + r * np.cos(a), cy + r * np.sin(a))
                        for a, r in zip(angles, radii, strict=True)
                    ],
                    fill=colour,
                )

    def _place(
        self, w: int, h: int, boxes: list[tuple[int, int, int, int]], rng: np.random.Generator
    ) -> tuple[int, int]:
        """Top-left corner of a w x h object inside the image, overlapping the others little."""
        s = self.size
        best, best_overlap = (0, 0), np.inf
        for _ in range(PLACEMENT_TRIES):
            x0 = int(rng.integers(0, max(1, s - w + 1)))
            y0 = int(rng.integers(0, max(1, s - h + 1)))
            overlap = 0.0
            for bx, by, bw, bh in boxes:
                ix = max(0, min(x0 + w, bx + bw) - max(x0, bx))
                iy = max(0, min(y0 + h, by + bh) - max(y0, by))
                overlap = max(overlap, ix * iy / min(w * h, bw * bh))
            if overlap < best_overlap:
                best, best_overlap = (x0, y0), overlap
            if overlap <= MAX_OVERLAP:
                break
        return best

    def render(self, label_row: np.ndarray, split: str, rng: np.random.Generator) -> np.ndarray:
        """[S, S, 3] uint8 image holding one object of each positive class of `label_row`."""
        s = self.size
        classes = [int(c) for c in rng.permutation(np.flatnonzero(label_row))]
        # A second instance of a present class now and then (counts do not change).
        while len(classes) < MAX_OBJECTS and rng.random() < 0.15:
            classes.append(classes[rng.integers(len(classes))])
        bg = self._background(rng)
        canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        self._strokes(ImageDraw.Draw(canvas), rng, int(rng.integers(*DISTRACTORS)))
        lo, hi = self.object_side[min(len(classes), len(self.object_side)) - 1]
        boxes: list[tuple[int, int, int]] = []
        for c in rng.permutation(classes):
            side = rng.uniform(lo, hi) * s
            res = max(8, int(round(2 * side)))  # render at 2x, then downscale: antialiasing
            mask, max_rot = self._mask(self.names[c], res, split, rng)
            mask = mask.rotate(rng.uniform(-max_rot, max_rot), resample=Image.BICUBIC, expand=True)
            mask = mask.crop(mask.getbbox() or (0, 0, mask.width, mask.height))
            out_w, out_h = max(3, round(mask.width / 2)), max(3, round(mask.height / 2))
            mask = mask.resize((out_w, out_h), Image.BOX)
            x0, y0 = self._place(out_w, out_h, boxes, rng)
            boxes.append((x0, y0, out_w, out_h))
            # Pick a colour that stands out from the background under the object.
            patch = np.asarray(canvas.crop((x0, y0, x0 + out_w, y0 + out_h)), np.float64).reshape(
                -1, 3
            )
            lum_bg = patch.mean(0) @ np.array([0.299, 0.587, 0.114])
            for _ in range(8):
                colour = rng.integers(0, 256, 3)
                if abs(colour @ np.array([0.299, 0.587, 0.114]) - lum_bg) > 80:
                    break
            canvas.paste(tuple(int(v) for v in colour), (x0, y0, x0 + out_w, y0 + out_h), mask)
        img = np.asarray(canvas, np.float64) + rng.normal(0, rng.uniform(2, NOISE_MAX), (s, s, 3))
        return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------- tfds builder


@dataclasses.dataclass(eq=False)
class SyntheticLtConfig(tfds.core.BuilderConfig):
    """Builder config of `synthetic_lt`.

    Attributes:
      classes: 'target' (the long-tailed benchmark) or 'pretrain' (20 other classes).
      image_size: side of the square images, pixels.
      seed: generation seed.
      train_split: 'planned' (the hand-made long tail) or 'dbloss' (lt_builder's, 'target').
    """

    classes: str = "target"
    image_size: int = 64
    seed: int = 0
    train_split: str = "planned"


def make_config(
    classes: str = "target", image_size: int = 64, seed: int = 0, train_split: str = "planned"
) -> SyntheticLtConfig:
    """The builder config for a class set, image size, seed and train split (registered reused).

    Args:
      classes: 'target' or 'pretrain'.
      image_size: image side in pixels (>= 16).
      seed: generation seed.
      train_split: 'planned' or 'dbloss' (the 'target' classes only).

    Returns:
      A `SyntheticLtConfig` named '<classes>_<size>' (seed 0) or '<classes>_<size>_seed<seed>',
      with '_dbloss' appended for that train split.
    """
    if classes not in CLASS_SETS:
        raise UserError(
            f"synthetic_lt classes must be one of {sorted(CLASS_SETS)}, got {classes!r}"
        )
    if int(image_size) < 16:
        raise UserError(f"synthetic_lt image_size must be >= 16 pixels, got {image_size}")
    if train_split not in TRAIN_SPLITS or (train_split != "planned" and classes != "target"):
        raise UserError(
            f"synthetic_lt train_split must be one of {TRAIN_SPLITS} ('dbloss' for the 'target' "
            f"classes only), got {train_split!r} for {classes!r}"
        )
    name = f"{classes}_{int(image_size)}" + (f"_seed{int(seed)}" if int(seed) else "")
    name += "" if train_split == "planned" else f"_{train_split}"
    for config in SyntheticLt.BUILDER_CONFIGS:
        if config.name == name:
            return config
    return SyntheticLtConfig(
        name=name,
        classes=classes,
        image_size=int(image_size),
        seed=int(seed),
        train_split=train_split,
        description=f"{classes} classes, {image_size} px, seed {seed}, {train_split} train split",
    )


class SyntheticLt(tfds.core.GeneratorBasedBuilder):
    """Long-tailed multi-label images of digits and shapes over clutter (no download)."""

    VERSION = tfds.core.Version("2.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Larger objects, fewer distractors: learnable from scratch on a CPU budget.",
        "2.0.0": "Every labelled object wholly visible: inside the image, little overlap, no "
        "occluding strokes; object size by object count; object-centric pretrain images; "
        "digits in the letters' font (1.x: MNIST handwriting).",
        "2.1.0": "Target shapes that stay apart at 32 px: delta (hollow triangle), hash, "
        "bullseye and dots replace triangle, star, arrow and chevron (which the small trunk "
        "confused with each other and with the bowtie); target objects somewhat larger. The "
        "'pretrain' images are unchanged.",
    }
    BUILDER_CONFIGS = [
        SyntheticLtConfig(
            name="target_64",
            classes="target",
            image_size=64,
            seed=0,
            description="benchmark, 64 px",
        ),
        SyntheticLtConfig(
            name="pretrain_64",
            classes="pretrain",
            image_size=64,
            seed=0,
            description="pre-training, 64 px",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        k = len(CLASS_SETS[cfg.classes])
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(cfg.image_size, cfg.image_size, 3), encoding_format="png"
                    ),
                    "labels": tfds.features.Tensor(shape=(k,), dtype=np.uint8),
                    "id": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_SETS[cfg.classes])),
            supervised_keys=("image", "labels"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        from mlcnc_jax import console

        cfg = self.builder_config
        images = generate(cfg.classes, cfg.image_size, cfg.seed, split, train_split=cfg.train_split)
        total = len(split_labels(cfg.classes, cfg.seed, split, cfg.train_split))
        with console.bar(total, f"generating {cfg.name} {split}", unit="image") as live:
            for key, png, labels in images:
                yield key, {"image": io.BytesIO(png), "labels": labels, "id": key}
                live.update(1)


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


def generate(
    classes: str,
    image_size: int,
    seed: int,
    split: str,
    indices: Sequence[int] | None = None,
    train_split: str = "planned",
) -> Iterator[tuple[str, bytes, np.ndarray]]:
    """Renders one split: yields (id, PNG bytes, [K] uint8 labels) per image.

    Each image is drawn from its own generator seeded by (seed, split, index), so
    any image can be reproduced alone.

    Args:
      classes: 'target' or 'pretrain'.
      image_size: image side, pixels.
      seed: generation seed.
      split: 'train' or 'test'.
      indices: render only these images of the split (default: all, in order).
      train_split: 'planned' or 'dbloss'.
    """
    labels = split_labels(classes, seed, split, train_split)
    renderer = _Renderer(classes, image_size, seed)
    for i in range(len(labels)) if indices is None else indices:
        row = labels[i]
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
        yield f"{split}_{i:05d}", _png(renderer.render(row, split, rng)), row


# ----------------------------------------------------------------------------- loading


def builder(
    classes: str,
    image_size: int,
    seed: int,
    data_dir: str | os.PathLike,
    train_split: str = "planned",
) -> SyntheticLt:
    """The `synthetic_lt` builder for these parameters, storing under data_dir."""
    return SyntheticLt(
        config=make_config(classes, image_size, seed, train_split), data_dir=os.fspath(data_dir)
    )


def _read_split(ds_builder: SyntheticLt, split: str) -> dataset_lib.Split:
    try:
        ds = ds_builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
        examples = sorted(
            ((ex["id"].decode(), ex["image"], ex["labels"]) for ex in tfds.as_numpy(ds)),
            key=lambda e: e[0],
        )
    except (tf.errors.OpError, OSError, AssertionError) as e:
        # A truncated or deleted record file (a full disk or a kill while it was copied):
        # the data is generated, so deleting the folder regenerates it whole.
        # TensorFlow's messages start with "{{function_node ...}}": what follows is the point.
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = text.rsplit("}} ", 1)[-1].split(" [Op:")[0][:200] or type(e).__name__
        folder = ds_builder.data_dir
        raise UserError(
            f"the cached synthetic_lt data in {folder} is damaged ({split} split: "
            f"{type(e).__name__}: {reason}): delete {folder} and run again to regenerate it"
        ) from None
    if len(examples) != ds_builder.info.splits[split].num_examples:
        folder = ds_builder.data_dir
        raise UserError(
            f"the cached synthetic_lt data in {folder} is damaged ({split} split: "
            f"{len(examples)} of {ds_builder.info.splits[split].num_examples} images): delete "
            f"{folder} and run again to regenerate it"
        )
    ids = [e[0] for e in examples]
    k = len(CLASS_SETS[ds_builder.builder_config.classes])
    labels = np.stack([e[2] for e in examples]) if examples else np.zeros((0, k), np.uint8)
    return dataset_lib.Split(images=[bytes(e[1]) for e in examples], labels=labels, ids=ids)


@contextlib.contextmanager
def generation_lock(root: pathlib.Path, name: str) -> Iterator[None]:
    """Holds `<root>/.synthetic_lt_<name>.lock` exclusively while one process generates.

    Runs that start together on one machine (the quality benchmark's workers, a parallel
    test session) then generate each dataset once: the others wait, then read it. Where
    there is no `fcntl` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".synthetic_lt_{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(config) -> dataset_lib.MultiLabelDataset:
    """Loads `synthetic_lt`, generating it first into config.data.root if needed.

    Images stay PNG-encoded in memory; the input pipeline decodes them.

    Args:
      config: the project ConfigDict; reads data.root, data.image_size,
        data.synthetic_seed, data.synthetic_classes, data.synthetic_train_split,
        data.head_min, data.tail_max.

    Returns:
      The dataset with 'train' and 'test' splits; class_split from the training counts.
    """
    classes = config.data.synthetic_classes
    if classes not in CLASS_SETS:
        raise UserError(
            f"config.data.synthetic_classes must be 'target' or 'pretrain', got {classes!r}"
        )
    root = pathlib.Path(os.path.expanduser(config.data.root))

    def make_builder() -> SyntheticLt:
        return builder(
            classes,
            config.data.image_size,
            config.data.synthetic_seed,
            root,
            config.data.synthetic_train_split,
        )

    ds_builder = make_builder()
    if not ds_builder.is_prepared():
        name = ds_builder.builder_config.name
        with generation_lock(root, name):
            # Another process may have generated it while this one waited for the lock.
            ds_builder = make_builder()
            if not ds_builder.is_prepared():
                print(f"Generating synthetic_lt/{name} into {ds_builder.data_dir} ...", flush=True)
                start = time.perf_counter()
                # tfds announces "Downloading and preparing dataset Unknown size": nothing is
                # downloaded here, the lines above say what happens.
                with contextlib.redirect_stdout(io.StringIO()):
                    ds_builder.download_and_prepare()
                print(
                    f"Generated synthetic_lt/{name} in {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
    train = _read_split(ds_builder, "train")
    test = _read_split(ds_builder, "test")
    return dataset_lib.MultiLabelDataset(
        name="synthetic_lt" if classes == "target" else "synthetic_lt_pretrain",
        class_names=list(CLASS_SETS[classes]),
        train=train,
        test=test,
        class_split=dataset_lib.class_groups(
            train.class_freq, config.data.head_min, config.data.tail_max
        ),
    )


def preview(dataset: dataset_lib.MultiLabelDataset, path: str | os.PathLike, n: int = 16) -> None:
    """Writes a PNG grid of the first n training images with their class names.

    Args:
      dataset: any MultiLabelDataset (encoded bytes or image paths).
      path: output PNG file.
      n: number of images.
    """
    split = dataset.train
    n = min(n, len(split))
    if n == 0:
        raise UserError(f"dataset {dataset.name!r} has no training images to preview")
    cell, text_h = 128, 30
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    for i in range(n):
        src = split.images[i]
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src).convert("RGB")
        scale = cell / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST
        )
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(img, (x, y))
        names = [dataset.class_names[c] for c in np.flatnonzero(split.labels[i])]
        lines = [", ".join(names[:2]), ", ".join(names[2:])]
        draw.multiline_text(
            (x + 2, y + cell + 2),
            "\n".join(line for line in lines if line),
            fill="black",
            font=font,
        )
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
