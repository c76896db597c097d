"""A dataset: a loader from the config to a MultiLabelDataset (registered as 'my_set').

Made-up 32 px images: class c brightens channel c.
"""

import io

import numpy as np
from PIL import Image

from mlcnc_jax.data.dataset import MultiLabelDataset, Split


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def load_my_set(config) -> MultiLabelDataset:
    """Train 24 and test 12 images, three classes, one label each."""
    rng = np.random.default_rng(config.seed)

    def split(n):
        labels = np.eye(3, dtype=np.uint8)[np.arange(n) % 3]
        images = [_png((rng.random((32, 32, 3)) * 60 + 180 * y).astype(np.uint8)) for y in labels]
        return Split(images=images, labels=labels, ids=list(range(n)))

    return MultiLabelDataset(
        name="my_set", class_names=["red", "green", "blue"], train=split(24), test=split(12)
    )
