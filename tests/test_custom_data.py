"""The user's own data: CSV quoting and separators, split files, and data_stats warnings."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from configs import custom as custom_config
from configs import default
from mlcnc_jax.data import custom, lt_builder, sources, stats
from mlcnc_jax.data.dataset import MultiLabelDataset, Split


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 100, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def _images(folder, n):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(PNG)


def _csv_config(tmp_path, train, test, separator=" "):
    (tmp_path / "train.csv").write_text(train, encoding="utf-8")
    (tmp_path / "test.csv").write_text(test, encoding="utf-8")
    c = default.get_config()
    c.data.name = "csv"
    c.data.train_annotations = str(tmp_path / "train.csv")
    c.data.test_annotations = str(tmp_path / "test.csv")
    c.data.label_separator = separator
    return c


def _classes(path, separator=" "):
    return custom.read_csv(str(path), label_separator=separator)[1]


def test_quoted_fields_and_separators(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('image,labels\na.png,"cat,dog"\nb.png,"teddy bear,cat"\nc.png,cat,dog\n')
    assert _classes(path, ",") == [["cat", "dog"], ["teddy bear", "cat"], ["cat", "dog"]]
    path.write_text("image,labels\na.png,teddy bear;dining table\nb.png, cat ;;\nc.png\n")
    assert _classes(path, ";") == [["teddy bear", "dining table"], ["cat"], []]
    path.write_text('a.png,"big ""cat"""\n')
    assert _classes(path) == [["big", '"cat"']]


