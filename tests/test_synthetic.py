"""Tests of the built-in synthetic_lt dataset (tfds builder, plan, loading)."""

import io
import itertools
import threading

import numpy as np
import pytest
from PIL import Image

from configs import default
from mlcnc_jax.data import dataset as dataset_lib
from mlcnc_jax.data import lt_builder, synthetic, synthetic_labels, synthetic_render


def _config(root, classes="target", image_size=64, seed=0):
    config = default.get_config()
    config.data.root = str(root)
    config.data.synthetic_classes = classes
    config.data.image_size = image_size
    config.data.synthetic_seed = seed
    return config


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """The default 'target' dataset (64 px, seed 0), generated once into a temp dir."""
    root = tmp_path_factory.mktemp("synthetic")
    return synthetic.load(_config(root)), root


def test_default_target_groups_and_sizes(target):
    ds, _ = target
    assert ds.name == "synthetic_lt"
    assert ds.num_classes == 20
    assert 1000 <= len(ds.train) <= 1200
    groups = dataset_lib.class_groups(ds.train.class_freq)
    assert {k: len(v) for k, v in groups.items()} == {"head": 6, "medium": 6, "tail": 8}
    assert ds.class_split == groups
    # 1-4 objects (hence 1-4 labels) per image.
    assert ds.train.labels.sum(1).min() >= 1 and ds.train.labels.sum(1).max() <= 4
    # Tail classes co-occur with head classes in most of their images.
    head, tail = groups["head"], groups["tail"]
    tail_rows = ds.train.labels[:, tail].any(1)
    assert ds.train.labels[tail_rows][:, head].any(1).mean() > 0.5
    # Test split: nearly balanced, >= 50 positives for every class, a few thousand images.
    assert 2000 <= len(ds.test) <= 3000
    freq = ds.test.class_freq
    assert freq.min() >= 50 and freq.max() <= 2 * freq.min()
    assert set(ds.train.ids).isdisjoint(ds.test.ids)


def test_images_are_encoded_png_of_the_configured_size(target):
    ds, _ = target
    for raw in ds.train.images[:3] + ds.test.images[:3]:
        assert isinstance(raw, bytes) and raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = np.asarray(Image.open(io.BytesIO(raw)))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert img.std() > 10  # clutter, not a flat canvas


def test_class_names_meaningful(target):
    ds, _ = target
    assert ds.class_names[:10] == [f"digit_{d}" for d in range(10)]
    assert {"delta", "circle", "hash"} <= set(ds.class_names)
    assert len(set(ds.class_names)) == 20


def test_builder_stores_what_generate_renders_and_seed_matters(target):
    ds, _ = target
    renders = {
        key: (png, labels)
        for key, png, labels in _first(synthetic_render.generate("target", 64, 0, "train"), 4)
    }
    again = {
        key: png for key, png, _ in _first(synthetic_render.generate("target", 64, 0, "train"), 4)
    }
    other = {
        key: png for key, png, _ in _first(synthetic_render.generate("target", 64, 1, "train"), 4)
    }
    for i, key in enumerate(ds.train.ids[:4]):
        assert key == f"train_{i:05d}"
        assert ds.train.images[i] == renders[key][0] == again[key]
        np.testing.assert_array_equal(ds.train.labels[i], renders[key][1])
        assert other[key] != again[key]
    assert not np.array_equal(
        synthetic_labels.plan_train_labels(20, 0), synthetic_labels.plan_train_labels(20, 1)
    )


def test_second_load_reads_without_generating(target, capsys):
    ds, root = target
    again = synthetic.load(_config(root))
    assert "Generating" not in capsys.readouterr().out
    assert again.train.images == ds.train.images and again.test.ids == ds.test.ids
    np.testing.assert_array_equal(again.test.labels, ds.test.labels)


def test_generation_shows_a_live_bar_per_split(tmp_path, capsys):
    b = synthetic.builder("target", 32, 0, tmp_path)
    examples = b._generate_examples("train")  # what tfds consumes while generating
    first = _first(examples, 3)
    examples.close()
    assert [key for key, _ in first] == ["train_00000", "train_00001", "train_00002"]
    err = capsys.readouterr().err
    assert "generating target_32 train" in err and "/1104" in err and "image" in err


def _first(it, n):
    return list(itertools.islice(it, n))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_train_plan_hits_profile_for_any_seed(seed):
    counts = synthetic_labels.train_class_counts()
    assert (np.diff(counts) <= 0).all()
    labels = synthetic_labels.plan_train_labels(20, seed)
    # Exactly the planned counts, in some seeded class order.
    np.testing.assert_array_equal(np.sort(labels.sum(0))[::-1], counts)
    groups = dataset_lib.class_groups(labels.sum(0))
    assert [len(groups[g]) for g in ("head", "medium", "tail")] == [6, 6, 8]
    assert labels.sum(1).min() >= 1 and labels.sum(1).max() <= 4


