"""Input pipeline throughput: 640x480 JPEGs -> augmented batches, float32 against uint8 output.

Writes a few hundred photo-like 640x480 JPEGs to a temporary directory and times the
project's train augmentation (`pipeline.train_image`: random resized crop decoded from
the crop window only, resize, flip, colour jitter; the reference recipe's data settings
of configs/voc_lt.py) through tf.data limited to 1, 2, ... threads, at 224 and 448 px,
with two outputs handed to the host:

- float32: the augmented image normalised with the config's mean / std (4 bytes a value);
- uint8: the augmented image scaled by 255 and rounded (1 byte a value; the device then
  normalises it).

Both are built in this benchmark's own map from the augmented [0, 1] image, so the
numbers mean the same whichever output `pipeline.train_image` itself returns. Timed:
decode + augmentation + output conversion + batching + the hand-over to numpy
(`as_numpy_iterator`), in batches of 128. Prints a markdown table of images/s (wall
clock), images per CPU-second of the process (the rate of one core, robust to other
work on a shared machine), MB per batch and the host cores needed to feed 3,000 images/s
(a ResNet-50 on one H100, MLPerf-class), with the machine and the load average before
and after.

  python -m benchmarks.input_pipeline [--sizes 224,448] [--threads 1,2] [--seconds 8]
"""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import voc_lt  # noqa: E402
from mlcnc_jax.data import pipeline  # noqa: E402

TARGET_IMAGES_PER_S = 3000.0  # ResNet-50 training on one H100 (MLPerf-class)
OUTPUTS = ("float32", "uint8")


def write_jpegs(directory: pathlib.Path, n: int, seed: int = 0) -> list[str]:
    """Photo-like 640x480 JPEGs: smooth random colour fields plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((640, 480), Image.BICUBIC), np.float32)
        img += rng.normal(0, 8, img.shape)
        path = directory / f"{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def augmented(raw: tf.Tensor, seed: tf.Tensor, config) -> tf.Tensor:
    """The train augmentation of one encoded image as a float32 [0, 1] image.

    `pipeline.train_image` returns either the normalised float32 image (then it is asked
    for mean 0 and std 1, which leaves the [0, 1] image) or uint8 pixels (then they are
    scaled back to [0, 1]); either way the same augmentation runs.
    """
    d = config.data
    kwargs = {"min_area": float(d.crop_min_area), "padding": int(d.crop_padding)}
    params = inspect.signature(pipeline.train_image).parameters
    if "mean" in params:
        kwargs.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = pipeline.train_image(raw, seed, int(d.image_size), **kwargs)
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    return image


def to_output(image: tf.Tensor, output: str, config) -> tf.Tensor:
    """The [0, 1] augmented image as handed to the host: normalised float32 or uint8."""
    if output == "uint8":
        return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
    mean = tf.constant(tuple(config.data.mean), tf.float32)
    std = tf.constant(tuple(config.data.std), tf.float32)
    return (image - mean) / std


def dataset(paths: list[str], config, output: str, threads: int, batch: int) -> tf.data.Dataset:
    """An endless stream of augmented batches with tf.data limited to `threads` threads."""
    files = tf.constant(paths)
    n = len(paths)

    def load(position):
        seed = tf.stack([tf.constant(0, tf.int64), position])
        raw = tf.io.read_file(files[position % n])
        return to_output(augmented(raw, seed, config), output, config)

    ds = tf.data.Dataset.range(2**40)
    ds = ds.map(load, num_parallel_calls=threads, deterministic=True)
    ds = ds.batch(batch, drop_remainder=True).prefetch(2)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def measure(
    paths: list[str], config, output: str, threads: int, batch: int, seconds: float
) -> dict:
    """Throughput over at least 3 batches and `seconds`, after 2 warm-up batches.

    Returns:
      {'images_per_s': wall-clock rate, 'images_per_cpu_s': images per CPU-second this
      process used (all its threads: tf.data's and the hand-over to numpy), 'batch_bytes'}.
      On a machine shared with other work the wall-clock rate falls with the load, while
      the CPU-second rate stays about what one free core delivers.
    """
    it = dataset(paths, config, output, threads, batch).as_numpy_iterator()
    for _ in range(2):  # tracing, filling the prefetch buffer
        nbytes = next(it).nbytes
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while count < 3 or time.perf_counter() - start < seconds:
        next(it)
        count += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "images_per_s": count * batch / wall,
        "images_per_cpu_s": count * batch / cpu,
        "batch_bytes": nbytes,
    }


def config_for(size: int):
    """The reference recipe's data settings at `size` px (evaluation resize scaled alike)."""
    config = voc_lt.get_config()
    config.data.image_size = size
    config.data.resize_size = size * 256 // 224
    return config


def table(rows: list[dict]) -> str:
    """The markdown table of `measure` results."""
    header = [
        "px", "output", "threads", "images/s", "images/s per core (per CPU-second)",
        "MB per batch of 128", "host cores for 3,000 images/s",
    ]  # fmt: skip
    body = [
        [
            str(r["px"]),
            r["output"],
            str(r["threads"]),
            f"{r['images_per_s']:.0f}",
            f"{r['images_per_cpu_s']:.0f}",
            f"{r['batch_bytes'] / r['batch'] * 128 / 1e6:.1f}",
            f"{TARGET_IMAGES_PER_S / r['images_per_cpu_s']:.1f}",
        ]
        for r in rows
    ]
    return common.markdown_table(header, body, ["---:", "---"] + ["---:"] * 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="distinct JPEGs (cycled)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per row")
    parser.add_argument("--sizes", default="224,448")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(pathlib.Path(tmp), args.images)
        for size in map(int, args.sizes.split(",")):
            config = config_for(size)
            for threads in map(int, args.threads.split(",")):
                for output in OUTPUTS:
                    result = measure(paths, config, output, threads, args.batch, args.seconds)
                    rows.append(
                        {"px": size, "output": output, "threads": threads, "batch": args.batch,
                         **result}
                    )  # fmt: skip
                    print(f"  {rows[-1]}", flush=True)
    load_after = os.getloadavg()
    d = config_for(224).data
    print(f"\nMachine: {common.machine()}; TensorFlow {tf.__version__}")
    print(
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}; "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    print(
        f"Task: {args.images} 640x480 JPEGs (read from files) -> decode of the random-resized-"
        f"crop window (area {d.crop_min_area:g}-1) -> resize -> flip -> colour jitter -> "
        f"float32 (normalised) or uint8 -> batch {args.batch} -> numpy\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
