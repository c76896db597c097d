"""A split's batches for a run: the tf.data pipeline, or numpy for images held in memory.

A `Split` whose images are file paths or encoded bytes goes through the tf.data
pipeline (`pipeline`: decoding, augmentation, resizing); one whose images are an
[N, H, W, 3] array of decoded pixels at the training size goes through `arrays`
(no TensorFlow: a GPU host without it, a user's own arrays). uint8 pixels cross to
the devices as they are and are normalised there; floating images are taken as
already normalised.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from mlcnc_jax.data import arrays
from mlcnc_jax.data.dataset import Split
from mlcnc_jax.errors import UserError


def in_memory(split: Split) -> bool:
    """Whether the split holds decoded pixels (an array) rather than files or encoded images."""
    return isinstance(split.images, np.ndarray)


def _pixels(split: Split, config: ml_collections.ConfigDict) -> tuple[np.ndarray, dict]:
    images = split.images
    size = int(config.data.image_size)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise UserError(
            f"In-memory images must be [N, {size}, {size}, 3] (config.data.image_size = "
            f"{size}); these are {list(images.shape)}: resize them first or set the image size"
        )
    # uint8 pixels stay uint8 (the step normalises them); floats pass as they are.
    norm = {"mean": None, "std": None} if images.dtype == np.uint8 else {}
    return images, norm


def train_batches(
    split: Split, config: ml_collections.ConfigDict, *, start_step: int, num_steps: int
) -> Iterator[dict]:
    """This host's training batches of global steps [start_step, start_step + num_steps)."""
    if not in_memory(split):
        from mlcnc_jax.data import pipeline  # TensorFlow: only for files and encoded images

        return pipeline.train_batches(
            split,
            config,
            global_batch=config.train.batch_size,
            start_step=start_step,
            num_steps=num_steps,
        )
    images, norm = _pixels(split, config)
    return arrays.prefetch(
        arrays.train_batches(
            images,
            split.labels,
            global_batch=config.train.batch_size,
            sampling_name=config.data.sampling,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            **norm,
        ),
        size=config.train.prefetch_batches + 1,
    )


def eval_batches(split: Split, config: ml_collections.ConfigDict) -> Iterator[dict]:
    """One pass over the split in padded batches of config.eval.batch_size (with a 'mask')."""
    if not in_memory(split):
        from mlcnc_jax.data import pipeline

        return pipeline.eval_batches(split, config, global_batch=config.eval.batch_size)
    images, norm = _pixels(split, config)
    return arrays.eval_batches(
        images,
        split.labels,
        global_batch=config.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **norm,
    )
