"""In-memory datasets for the benchmarks, without TensorFlow: the GPU check's and random ones.

`make_data` renders synthetic_lt (numpy and Pillow) as JPEG bytes in an .npz; `load_data`
decodes it with Pillow into a `MultiLabelDataset` whose splits hold uint8 pixels (batched
by numpy: `mlcnc_jax.data.feeds`); `random_data` holds random pixels (a smoke run without
the file, the timing benchmarks).
"""

from __future__ import annotations

import io
import os

import numpy as np

from mlcnc_jax.data.dataset import HEAD_MIN, TAIL_MAX, MultiLabelDataset, Split, class_groups


def make_data(path: str, image_size: int = 224, num_test: int = 800, quality: int = 90) -> None:
    """Renders synthetic_lt ('target', seed 0) and writes it as JPEG bytes in an .npz.

    The whole long-tailed train split is kept (its class counts define head / medium /
    tail); the test split is cut to its first `num_test` images (the test anchors are in
    random order, so every class keeps about the same share).
    """
    from PIL import Image

    from mlcnc_jax.data import synthetic_labels, synthetic_render  # numpy, Pillow: no TensorFlow

    arrays = {}
    for split, limit in (("train", None), ("test", num_test)):
        blobs, labels = [], []
        for i, (_, png, row) in enumerate(
            synthetic_render.generate("target", image_size, 0, split)
        ):
            if limit is not None and i >= limit:
                break
            buf = io.BytesIO()
            Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=quality)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
            labels.append(row)
        arrays[f"{split}_bytes"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.stack(labels).astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(
        path,
        **arrays,
        class_names=np.array(synthetic_labels.CLASS_SETS["target"]),
        image_size=np.int64(image_size),
        head_min=np.int64(HEAD_MIN),
        tail_max=np.int64(TAIL_MAX),
    )
    size = os.path.getsize(path) / 2**20
    print(
        f"Wrote {path}: {len(arrays['train_labels'])} train + {len(arrays['test_labels'])} test "
        f"images at {image_size} px, {size:.1f} MiB"
    )


def _decode(data, split: str, size: int, limit: int | None) -> Split:
    from PIL import Image

    blob, offsets, labels = (data[f"{split}_{key}"] for key in ("bytes", "offsets", "labels"))
    n = len(labels) if limit is None else min(limit, len(labels))
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        images[i] = np.asarray(img)
    return Split(images, labels[:n], ids=list(range(n)))


def load_data(path: str, image_size: int, limit: int | None = None) -> MultiLabelDataset:
    """The .npz of `make_data`, decoded to uint8 pixels (resized if asked; `limit` per split).

    Head / medium / tail come from the whole file's training labels.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: render it first with `python -m benchmarks.gpu_train_check "
            f"--make_data {path}` on a machine with the project's data dependencies."
        )
    with np.load(path) as data:
        split = class_groups(
            data["train_labels"].sum(0), int(data["head_min"]), int(data["tail_max"])
        )
        return MultiLabelDataset(
            name="synthetic_lt",
            class_names=[str(n) for n in data["class_names"]],
            train=_decode(data, "train", image_size, limit),
            test=_decode(data, "test", image_size, limit),
            class_split=split,
        )


def random_data(
    image_size: int, num_classes: int = 6, n: int = 64, positive_rate: float = 0.3
) -> MultiLabelDataset:
    """Random pixels and labels, `n` images per split (a smoke run's, a timing's data).

    Every image has a positive, and with n >= num_classes so has every class in each split.
    Groups: classes 0-1 head, 2-3 medium, the rest tail.
    """
    rng = np.random.default_rng(0)
    labels = rng.random((2 * n, num_classes)) < positive_rate
    labels[np.arange(2 * n), np.arange(2 * n) % n % num_classes] = True
    images = rng.integers(0, 256, (2 * n, image_size, image_size, 3), dtype=np.uint8)
    groups = {"head": [0, 1], "medium": [2, 3], "tail": list(range(4, num_classes))}
    return MultiLabelDataset(
        name="random",
        class_names=[f"class_{i}" for i in range(num_classes)],
        train=Split(images[:n], labels[:n], ids=list(range(n))),
        test=Split(images[n:], labels[n:], ids=list(range(n))),
        class_split={name: [c for c in group if c < num_classes] for name, group in groups.items()},
    )
