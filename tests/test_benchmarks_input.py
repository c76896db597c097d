"""The input pipeline benchmark's two outputs and its table (benchmarks/input_pipeline.py)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from benchmarks import input_pipeline as ip  # noqa: E402
from mlcnc_jax.data import pipeline  # noqa: E402


def test_outputs_are_the_normalised_float_and_the_rounded_pixels():
    config = ip.config_for(224)
    image = tf.constant([[[0.0, 0.5, 1.0], [0.2, 0.4991, 0.6]]], tf.float32)
    mean, std = np.array(config.data.mean), np.array(config.data.std)
    np.testing.assert_allclose(
        ip.to_output(image, "float32", config).numpy(), (image.numpy() - mean) / std, rtol=1e-6
    )
    pixels = ip.to_output(image, "uint8", config).numpy()
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, [[[0, 128, 255], [51, 127, 153]]])


def test_augmented_image_is_what_the_pipeline_hands_over(tmp_path):
    # Whichever output pipeline.train_image has, the benchmark augments the same way.
    (path,) = ip.write_jpegs(tmp_path, 1)
    config = ip.config_for(224)
    raw, seed = tf.io.read_file(path), tf.constant([0, 5], tf.int64)
    ours = ip.augmented(raw, seed, config)
    kwargs = {"min_area": config.data.crop_min_area, "padding": config.data.crop_padding}
    if "mean" in inspect.signature(pipeline.train_image).parameters:
        kwargs.update(mean=config.data.mean, std=config.data.std)
        theirs = pipeline.train_image(raw, seed, 224, **kwargs).numpy()
        np.testing.assert_allclose(
            ip.to_output(ours, "float32", config).numpy(), theirs, rtol=1e-5, atol=1e-5
        )
    else:
        theirs = pipeline.train_image(raw, seed, 224, **kwargs).numpy()
        np.testing.assert_array_equal(ip.to_output(ours, "uint8", config).numpy(), theirs)
    assert ours.shape == (224, 224, 3) and 0.0 <= float(tf.reduce_min(ours))


def test_table_counts_host_cores_from_the_cpu_second_rate():
    row = {"px": 448, "output": "uint8", "threads": 2, "batch": 32, "images_per_s": 150.0,
           "images_per_cpu_s": 80.0, "batch_bytes": 32 * 448 * 448 * 3}  # fmt: skip
    line = ip.table([row]).splitlines()[-1]
    # 128 images of 448 x 448 x 3 bytes = 77.1 MB; 3,000 / 80 = 37.5 cores.
    assert line == "| 448 | uint8 | 2 | 150 | 80 | 77.1 | 37.5 |"
