"""Data sources on fake COCO / VOC / custom trees: benchmark reproduction and bad input."""

import io
import json
import logging
import sys
import types

import numpy as np
import pytest
from PIL import Image

import mlcnc_jax.data
from configs import default
from mlcnc_jax.data import coco, custom, sources, voc
from mlcnc_jax.data.dataset import MultiLabelDataset, Split


def _jpeg(seed=0, size=8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


JPEG = _jpeg()


def _write_coco_json(path, images, category_ids, names, rng):
    """images: list of (id, file_name, class-index list); categories written shuffled."""
    cats = [{"id": int(c), "name": n} for c, n in zip(category_ids, names, strict=True)]
    rng.shuffle(cats)
    anns = []
    for image_id, _, classes in images:
        for c in classes:
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": int(category_ids[c])}
            )
    d = {
        "images": [{"id": i, "file_name": f, "width": 8, "height": 8} for i, f, _ in images],
        "annotations": anns,
        "categories": cats,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))


def _coco_tree(root, train, val, names, seed=0):
    """train/val: {image id: class-index list}. Category ids have gaps, as in COCO."""
    rng = np.random.default_rng(seed)
    category_ids = np.sort(rng.choice(np.arange(1, 100), size=len(names), replace=False))
    for split_name, images in (("train2017", train), ("val2017", val)):
        (root / split_name).mkdir(parents=True, exist_ok=True)
        entries = []
        for image_id, classes in images.items():
            name = f"{image_id:012d}.jpg"
            (root / split_name / name).write_bytes(JPEG)
            entries.append((image_id, name, classes))
        ann = "instances_train2017.json" if split_name == "train2017" else "instances_val2017.json"
        _write_coco_json(root / "annotations" / ann, entries, category_ids, names, rng)
    return category_ids


def _val_images(k):
    # Five annotated test images and one without annotations.
    return {900001 + i: [i % k, (3 * i) % k] for i in range(5)} | {900999: []}


def test_coco_lt_reproduces_the_official_split(lt_splits_dir, tmp_path):
    official = json.loads((lt_splits_dir / "coco_lt.json").read_text())
    train = dict(zip(official["train_image_ids"], official["train_labels"], strict=True))
    train |= {999000 + i: [i] for i in range(3)}  # images outside the split
    k = official["num_classes"]
    _coco_tree(tmp_path / "coco", train, _val_images(k), official["class_names"])

    config = default.get_config()
    config.data.name = "coco_lt"
    config.data.root = str(tmp_path / "coco")
    config.data.split_dir = str(lt_splits_dir)
    ds = sources.load_dataset(config)
    assert len(ds.train) == 1909
    assert ds.train.ids == official["train_image_ids"]
    assert ds.class_names == official["class_names"]  # category ids ascending
    np.testing.assert_array_equal(ds.class_freq, official["class_freq"])
    assert ds.class_split == official["class_split"]
    assert [len(ds.class_split[g]) for g in ("head", "medium", "tail")] == [22, 33, 25]
    assert ds.train.images[0] == str(tmp_path / "coco" / "train2017" / "000000554625.jpg")
    # Test: the images with annotations by default, all of them on request.
    assert len(ds.test) == 5 and 900999 not in ds.test.ids
    assert ds.test.labels[0].nonzero()[0].tolist() == [0]
    config.data.coco_test_all = True
    config.data.split_dir = str(lt_splits_dir / "dbloss_appendix")  # the original files
    ds_all = sources.load_dataset(config)
    assert len(ds_all.test) == 6
    np.testing.assert_array_equal(ds_all.train.labels, ds.train.labels)


def _voc_xml(classes, difficult=()):
    objects = "".join(
        f"<object><name>{voc.VOC_CLASSES[c]}</name><difficult>{int(c in difficult)}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for c in classes
    )
    return f"<annotation><filename>x.jpg</filename>{objects}</annotation>"


