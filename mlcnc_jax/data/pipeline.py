"""tf.data input pipeline: decoding, augmentation, class-aware sampling, per-host batches.

The training stream is a pure function of (config.seed, position): position p of
the stream is image `sample_order(labels, sampling, p // E, seed)[p % E]` (E the
epoch size), augmented with stateless random ops seeded by (seed, p). Global step
s covers positions [s*G, (s+1)*G) of a global batch G; host h takes the h-th
contiguous slice of G / process_count of them. Hence a run on any number of hosts
sees exactly the batches of a single-host run, and a resumed run (start_step)
sees exactly the batches of an uninterrupted one.

Evaluation is one pass in padded batches with a boolean `mask`, so every test
image is scored exactly once whatever the number of hosts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from mlcnc_jax.data import sampling
from mlcnc_jax.data.arrays import normalize_pixels  # noqa: F401 (also pipeline's, for callers)
from mlcnc_jax.data.dataset import Split
from mlcnc_jax.data.sampling import SAMPLINGS, check_sampling, epoch_size, sample_order  # noqa: F401

# TensorFlow only feeds the accelerators: it must never hold their memory.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; nothing to undo
    pass

# RandomResizedCrop's aspect range of torchvision, which the reference code uses; the
# smallest crop area is config.data.crop_min_area (torchvision: 0.08).
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.4  # brightness, contrast and saturation; hue 0


# ----------------------------------------------------------------------------- image ops


def _read(source: tf.Tensor, encoded: bool) -> tf.Tensor:
    return source if encoded else tf.io.read_file(source)


def _decode(raw: tf.Tensor) -> tf.Tensor:
    # channels=3 turns grayscale, grayscale+alpha, RGBA, palette and CMYK into RGB.
    return tf.io.decode_image(raw, channels=3, expand_animations=False)


def _to_pixels(image: tf.Tensor) -> tf.Tensor:
    """[0, 1] float image -> uint8 pixels (rounded): what crosses to the device.

    A quarter of float32's bytes; the step normalises on the device
    (`step.normalize_images`). torchvision's PIL transforms round to 8 bits likewise.
    """
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def _random_crop_decode(raw: tf.Tensor, seed: tf.Tensor, min_area: float) -> tf.Tensor:
    """Decodes the random-resized-crop window of an encoded image (JPEGs: only that window)."""

    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.concat([shape, [3]], 0),
            bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=CROP_ASPECT,
            area_range=(min_area, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return begin[0], begin[1], size[0], size[1]

    def jpeg():
        y, x, h, w = window(tf.image.extract_jpeg_shape(raw)[:2])
        return tf.image.decode_and_crop_jpeg(raw, tf.stack([y, x, h, w]), channels=3)

    def other():
        image = _decode(raw)
        y, x, h, w = window(tf.shape(image)[:2])
        return image[y : y + h, x : x + w]

    return tf.cond(tf.io.is_jpeg(raw), jpeg, other)


def _color_jitter(image: tf.Tensor, seed: tf.Tensor, strength: float = JITTER) -> tf.Tensor:
    """torchvision ColorJitter(b, c, s, 0): factors in [1-s, 1+s], ops in random order."""
    factor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    f = tf.random.stateless_uniform([3], factor_seed, 1.0 - strength, 1.0 + strength)
    order = tf.random.stateless_uniform([], order_seed, 0, 6, dtype=tf.int32)

    def gray(x):
        return tf.image.rgb_to_grayscale(x)  # ITU-R 601-2 luma, as torchvision

    def blend(x, other, ratio):
        return tf.clip_by_value(ratio * x + (1.0 - ratio) * other, 0.0, 1.0)

    ops = (
        lambda x: blend(x, tf.zeros_like(x), f[0]),  # brightness
        lambda x: blend(x, tf.reduce_mean(gray(x)), f[1]),  # contrast
        lambda x: blend(x, gray(x), f[2]),  # saturation
    )
    perms = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

    def apply(perm):
        def fn():
            x = image
            for i in perm:
                x = ops[i](x)
            return x

        return fn

    return tf.switch_case(order, [apply(p) for p in perms])


def train_image(
    raw: tf.Tensor,
    seed: tf.Tensor,
    image_size: int,
    min_area: float = 0.08,
    padding: int = 0,
) -> tf.Tensor:
    """Train augmentation of one encoded image.

    Random resized crop (area min_area-1, aspect 3/4-4/3) to image_size, then (padding > 0)
    a random image_size crop of the image zero-padded by `padding` pixels on each side (a
    shift that keeps every object's scale), horizontal flip, colour jitter (0.4, 0.4, 0.4,
    0), rounded to uint8 pixels (normalised on the device). All randomness is stateless,
    drawn from `seed`.

    Args:
      raw: scalar string tensor, the encoded JPEG/PNG/GIF/BMP.
      seed: [2] int64 seed of this sample.
      image_size: output side.
      min_area: smallest crop, as a fraction of the image area.
      padding: pixels of zero padding for the random shift (0: none).

    Returns:
      [image_size, image_size, 3] uint8.
    """
    crop_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = _random_crop_decode(raw, crop_seed, min_area)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0)
    if padding > 0:
        # Its own stream, folded from the crop's: padding=0 leaves every other draw unchanged.
        shift_seed = tf.random.experimental.stateless_fold_in(crop_seed, 1)
        image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
        image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], shift_seed)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = _color_jitter(image, jitter_seed)
    return _to_pixels(image)


def eval_image(raw: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    """Evaluation preprocessing: shorter side to resize_size, centre crop, uint8 pixels.

    Args:
      raw: scalar string tensor, the encoded image.
      image_size: crop side.
      resize_size: shorter side after resizing (>= image_size).

    Returns:
      [image_size, image_size, 3] uint8 (normalised on the device).
    """
    image = tf.image.convert_image_dtype(_decode(raw), tf.float32)
    shape = tf.shape(image)[:2]
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    # torchvision Resize(int): the long side is truncated, not rounded.
    new_long = tf.cast(
        tf.cast(resize_size, tf.float64) * tf.cast(long, tf.float64) / tf.cast(short, tf.float64),
        tf.int32,
    )
    new_h, new_w = tf.cond(h <= w, lambda: (resize_size, new_long), lambda: (new_long, resize_size))
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
    image = tf.clip_by_value(image[top : top + image_size, left : left + image_size], 0.0, 1.0)
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    return _to_pixels(image)


# ----------------------------------------------------------------------------- datasets


def _check_data_config(config) -> None:
    check_sampling(config.data.sampling)
    size, resize = int(config.data.image_size), int(config.data.resize_size)
    if size <= 0 or resize < size:
        raise ValueError(
            f"need 0 < config.data.image_size <= config.data.resize_size, got image_size={size}, "
            f"resize_size={resize} (the evaluation resize must not be smaller than its centre crop)"
        )
    if int(config.data.crop_padding) < 0:
        raise ValueError(f"config.data.crop_padding must be >= 0, got {config.data.crop_padding}")
    if not 0.0 < float(config.data.crop_min_area) <= 1.0:
        raise ValueError(
            f"config.data.crop_min_area must be in (0, 1], got {config.data.crop_min_area}"
        )
    if len(config.data.mean) != 3 or len(config.data.std) != 3:
        raise ValueError("config.data.mean and config.data.std need 3 values (R, G, B)")


def _host_slice(global_batch: int, process_index, process_count) -> tuple[int, int]:
    """(host batch, host index) after validating the global batch against the host count."""
    if process_index is None or process_count is None:
        import jax  # only for the defaults; the rest of the pipeline is JAX-free

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch}")
    if global_batch % process_count:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the number of processes "
            f"{process_count}; choose a multiple of {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return global_batch // process_count, int(process_index)


def _image_sources(split: Split) -> tuple[tf.Tensor, bool]:
    """The split's images as a string tensor, and whether they are encoded bytes."""
    if len(split) == 0:
        raise ValueError("the split has no images")
    encoded = isinstance(split.images[0], (bytes, bytearray, np.bytes_))
    items = [bytes(x) for x in split.images] if encoded else [os.fspath(x) for x in split.images]
    return tf.constant(items, tf.string), encoded


