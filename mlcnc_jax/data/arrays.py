"""Batches from images held in memory as numpy arrays: no TensorFlow.

For hosts without TensorFlow (a GPU machine), tests and users with their own
arrays. The training stream takes its samples from `sampling.stream`, the same
class-aware sampler as the tf.data pipeline; the images are used as given
(already at the training size), normalised once up front, without augmentation.
`prefetch` prepares the next batches in a background thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from mlcnc_jax.data import sampling
from mlcnc_jax.errors import UserError


def normalize_pixels(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std in float32 on the host, uint8 pixels first scaled to [0, 1].

    The host's twin of `step.normalize_images` (which does it on the device).
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def _normalise(
    images: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    x = np.asarray(images)
    if mean is None:  # uint8 pixels handed over as they are: the step normalises them
        if x.dtype != np.uint8:
            raise ValueError(f"mean=None keeps uint8 pixels; these images are {x.dtype}")
        return x
    return normalize_pixels(x, mean, std)


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch: int,
    sampling_name: str = "class_aware",
    seed: int = 0,
    start_step: int = 0,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches of this host, drawn by the project's sampler.

    Args:
      images: [N, H, W, 3] uint8 (scaled to [0, 1]) or float images.
      labels: [N, K] multi-hot labels.
      global_batch: G, batch size over all hosts.
      sampling_name: 'class_aware' or 'uniform' (config.data.sampling).
      seed: sampling seed (config.seed).
      start_step: first global step (resumption).
      mean: per-channel mean subtracted from [0, 1] images; None: uint8 images are
        yielded as uint8 pixels (for a step that normalises them, `Trainer(image_norm=)`).
      std: per-channel std.
      process_index: this host.
      process_count: number of hosts (G must divide evenly).

    Yields:
      {'image': float32 [b, H, W, 3], 'labels': float32 [b, K]}, b = G / process_count.
    """
    if global_batch % process_count:
        raise UserError(
            f"global batch size {global_batch} is not divisible by the number of processes "
            f"{process_count}; choose a multiple of {process_count}"
        )
    labels = np.asarray(labels, np.float32)
    images = _normalise(images, mean, std)
    host_batch = global_batch // process_count
    positions = sampling.stream(
        labels,
        sampling_name,
        seed,
        global_batch=global_batch,
        host=process_index,
        host_batch=host_batch,
        start_step=start_step,
    )
    while True:
        index = np.fromiter((i for _, i in _take(positions, host_batch)), np.int64, host_batch)
        yield {"image": images[index], "labels": labels[index]}


def _take(iterator: Iterator, n: int) -> Iterator:
    for _ in range(n):
        yield next(iterator)


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch: int,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass in padded batches with a `mask`, like `pipeline.eval_batches`.

    Yields:
      {'image', 'labels', 'mask'}; padding rows have mask False and zero image and labels.
    """
    n = len(labels)
    host_batch = global_batch // process_count
    labels = np.asarray(labels, np.float32)
    images = _normalise(images, mean, std)
    steps = -(-n // global_batch)
    for s in range(steps):
        pos = s * global_batch + process_index * host_batch + np.arange(host_batch)
        valid = pos < n
        index = np.minimum(pos, n - 1)
        yield {
            "image": np.where(valid[:, None, None, None], images[index], 0).astype(images.dtype),
            "labels": labels[index] * valid[:, None].astype(np.float32),
            "mask": valid,
        }


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Yields the items of `iterator`, producing up to `size` ahead in a background thread.

    An exception of the producer is raised at the consumer; closing the generator
    stops the producer after its current item.
    """
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            items.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
