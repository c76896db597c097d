"""Input pipeline throughput: JPEG decode + train augmentation + batching at 224 px.

Writes a few hundred random-content 640x480 JPEGs to a temporary directory and
times `pipeline.train_dataset` with tf.data limited to 1, 2, ... CPU threads.
Prints a markdown table of images/s and images/s per core.

  python -m benchmarks.input_pipeline [--images 256] [--batch 32] [--batches 24] [--cores 1,2]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from configs import default  # noqa: E402
from mlcnc_jax.data import pipeline  # noqa: E402
from mlcnc_jax.data.dataset import Split  # noqa: E402


def _write_jpegs(directory: pathlib.Path, n: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs: smooth random colour fields plus sensor-like noise."""
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


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(split: Split, cores: int, batch: int, batches: int) -> float:
    """Images per second of the training stream with tf.data limited to `cores` threads."""
    config = default.get_config()
    config.data.image_size, config.data.resize_size = 224, 256
    ds = pipeline.train_dataset(
        split, config, global_batch=batch, num_steps=batches + 3, process_index=0, process_count=1
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    it = ds.with_options(options).as_numpy_iterator()
    for _ in range(3):  # warm-up: tracing, filling the prefetch buffer
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--cores", default="1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_jpegs(pathlib.Path(tmp), args.images)
        rng = np.random.default_rng(0)
        labels = (rng.random((len(paths), 20)) < 0.15).astype(np.uint8)
        labels[np.arange(20) % len(paths), np.arange(20)] = 1
        split = Split(images=paths, labels=labels, ids=list(range(len(paths))))
        rows = [
            (c, measure(split, c, args.batch, args.batches))
            for c in map(int, args.cores.split(","))
        ]
    print(
        f"Machine: {_cpu_name()}, {os.cpu_count()} logical CPUs visible; TensorFlow {tf.__version__}"
    )
    print("Task: 640x480 JPEG -> decode crop window, random resized crop 224, flip, colour jitter,")
    print(f"normalise, batch {args.batch} (class-aware sampling)\n")
    print("| CPU cores | images/s | images/s per core |")
    print("|---:|---:|---:|")
    for cores, rate in rows:
        print(f"| {cores} | {rate:.0f} | {rate / cores:.0f} |")


if __name__ == "__main__":
    main()
