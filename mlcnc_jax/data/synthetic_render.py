"""Rendering of the built-in `synthetic_lt` dataset: the pixels of every image.

Each image holds one object per positive class of its label row (now and then a second
instance of one), digits and letters in PIL's default font and drawn shapes, in random
colours over a cluttered background with a few distractor strokes under the objects.
Every pixel is deterministic from (seed, split, index), so any image can be reproduced
alone. This module needs numpy and PIL only (no TensorFlow).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mlcnc_jax.data.synthetic_labels import CLASS_SETS, split_labels

# Objects in one image at most (a second instance of a present class counts).
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
# Each image's generator is seeded by (seed, split code, index).
_SPLIT_CODES = {"train": 1, "test": 2}


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