@pytest.mark.parametrize("seed", [0, 1])
def test_dbloss_train_split_is_the_builders_long_tail_of_a_balanced_pool(seed):
    labels = synthetic_labels.split_labels("target", seed, "train", "dbloss")
    # The same images as lt_builder picks from the pool, written here from its parts.
    pool = synthetic_labels.plan_anchored_labels(
        20,
        synthetic_labels.DBLOSS_POOL_PER_CLASS,
        seed,
        7006,
        extra_p=synthetic_labels.DBLOSS_EXTRA_P,
    )
    assert pool.sum(0).min() >= synthetic_labels.DBLOSS_POOL_PER_CLASS  # balanced before the cut
    keep = lt_builder.build_long_tail(
        pool, synthetic_labels.DBLOSS_MAX_COUNT, min_count=4, seed=seed
    )
    np.testing.assert_array_equal(labels, pool[keep])
    # A VOC-LT-sized long tail with every group present, unlike the planned split's labels.
    counts = labels.sum(0)
    assert 900 <= len(labels) <= 1300
    assert counts.max() >= 20 * counts.min() and counts.min() >= 4
    groups = dataset_lib.class_groups(counts)
    assert all(len(groups[g]) >= 4 for g in ("head", "medium", "tail"))
    assert labels.sum(1).mean() > synthetic_labels.plan_train_labels(20, seed).sum(1).mean() + 0.1
    # Its test split is the planned one of the seed; its builder config has its own name.
    np.testing.assert_array_equal(
        synthetic_labels.split_labels("target", seed, "test", "dbloss"),
        synthetic_labels.split_labels("target", seed, "test"),
    )
    assert synthetic.make_config("target", 32, seed, "dbloss").name.endswith("_dbloss")
    with pytest.raises(ValueError, match="train_split"):
        synthetic.make_config("pretrain", 32, seed, "dbloss")


def test_pretrain_classes_disjoint_and_balanced(tmp_path):
    target_names = set(synthetic_labels.CLASS_SETS["target"])
    pretrain_names = synthetic_labels.CLASS_SETS["pretrain"]
    assert len(pretrain_names) == 20 and len(set(pretrain_names)) == 20
    assert target_names.isdisjoint(pretrain_names)
    assert not any(name.startswith("digit") for name in pretrain_names)
    train = synthetic_labels.split_labels("pretrain", 0, "train")
    test = synthetic_labels.split_labels("pretrain", 0, "test")
    assert len(train) == 20 * synthetic_labels.PRETRAIN_TRAIN_PER_CLASS
    assert train.sum(0).min() >= synthetic_labels.PRETRAIN_TRAIN_PER_CLASS
    assert train.sum(0).max() <= 1.3 * train.sum(0).min()
    assert test.sum(0).min() >= 50
    for _, png, _ in _first(synthetic_render.generate("pretrain", 32, 0, "train"), 3):
        assert np.asarray(Image.open(io.BytesIO(png))).shape == (32, 32, 3)


def test_bad_class_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="synthetic_classes"):
        synthetic.load(_config(tmp_path, classes="imagenet"))
    with pytest.raises(ValueError, match="image_size"):
        synthetic.make_config("target", 8)


def test_custom_config_names():
    assert synthetic.make_config("target", 64, 0) is synthetic.SyntheticLt.BUILDER_CONFIGS[0]
    cfg = synthetic.make_config("pretrain", 32, 3)
    assert (cfg.name, cfg.classes, cfg.image_size, cfg.seed) == (
        "pretrain_32_seed3",
        "pretrain",
        32,
        3,
    )


def test_preview_writes_grid(target, tmp_path):
    ds, _ = target
    out = tmp_path / "grid.png"
    synthetic.preview(ds, out, n=6)
    img = Image.open(out)
    assert img.width >= 3 * 64 and img.height >= 2 * 64


def test_generation_lock_makes_a_second_generator_wait(tmp_path):
    pytest.importorskip("fcntl")
    events = []

    def second():
        with synthetic.generation_lock(tmp_path, "target_32"):
            events.append("second in")

    with synthetic.generation_lock(tmp_path, "target_32"):
        events.append("first in")
        other = threading.Thread(target=second)
        other.start()
        other.join(timeout=0.5)
        assert other.is_alive() and events == ["first in"]  # still waiting for the lock
        events.append("first out")
    other.join(timeout=10)
    assert events == ["first in", "first out", "second in"]
    # Another dataset has its own lock.
    with synthetic.generation_lock(tmp_path, "target_32"):
        with synthetic.generation_lock(tmp_path, "pretrain_32"):
            pass