def _voc_tree(root, train, test):
    for year, images in (("VOC2012", train), ("VOC2007", test)):
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / year / sub).mkdir(parents=True, exist_ok=True)
        for image_id, classes in images.items():
            (root / year / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(classes))
            (root / year / "JPEGImages" / f"{image_id}.jpg").write_bytes(JPEG)
    (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("\n".join(test) + "\n")


def test_voc_lt_reproduces_the_official_split(lt_splits_dir, tmp_path):
    official = json.loads((lt_splits_dir / "voc_lt.json").read_text())
    train = dict(zip(official["train_image_ids"], official["train_labels"], strict=True))
    train["2012_999999"] = [0, 1]  # outside the split
    test = {"000001": [14, 12], "000002": [0], "000004": [19, 4, 4]}
    _voc_tree(tmp_path / "VOCdevkit", train, test)

    config = default.get_config()
    config.data.name = "voc_lt"
    config.data.root = str(tmp_path / "VOCdevkit")
    (tmp_path / "VOCdevkit" / "lt_splits").mkdir()  # the default split_dir
    for f in ("voc_lt.json",):
        (tmp_path / "VOCdevkit" / "lt_splits" / f).write_bytes((lt_splits_dir / f).read_bytes())
    ds = sources.load_dataset(config)
    assert len(ds.train) == 1142
    assert ds.train.ids == official["train_image_ids"]
    assert ds.class_names == official["class_names"] == sorted(official["class_names"])
    np.testing.assert_array_equal(ds.class_freq, official["class_freq"])
    assert ds.class_split == official["class_split"]
    assert [len(ds.class_split[g]) for g in ("head", "medium", "tail")] == [6, 6, 8]
    assert ds.test.ids == ["000001", "000002", "000004"]
    expected = np.zeros((3, 20), np.uint8)
    expected[0, [12, 14]] = expected[1, 0] = expected[2, [4, 19]] = 1
    np.testing.assert_array_equal(ds.test.labels, expected)


def test_voc_difficult_objects_count_as_positive(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_voc_xml([3, 7], difficult=(7,)))
    assert voc.parse_voc_xml(str(path)) == [3, 7]


# --------------------------------------------------------------------------- bad input

NAMES = ["cat", "dog", "bird"]


@pytest.fixture
def small_coco(tmp_path):
    """A 3-class COCO tree and a 3-class 'official' split JSON beside it."""
    train = {1: [0], 2: [0, 1], 3: [2], 4: [1]}
    _coco_tree(tmp_path / "coco", train, {10: [0], 11: [1, 2]}, NAMES)
    split_dir = tmp_path / "coco" / "lt_splits"
    split_dir.mkdir()
    ids = [2, 3, 1]
    labels = [train[i] for i in ids]
    freq = np.zeros(3, int)
    for ls in labels:
        freq[ls] += 1
    (split_dir / "coco_lt.json").write_text(
        json.dumps(
            {
                "num_classes": 3,
                "class_names": NAMES,
                "train_image_ids": ids,
                "train_labels": labels,
                "class_freq": freq.tolist(),
                "class_split": {"head": [], "medium": [], "tail": [0, 1, 2]},
            }
        )
    )
    return tmp_path / "coco"


def _coco_config(root, **overrides):
    config = default.get_config()
    config.data.name = "coco_lt"
    config.data.root = str(root)
    for k, v in overrides.items():
        setattr(config.data, k, v)
    return config


def test_small_coco_loads(small_coco):
    ds = sources.load_dataset(_coco_config(small_coco))
    assert ds.train.ids == [2, 3, 1] and ds.class_freq.tolist() == [2, 1, 1]
    assert ds.test.ids == [10, 11]


def test_eval_max_images_keeps_an_evenly_spaced_part_of_the_test_split(small_coco):
    split = Split(
        images=[f"{i}.jpg" for i in range(10)], labels=np.eye(10)[:, :3], ids=list(range(10))
    )
    part = sources.spaced_subset(split, 4)
    assert part.ids == [0, 3, 6, 9] and part.images == ["0.jpg", "3.jpg", "6.jpg", "9.jpg"]
    np.testing.assert_array_equal(part.labels, split.labels[[0, 3, 6, 9]])
    config = _coco_config(small_coco)
    config.eval.max_images = 1
    ds = sources.load_dataset(config)
    assert ds.test.ids == [10] and ds.train.ids == [2, 3, 1]  # training data untouched
    config.eval.max_images = 5  # more than the split has: all of it
    assert sources.load_dataset(config).test.ids == [10, 11]


def test_missing_dataset_dir(tmp_path, lt_splits_dir):
    with pytest.raises(FileNotFoundError, match="COCO directory .*nope.*config.data.root"):
        sources.load_dataset(_coco_config(tmp_path / "nope", split_dir=str(lt_splits_dir)))
    with pytest.raises(FileNotFoundError, match="VOC directory .*nope.*config.data.root"):
        voc.load_voc_lt(str(tmp_path / "nope"), str(lt_splits_dir))


def test_missing_annotation_file(small_coco):
    (small_coco / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json not found"):
        sources.load_dataset(_coco_config(small_coco))


def test_split_id_absent_from_annotations(small_coco):
    path = small_coco / "lt_splits" / "coco_lt.json"
    d = json.loads(path.read_text())
    d["train_image_ids"][1] = 777
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"1 image ids of the COCO-LT split are not in .*: 777"):
        sources.load_dataset(_coco_config(small_coco))


def test_voc_split_id_absent(lt_splits_dir, tmp_path):
    official = json.loads((lt_splits_dir / "voc_lt.json").read_text())
    train = dict(zip(official["train_image_ids"][1:], official["train_labels"][1:], strict=True))
    _voc_tree(tmp_path / "VOCdevkit", train, {"000001": [1]})
    with pytest.raises(ValueError, match=official["train_image_ids"][0]):
        voc.load_voc_lt(str(tmp_path / "VOCdevkit"), str(lt_splits_dir))


def test_missing_image(small_coco):
    missing = small_coco / "train2017" / "000000000003.jpg"
    missing.unlink()
    for skip in (False, True):  # a missing file is an error even when skipping corrupt ones
        with pytest.raises(FileNotFoundError, match=str(missing)):
            sources.load_dataset(_coco_config(small_coco, skip_corrupt=skip))


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_corrupt_and_truncated_images(small_coco, caplog, damage):
    bad = small_coco / "train2017" / "000000000002.jpg"
    big = _jpeg(1, size=64)
    bad.write_bytes(b"not an image at all" * 10 if damage == "corrupt" else big[: len(big) // 2])
    with pytest.raises(ValueError, match=f"{bad}.*--config.data.skip_corrupt=True"):
        sources.load_dataset(_coco_config(small_coco))
    with caplog.at_level(logging.WARNING):
        ds = sources.load_dataset(_coco_config(small_coco, skip_corrupt=True))
    assert ds.train.ids == [3, 1]  # image 2 dropped, order kept
    assert ds.class_freq.tolist() == [1, 0, 1]
    assert "skipped 1 of 3 images" in caplog.text


def test_check_images_leaves_bytes_alone():
    split = Split(images=[b"\xff\xd8 whatever"], labels=np.ones((1, 2)), ids=[0])
    assert sources.check_images(split, skip_corrupt=False) is split


# --------------------------------------------------------------------------- custom data


def test_csv_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(JPEG)
    (tmp_path / "train.csv").write_text(
        "image,labels\nimg/0.jpg,zebra cat\nimg/1.jpg,cat\nimg/2.jpg,ant\nimg/3.jpg,cat ant\n"
    )
    (tmp_path / "test.csv").write_text(f"{tmp_path / 'img' / '4.jpg'},ant\nimg/5.jpg,\n")
    config = default.get_config()
    config.data.name = "csv"
    config.data.train_annotations = str(tmp_path / "train.csv")
    config.data.test_annotations = str(tmp_path / "test.csv")
    config.data.head_min, config.data.tail_max = 3, 2
    ds = sources.load_dataset(config)
    assert ds.class_names == ["ant", "cat", "zebra"]
    expected = np.array([[0, 1, 1], [0, 1, 0], [1, 0, 0], [1, 1, 0]], np.uint8)
    np.testing.assert_array_equal(ds.train.labels, expected)
    np.testing.assert_array_equal(ds.test.labels, [[1, 0, 0], [0, 0, 0]])
    assert ds.train.images[0] == str(tmp_path / "img" / "0.jpg")
    assert ds.class_split == {"head": [1], "medium": [0], "tail": [2]}

    (tmp_path / "test.csv").write_text("img/4.jpg,ant horse\n")
    with pytest.raises(ValueError, match=r"\['horse'\]"):
        sources.load_dataset(config)
    (tmp_path / "test.csv").write_text("img/4.jpg,ant,extra\n")
    with pytest.raises(ValueError, match="test.csv:1: expected 2 fields"):
        sources.load_dataset(config)


def test_coco_json_dataset(tmp_path):
    rng = np.random.default_rng(0)
    names = ["car", "bus", "tree"]
    ids = [7, 3, 12]
    (tmp_path / "tr").mkdir()
    (tmp_path / "te").mkdir()
    train = [(1, "a.jpg", [0, 2]), (2, "b.jpg", [1]), (5, "c.jpg", [2])]
    test = [(9, "d.jpg", [1, 2])]
    for d, images in (("tr", train), ("te", test)):
        for _, f, _ in images:
            (tmp_path / d / f).write_bytes(JPEG)
    _write_coco_json(tmp_path / "train.json", train, ids, names, rng)
    # The test file numbers the same categories differently: matched by name.
    _write_coco_json(tmp_path / "test.json", test, [30, 20, 10], names, rng)
    ds = custom.load_coco_json(
        str(tmp_path / "train.json"),
        str(tmp_path / "tr"),
        str(tmp_path / "test.json"),
        str(tmp_path / "te"),
    )
    assert ds.class_names == ["bus", "car", "tree"]  # category ids 3, 7, 12
    np.testing.assert_array_equal(ds.train.labels, [[0, 1, 1], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(ds.test.labels, [[1, 0, 1]])
    assert ds.test.images == [str(tmp_path / "te" / "d.jpg")]

    with pytest.raises(FileNotFoundError, match="config.data.test_annotations"):
        custom.load_coco_json(str(tmp_path / "train.json"), "", str(tmp_path / "no.json"), "")


def test_validation_carve(tmp_path):
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(40):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(JPEG)
        classes = ["a"] + (["b"] if rng.random() < 0.5 else []) + (["c"] if i == 7 else [])
        rows.append(f"img/{i}.jpg,{' '.join(classes)}")
    (tmp_path / "train.csv").write_text("\n".join(rows))
    (tmp_path / "test.csv").write_text("img/0.jpg,a\n")
    config = default.get_config()
    config.data.name = "csv"
    config.data.train_annotations = str(tmp_path / "train.csv")
    config.data.test_annotations = str(tmp_path / "test.csv")
    full = sources.load_dataset(config)
    config.data.val_fraction = 0.25
    a, b = sources.load_dataset(config), sources.load_dataset(config)
    assert a.name == "csv_val" and a.test.ids == b.test.ids and len(a.test) == 10
    assert sorted(a.train.ids + a.test.ids) == sorted(full.train.ids)
    assert not set(a.train.ids) & set(a.test.ids)
    assert a.class_freq.min() >= 1  # class 'c' has one image: it stays in training
    assert "img/7.jpg" not in " ".join(a.test.ids)
    config.seed = 1
    assert sources.load_dataset(config).test.ids != a.test.ids


def test_synthetic_dispatch_is_lazy(monkeypatch):
    calls = []
    ds = MultiLabelDataset(
        "synthetic_lt",
        ["x"],
        Split([b"a"], np.ones((1, 1)), [0]),
        Split([b"b"], np.ones((1, 1)), [1]),
    )
    fake = types.ModuleType("mlcnc_jax.data.synthetic")
    fake.load = lambda config: calls.append(config) or ds
    monkeypatch.setitem(sys.modules, "mlcnc_jax.data.synthetic", fake)
    monkeypatch.setattr(mlcnc_jax.data, "synthetic", fake, raising=False)
    config = default.get_config()
    assert sources.load_dataset(config) is ds and calls == [config]


def test_unknown_source():
    config = default.get_config()
    config.data.name = "imagenet"
    with pytest.raises(ValueError, match="unknown config.data.name 'imagenet'"):
        sources.load_dataset(config)


def test_coco_lt_from_tfds_records(small_coco, monkeypatch):
    split_dir = str(small_coco / "lt_splits")
    train = [(i, f"img{i}".encode(), c) for i, c in {1: [0], 2: [0, 1], 3: [2], 4: [1]}.items()]
    test = [(11, b"t11", [1, 2]), (10, b"t10", [0]), (12, b"t12", [])]

    def records(split_name, data_dir):
        return NAMES, iter(train if split_name == "train" else test)

    monkeypatch.setattr(coco, "_tfds_coco_records", records)
    ds = coco.load_coco_lt("", split_dir, image_source="tfds")
    assert ds.train.images == [b"img2", b"img3", b"img1"]
    assert ds.test.ids == [10, 11] and ds.test.images == [b"t10", b"t11"]
    np.testing.assert_array_equal(ds.test.labels, [[1, 0, 0], [0, 1, 1]])