def _options() -> tf.data.Options:
    # No autotuning: its optimisation thread wakes at intervals that grow to a minute,
    # and deleting an iterator waited for it (up to a minute after every run), while
    # the tuning itself took CPU from the train step on a small machine. Fixed
    # parallelism (every core this process may use) and two prefetched batches instead.
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


def _parallelism() -> int:
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, len(cores) if cores else (os.cpu_count() or 1))


PREFETCH_BATCHES = 2


def train_dataset(
    split: Split,
    config,
    *,
    global_batch: int,
    start_step: int = 0,
    num_steps: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """This host's training batches as a tf.data.Dataset (see `train_batches`)."""
    _check_data_config(config)
    host_batch, host = _host_slice(global_batch, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    labels = np.asarray(split.labels)
    seed = int(config.seed)
    sample_order(labels, config.data.sampling, 0, seed)  # fail here, not inside tf.data
    images, encoded = _image_sources(split)
    labels_t = tf.constant(labels, tf.float32)

    # The run's samples, computed up front (16 bytes a sample): a Python generator as
    # the source contends with the train step for the GIL and its teardown stalled for
    # tens of seconds. Skipped positions are never decoded.
    positions = sampling.steps(
        labels,
        config.data.sampling,
        seed,
        global_batch=global_batch,
        host=host,
        host_batch=host_batch,
        start_step=start_step,
        num_steps=num_steps,
    )

    image_size = int(config.data.image_size)
    min_area = float(config.data.crop_min_area)
    padding = int(config.data.crop_padding)

    def load(position, index):
        sample_seed = tf.stack([tf.constant(seed, tf.int64), position])
        raw = _read(tf.gather(images, index), encoded)
        return {
            "image": train_image(raw, sample_seed, image_size, min_area, padding),
            "labels": tf.gather(labels_t, index),
        }

    ds = tf.data.Dataset.from_tensor_slices(positions)
    ds = ds.map(load, num_parallel_calls=_parallelism(), deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True)
    return ds.prefetch(PREFETCH_BATCHES).with_options(_options())


def train_batches(
    split: Split,
    config,
    *,
    global_batch: int,
    start_step: int = 0,
    num_steps: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """This host's training batches of `num_steps` global steps from `start_step` on.

    Global step s holds stream positions [s*G, (s+1)*G); this host yields the
    process_index-th contiguous slice of G / process_count of them, so the
    concatenation of all hosts' batches equals the single-host batch.

    Args:
      split: training split (encoded bytes or file paths).
      config: project config; uses data.image_size, data.sampling, data.mean,
        data.std, data.resize_size (validated) and seed.
      global_batch: G, batch size over all hosts.
      start_step: first global step to yield (resumption); earlier positions are
        skipped without decoding.
      num_steps: how many steps to yield (the run's remaining steps).
      process_index: this host (default jax.process_index()).
      process_count: number of hosts (default jax.process_count()).

    Returns:
      An iterator of {'image': uint8 [b, H, W, 3], 'labels': float32 [b, K]} with
      b = G / process_count (images as pixels: the step normalises them). Bad arguments raise here, not at the first batch.
    """
    ds = train_dataset(
        split,
        config,
        global_batch=global_batch,
        start_step=start_step,
        num_steps=num_steps,
        process_index=process_index,
        process_count=process_count,
    )
    return ds.as_numpy_iterator()


def num_eval_batches(n: int, global_batch: int) -> int:
    """Number of padded evaluation batches that cover n images: ceil(n / global_batch)."""
    if global_batch <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch}")
    return math.ceil(n / global_batch)


def eval_dataset(
    split: Split,
    config,
    *,
    global_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """This host's padded evaluation batches as a tf.data.Dataset (see `eval_batches`)."""
    _check_data_config(config)
    host_batch, host = _host_slice(global_batch, process_index, process_count)
    n = len(split)
    steps = num_eval_batches(n, global_batch)
    positions = (
        np.arange(steps)[:, None] * global_batch
        + host * host_batch
        + np.arange(host_batch)[None, :]
    ).reshape(-1)
    k = np.asarray(split.labels).shape[1]
    image_size, resize_size = int(config.data.image_size), int(config.data.resize_size)
    if n == 0:
        empty = {
            "image": np.zeros((0, host_batch, image_size, image_size, 3), np.uint8),
            "labels": np.zeros((0, host_batch, k), np.float32),
            "mask": np.zeros((0, host_batch), bool),
        }
        return tf.data.Dataset.from_tensor_slices(empty)
    images, encoded = _image_sources(split)
    labels_t = tf.constant(np.asarray(split.labels), tf.float32)

    def load(position):
        valid = position < n
        index = tf.minimum(position, n - 1)  # padding rows reuse an image, then are blanked
        image = eval_image(_read(tf.gather(images, index), encoded), image_size, resize_size)
        return {
            "image": tf.where(valid, image, tf.zeros_like(image)),
            "labels": tf.gather(labels_t, index) * tf.cast(valid, tf.float32),
            "mask": valid,
        }

    ds = tf.data.Dataset.from_tensor_slices(positions.astype(np.int64))
    ds = ds.map(load, num_parallel_calls=_parallelism(), deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True)
    return ds.prefetch(PREFETCH_BATCHES).with_options(_options())


def eval_batches(
    split: Split,
    config,
    *,
    global_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """One pass over a split in padded batches; every image appears exactly once over all hosts.

    Every host yields num_eval_batches(len(split), global_batch) batches (the same
    count, so collective ops line up); global batch s holds images [s*G, (s+1)*G),
    host h its h-th contiguous slice; positions past the end are padding.

    Args:
      split: evaluation split.
      config: project config; uses data.image_size, data.resize_size, data.mean, data.std.
      global_batch: G, batch size over all hosts.
      process_index: this host (default jax.process_index()).
      process_count: number of hosts (default jax.process_count()).

    Returns:
      An iterator of {'image': uint8 [b, H, W, 3], 'labels': float32 [b, K],
      'mask': bool [b]}; padding rows have mask False and zero image and labels.
    """
    ds = eval_dataset(
        split,
        config,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
    )
    return ds.as_numpy_iterator()


_eval_fns: dict = {}


def preprocess_for_eval(encoded: bytes, config, *, name: str | None = None) -> np.ndarray:
    """Evaluation preprocessing of one encoded image, e.g. a user's photo for prediction.

    Args:
      encoded: the file's bytes (JPEG, PNG, GIF or BMP).
      config: project config; uses data.image_size, data.resize_size, data.mean, data.std.
      name: what to call the image in error messages (e.g. its path).

    Returns:
      [image_size, image_size, 3] float32, normalised with data.mean and data.std.

    Raises:
      ValueError: the bytes are not a decodable image.
    """
    _check_data_config(config)
    key = (int(config.data.image_size), int(config.data.resize_size))
    if key not in _eval_fns:
        _eval_fns[key] = tf.function(
            lambda raw: eval_image(raw, *key), input_signature=[tf.TensorSpec([], tf.string)]
        )
    try:
        pixels = _eval_fns[key](tf.constant(bytes(encoded))).numpy()
        return normalize_pixels(pixels, config.data.mean, config.data.std)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        what = name or "image"
        # Drop TF's "{{function_node ...}}" prefix: keep the decoder's own words.
        detail = re.sub(r"\{\{[^}]*\}\}\s*", "", e.message or "").strip().splitlines()[0:1]
        detail = detail[0] if detail else type(e).__name__
        raise ValueError(
            f"cannot decode {what} ({len(encoded)} bytes, starting {bytes(encoded[:8])!r}): expected a "
            f"JPEG, PNG, GIF or BMP file; the file may be truncated or corrupt ({detail})"
        ) from e
