"""Tests of the tf.data input pipeline: sampling, determinism, resume, host slices, decoding."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment

from configs import default
from mlcnc_jax.data import pipeline, sampling
from mlcnc_jax.data.dataset import Split

SIZE, RESIZE = 32, 36


def _config(sampling="class_aware", seed=0):
    config = default.get_config()
    config.seed = seed
    config.data.image_size = SIZE
    config.data.resize_size = RESIZE
    config.data.sampling = sampling
    return config


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _split(n=24, k=5, seed=0) -> Split:
    """Random-content PNGs of varied sizes with multi-label labels, every class present."""
    rng = np.random.default_rng(seed)
    images = [
        _png(rng.integers(0, 256, (rng.integers(30, 60), rng.integers(30, 60), 3), dtype=np.uint8))
        for _ in range(n)
    ]
    labels = (rng.random((n, k)) < 0.3).astype(np.uint8)
    labels[np.arange(k), np.arange(k)] = 1
    return Split(images=images, labels=labels, ids=list(range(n)))


def _take(it, n):
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- sampling


def test_class_aware_single_label_follows_method():
    # With one label per image, the class of each draw is known, so the whole
    # docs/method.md procedure can be checked: shuffled class cycles, per-class lists
    # reshuffled when exhausted.
    rng = np.random.default_rng(1)
    k = 4
    cls = np.concatenate([np.full(n, c) for c, n in enumerate([7, 3, 2, 5])])
    cls = rng.permutation(cls)
    labels = np.eye(k, dtype=np.uint8)[cls]
    order = pipeline.sample_order(labels, "class_aware", epoch=0, seed=0)
    assert len(order) == pipeline.epoch_size(labels, "class_aware") == 7 * k
    drawn = cls[order]
    for block in drawn.reshape(-1, k):
        assert sorted(block) == list(range(k))
    for c in range(k):
        members = np.flatnonzero(cls == c)
        seq = order[drawn == c]
        assert len(seq) == 7
        for start in range(0, len(seq), len(members)):
            chunk = seq[start : start + len(members)]
            assert len(set(chunk)) == len(chunk) and set(chunk) <= set(members)
            if len(chunk) == len(members):
                assert set(chunk) == set(members)
    # Class orders are reshuffled per cycle, not a fixed rotation.
    assert len({tuple(b) for b in drawn.reshape(-1, k)}) > 1


def test_class_aware_multi_label_invariants():
    labels = _split(n=40, k=6).labels
    freq = labels.sum(0)
    order = pipeline.sample_order(labels, "class_aware", epoch=3, seed=7)
    assert len(order) == freq.max() * 6
    # Each cycle of K draws can be assigned one-to-one to the K classes, every
    # image containing the class it was drawn for.
    for block in order.reshape(-1, 6):
        rows, cols = linear_sum_assignment(-labels[block].astype(float))
        assert labels[block][rows, cols].all()
    np.testing.assert_array_equal(order, pipeline.sample_order(labels, "class_aware", 3, 7))
    assert not np.array_equal(order, pipeline.sample_order(labels, "class_aware", 4, 7))
    assert not np.array_equal(order, pipeline.sample_order(labels, "class_aware", 3, 8))


def test_uniform_is_a_permutation():
    labels = _split(n=30).labels
    order = pipeline.sample_order(labels, "uniform", epoch=0, seed=0)
    assert sorted(order) == list(range(30)) and pipeline.epoch_size(labels, "uniform") == 30
    assert not np.array_equal(order, pipeline.sample_order(labels, "uniform", 1, 0))


@pytest.mark.parametrize("sampling_name", ["uniform", "class_aware"])
def test_steps_follow_the_epoch_orders_and_the_stream(sampling_name):
    # Host 1 of 2, global batch 6, from step 5 on: positions and indices by hand,
    # straddling epoch boundaries; the endless stream yields the same samples.
    labels = _split(n=10, k=3).labels
    size = pipeline.epoch_size(labels, sampling_name)
    orders = np.concatenate([pipeline.sample_order(labels, sampling_name, e, 4) for e in range(20)])
    steps = dict(global_batch=6, host=1, host_batch=3, start_step=5)
    positions, indices = sampling.steps(labels, sampling_name, 4, num_steps=4, **steps)
    expect = [s * 6 + 3 + j for s in range(5, 9) for j in range(3)]
    np.testing.assert_array_equal(positions, expect)
    np.testing.assert_array_equal(indices, orders[expect])
    assert positions.max() // size > positions.min() // size  # more than one epoch
    stream = sampling.stream(labels, sampling_name, 4, **steps)
    assert [next(stream) for _ in range(40)] == [
        (s * 6 + 3 + j, int(orders[s * 6 + 3 + j]))
        for s in range(5, 5 + 40 // 3 + 1)
        for j in range(3)
    ][:40]


def test_train_batches_end_after_num_steps():
    batches = pipeline.train_batches(
        _split(),
        _config(),
        global_batch=8,
        start_step=2,
        num_steps=3,
        process_index=0,
        process_count=1,
    )
    assert len(list(batches)) == 3
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        pipeline.train_batches(_split(), _config(), global_batch=8, num_steps=-1)


def test_sampling_errors():
    labels = np.array([[1, 0], [1, 0]], np.uint8)
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        pipeline.sample_order(labels, "class_aware", 0, 0)
    with pytest.raises(ValueError, match="sampling"):
        pipeline.epoch_size(labels, "balanced")


# ----------------------------------------------------------------------------- training stream


def test_train_batches_shapes_range_and_determinism():
    split, config = _split(), _config()
    batches = _take(
        pipeline.train_batches(
            split, config, global_batch=8, num_steps=6, process_index=0, process_count=1
        ),
        3,
    )
    again = _take(
        pipeline.train_batches(
            split, config, global_batch=8, num_steps=6, process_index=0, process_count=1
        ),
        3,
    )
    for b, c in zip(batches, again, strict=True):
        # Pixels cross to the device as uint8 (normalised there): a quarter of the bytes.
        assert b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
        assert b["labels"].shape == (8, 5) and b["labels"].dtype == np.float32
        assert b["image"].max() > 100  # the whole range is used, not [0, 1] cast to uint8
        np.testing.assert_array_equal(b["image"], c["image"])
        np.testing.assert_array_equal(b["labels"], c["labels"])
    # Labels follow the sampler's order.
    order = pipeline.sample_order(split.labels, "class_aware", 0, 0)
    np.testing.assert_array_equal(
        np.concatenate([b["labels"] for b in batches]), split.labels[order[:24]]
    )
    other = next(
        pipeline.train_batches(
            split, _config(seed=1), global_batch=8, num_steps=6, process_index=0, process_count=1
        )
    )
    assert not np.array_equal(other["image"], batches[0]["image"])


def test_resume_equals_skipping_across_epochs():
    split, config = (
        _split(n=12, k=3),
        _config(sampling="uniform"),
    )  # epoch of 12: batches span epochs
    full = _take(
        pipeline.train_batches(
            split, config, global_batch=8, num_steps=6, process_index=0, process_count=1
        ),
        5,
    )
    resumed = _take(
        pipeline.train_batches(
            split,
            config,
            global_batch=8,
            num_steps=6,
            start_step=3,
            process_index=0,
            process_count=1,
        ),
        2,
    )
    for a, b in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    # Positions 24..39 straddle epochs 2 and 3 of the uniform sampler.
    expect = np.concatenate(
        [pipeline.sample_order(split.labels, "uniform", e, 0) for e in range(4)]
    )[24:40]
    np.testing.assert_array_equal(
        np.concatenate([b["labels"] for b in resumed]), split.labels[expect]
    )


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_slices_concatenate_to_single_host_batch(hosts):
    split, config = _split(), _config()
    single = _take(
        pipeline.train_batches(
            split, config, global_batch=8, num_steps=6, process_index=0, process_count=1
        ),
        2,
    )
    per_host = [
        _take(
            pipeline.train_batches(
                split, config, global_batch=8, num_steps=6, process_index=h, process_count=hosts
            ),
            2,
        )
        for h in range(hosts)
    ]
    for step in range(2):
        for key in ("image", "labels"):
            joined = np.concatenate([per_host[h][step][key] for h in range(hosts)])
            np.testing.assert_array_equal(joined, single[step][key])


def test_global_batch_must_divide_over_hosts():
    with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
        pipeline.train_batches(
            _split(), _config(), global_batch=8, num_steps=6, process_index=0, process_count=3
        )
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.eval_batches(_split(), _config(), global_batch=8, process_index=0, process_count=3)


def test_train_reads_jpeg_files(tmp_path):
    # File paths, JPEG (the decode-and-crop path), grayscale and CMYK among them.
    rng = np.random.default_rng(0)
    paths = []
    for i, mode in enumerate(["RGB", "L", "CMYK", "RGB"]):
        img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert(mode)
        paths.append(str(tmp_path / f"{i}.jpg"))
        img.save(paths[-1], format="JPEG")
    split = Split(images=paths, labels=np.eye(4, dtype=np.uint8), ids=list(range(4)))
    batch = next(
        pipeline.train_batches(
            split, _config(), global_batch=4, num_steps=6, process_index=0, process_count=1
        )
    )
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and np.isfinite(batch["image"]).all()


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_eval_covers_every_image_once(hosts):
    n = 13
    split = _split(n=n, k=n)
    split.labels = np.eye(n, dtype=np.uint8)  # label = image identity
    config = _config()
    steps = pipeline.num_eval_batches(n, 6)
    assert steps == 3
    seen = []
    for h in range(hosts):
        batches = list(
            pipeline.eval_batches(
                split, config, global_batch=6, process_index=h, process_count=hosts
            )
        )
        assert len(batches) == steps
        for b in batches:
            assert b["image"].shape == (6 // hosts, SIZE, SIZE, 3) and b["mask"].dtype == bool
            assert not b["labels"][~b["mask"]].any() and not b["image"][~b["mask"]].any()
            for img, lab in zip(b["image"][b["mask"]], b["labels"][b["mask"]], strict=True):
                i = int(np.argmax(lab))
                seen.append(i)
                assert img.dtype == np.uint8
                np.testing.assert_allclose(
                    pipeline.normalize_pixels(img, config.data.mean, config.data.std),
                    pipeline.preprocess_for_eval(split.images[i], config),
                    atol=1e-5,
                )
    assert sorted(seen) == list(range(n))


def _reference_eval(rgb: np.ndarray, config) -> np.ndarray:
    """torchvision-style Resize(RESIZE) + CenterCrop(SIZE) + Normalize, with PIL."""
    img = Image.fromarray(rgb)
    w, h = img.size
    new = (RESIZE, int(RESIZE * h / w)) if w <= h else (int(RESIZE * w / h), RESIZE)
    img = img.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - SIZE) / 2)), int(round((new[1] - SIZE) / 2))
    arr = np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0
    return (arr - np.array(config.data.mean, np.float32)) / np.array(config.data.std, np.float32)


@pytest.mark.parametrize("shape", [(45, 80), (90, 50), (36, 36)])
def test_eval_preprocessing_matches_pil_reference(shape):
    rng = np.random.default_rng(0)
    # Smooth content, so the comparison measures geometry, not filter-kernel details.
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.BICUBIC))
    config = _config()
    out = pipeline.preprocess_for_eval(_png(rgb), config)
    ref = _reference_eval(rgb, config)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    assert np.abs(out - ref).mean() < 0.02
    assert np.abs(out - ref).max() < 0.15
    # Normalisation is exact on a flat image.
    flat = np.full((40, 40, 3), (10, 128, 250), np.uint8)
    expect = (np.array([10, 128, 250]) / 255.0 - np.array(config.data.mean)) / np.array(
        config.data.std
    )
    np.testing.assert_allclose(
        pipeline.preprocess_for_eval(_png(flat), config),
        np.broadcast_to(expect, (SIZE, SIZE, 3)),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("CMYK", "JPEG"),
        ("L", "JPEG"),
        ("RGB", "JPEG"),
    ],
)
def test_decode_converts_to_rgb(mode, fmt):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((RESIZE, RESIZE), Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    raw = buf.getvalue()
    # Same-size resize and a centre crop: the output is the decoded RGB pixels, cropped.
    reference = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.float32) / 255.0
    off = (RESIZE - SIZE) // 2
    config = _config()
    expect = (
        reference[off : off + SIZE, off : off + SIZE] - np.array(config.data.mean)
    ) / np.array(config.data.std)
    out = pipeline.preprocess_for_eval(raw, config)
    if fmt == "PNG":
        np.testing.assert_allclose(out, expect, atol=1e-5)
    else:
        # JPEG decoders differ in chroma upsampling: a few grey levels at colour edges.
        diff = np.abs(out - expect) * np.array(config.data.std) * 255
        assert diff.mean() < 2.0 and diff.max() < 16


def test_undecodable_bytes_error_names_the_image():
    with pytest.raises(ValueError, match=r"cannot decode photo\.jpg .*JPEG, PNG"):
        pipeline.preprocess_for_eval(b"\xff\xd8 truncated", _config(), name="photo.jpg")


def test_eval_resize_smaller_than_crop_is_rejected():
    config = _config()
    config.data.resize_size = SIZE - 1
    with pytest.raises(ValueError, match="resize_size"):
        pipeline.preprocess_for_eval(_png(np.zeros((40, 40, 3), np.uint8)), config)