def test_space_separator_splits_on_whitespace_and_refuses_extra_fields(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a.png,cat  dog\tbird\nb.png,\n")
    assert _classes(path) == [["cat", "dog", "bird"], []]
    path.write_text("a.png,cat,dog\n")
    with pytest.raises(ValueError, match=r"a.csv:1: expected 2 fields.*label_separator=,"):
        custom.read_csv(str(path))


def test_suspicious_class_names_warn(tmp_path, caplog):
    path = tmp_path / "a.csv"
    path.write_text('a.png,"cat,dog"\nb.png,cat;dog\n')
    with caplog.at_level(logging.WARNING):
        assert _classes(path) == [["cat,dog"], ["cat;dog"]]
    assert "2 class name(s) contain" in caplog.text and "label_separator" in caplog.text


def test_byte_order_mark_is_not_an_image(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes("image,labels\na.png,cat\n".encode("utf-8-sig"))
    images, classes = custom.read_csv(str(path))
    assert images == [str(tmp_path / "a.png")] and classes == [["cat"]]


def test_label_separator_reaches_the_loader(tmp_path):
    _images(tmp_path / "img", 3)
    c = _csv_config(
        tmp_path,
        "img/0.png,teddy bear|cat\nimg/1.png,cat\n",
        "img/2.png,teddy bear\n",
        separator="|",
    )
    ds = sources.load_dataset(c)
    assert ds.class_names == ["cat", "teddy bear"]
    np.testing.assert_array_equal(ds.train.labels, [[1, 1], [1, 0]])


def test_shipped_custom_config_leaves_the_image_folders_to_the_annotation_files():
    c = custom_config.get_config()
    assert c.data.train_images == "" and c.data.test_images == ""


def test_coco_json_images_default_to_the_annotation_folder(tmp_path):
    _images(tmp_path, 2)
    d = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in range(2)],
        "annotations": [{"id": 1, "image_id": 0, "category_id": 5}],
        "categories": [{"id": 5, "name": "cat"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(d))
    ds = custom.load_coco_json(str(tmp_path / "a.json"), "", str(tmp_path / "a.json"), "")
    assert ds.train.images == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]


# --------------------------------------------------------------------------- data_stats


def _split(images, labels):
    return Split(images=images, labels=np.asarray(labels), ids=list(images))


def test_images_without_labels_and_shared_images(tmp_path):
    _images(tmp_path / "img", 3)
    a, b, c = (str(tmp_path / "img" / f"{i}.png") for i in range(3))
    train = _split([a, b], [[1, 0], [0, 0]])
    # The same file spelt another way is still the same file.
    test = _split([str(tmp_path / "img" / ".." / "img" / "0.png"), c], [[0, 1], [1, 0]])
    assert stats.images_without_labels(train) == [b]
    assert stats.shared_images(train, test) == [test.images[0]]
    encoded = Split(images=[b"x", b"y"], labels=np.ones((2, 2)), ids=[7, 8])
    assert stats.shared_images(encoded, Split([b"y"], np.ones((1, 2)), [9])) == [9]

    ds = MultiLabelDataset("mine", ["p", "q"], train, test)
    warnings = stats.data_warnings(ds)
    assert len(warnings) == 2
    assert warnings[0].startswith("1 of 2 training images have no labels")
    assert warnings[1].startswith("1 test images are also training images (a leak")
    result = stats.data_stats(ds, str(tmp_path / "wd"))
    assert result["num_train_without_labels"] == 1 and result["num_test_in_train"] == 1
    assert result["warnings"] == warnings


def test_clean_dataset_has_no_warnings():
    train = _split(["a.png"], [[1]])
    ds = MultiLabelDataset("mine", ["p"], train, _split(["b.png"], [[1]]))
    assert stats.data_warnings(ds) == []


# --------------------------------------------------------------------------- split files


def test_csv_trains_on_an_lt_builder_split(tmp_path):
    _images(tmp_path / "img", 60)
    rows = ["image,labels"] + [f"img/{i}.png,{'a b' if i % 7 == 0 else 'a'}" for i in range(60)]
    c = _csv_config(tmp_path, "\n".join(rows), "img/0.png,a\n")
    record = lt_builder.main(
        [
            "--labels",
            c.data.train_annotations,
            "--max_count",
            "20",
            "--output",
            str(tmp_path / "lt.json"),
            "--plot",
            str(tmp_path / "lt.png"),
        ]
    )
    c.data.train_split_file = str(tmp_path / "lt.json")
    ds = sources.load_dataset(c)
    assert ds.train.ids == record["train_image_ids"]
    assert ds.class_freq.tolist() == record["class_freq"]
    assert len(ds.train) < 60


def test_coco_json_split_file(tmp_path):
    _images(tmp_path, 4)
    d = {
        "images": [{"id": 10 + i, "file_name": f"{i}.png"} for i in range(4)],
        "annotations": [
            {"id": j, "image_id": 10 + i, "category_id": 1 + (i % 2)}
            for j, i in enumerate(range(4))
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(d))
    ids, labels, names = lt_builder.read_labels(str(tmp_path / "a.json"))
    (tmp_path / "lt.json").write_text(
        json.dumps(lt_builder.split_record([13, 10], labels[[3, 0]], names))
    )
    c = default.get_config()
    c.data.name = "coco_json"
    c.data.train_annotations = c.data.test_annotations = str(tmp_path / "a.json")
    c.data.train_split_file = str(tmp_path / "lt.json")
    ds = sources.load_dataset(c)
    assert ds.train.ids == [13, 10]
    np.testing.assert_array_equal(ds.train.labels, [[0, 1], [1, 0]])
    assert len(ds.test) == 4

    (tmp_path / "lt.json").write_text(json.dumps(lt_builder.split_record([99], [[1, 0]], names)))
    with pytest.raises(ValueError, match="names 1 image.*e.g. 99"):
        sources.load_dataset(c)
    (tmp_path / "lt.json").write_text(json.dumps(lt_builder.split_record([10], [[1]], ["cat"])))
    with pytest.raises(ValueError, match="build the split from the same training file"):
        sources.load_dataset(c)
    c.data.train_split_file = str(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError, match="lt_builder"):
        sources.load_dataset(c)


def test_split_file_is_for_own_data_only():
    c = default.get_config()
    c.data.train_split_file = "lt.json"
    with pytest.raises(ValueError, match="only coco_json and csv data take a split file"):
        from mlcnc_jax import configuration

        configuration.validate(c)
