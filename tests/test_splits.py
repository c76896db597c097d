"""Official long-tailed split files: JSON form, original DB-loss files, restricted unpickler, download."""

import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from mlcnc_jax.data import splits


@pytest.mark.parametrize("name,sub,n", [("coco_lt", "coco", 1909), ("voc_lt", "voc", 1142)])
def test_original_files_match_json(lt_splits_dir, name, sub, n):
    official = json.loads((lt_splits_dir / f"{name}.json").read_text())
    from_json = splits.load_long_tail_split(name, str(lt_splits_dir))
    # The originals sit in <dir>/coco and <dir>/voc: the loader finds them there.
    original = splits.load_long_tail_split(name, str(lt_splits_dir / "dbloss_appendix"))
    assert original.source.endswith(sub)
    for split in (from_json, original):
        assert len(split.image_ids) == n
        assert split.image_ids == official["train_image_ids"]
        assert split.labels.shape == (n, official["num_classes"])
        rows = [sorted(np.flatnonzero(r).tolist()) for r in split.labels]
        assert rows == official["train_labels"]
        np.testing.assert_array_equal(split.class_freq, official["class_freq"])
        assert split.class_split == official["class_split"]
    assert original.class_names is None
    assert from_json.class_names == official["class_names"]
    if name == "coco_lt":
        assert all(isinstance(i, int) for i in original.image_ids)


def test_original_repository_layout(lt_splits_dir, tmp_path):
    # The repository keeps the files in appendix/VOCdevkit/longtail2012/.
    target = tmp_path / "VOCdevkit" / "longtail2012"
    shutil.copytree(lt_splits_dir / "dbloss_appendix" / "voc", target)
    split = splits.load_long_tail_split("voc_lt", str(tmp_path))
    assert len(split.image_ids) == 1142 and split.source == str(target)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals():
    for payload in (
        pickle.dumps(_Exploit(), protocol=2),
        pickle.dumps({"head": _Exploit()}),
        pickle.dumps(eval, protocol=4),
    ):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            splits.restricted_load(payload)


def test_restricted_unpickler_loads_plain_data():
    value = {"a": [1, 2], "s": {np.int64(3), np.int64(4)}, "x": np.arange(6).reshape(2, 3)}
    for protocol in (2, 4, 5):
        got = splits.restricted_load(pickle.dumps(value, protocol=protocol))
        assert got["a"] == [1, 2] and got["s"] == {3, 4}
        np.testing.assert_array_equal(got["x"], value["x"])


def test_corrupt_pickle_rejected(lt_splits_dir, tmp_path):
    shutil.copytree(lt_splits_dir / "dbloss_appendix" / "voc", tmp_path / "voc")
    (tmp_path / "voc" / "class_split.pkl").write_bytes(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(splits.SplitFileError, match="refusing"):
        splits.load_long_tail_split("voc_lt", str(tmp_path))


def test_inconsistent_json_rejected(lt_splits_dir, tmp_path):
    d = json.loads((lt_splits_dir / "voc_lt.json").read_text())
    d["class_freq"][0] += 1
    (tmp_path / "voc_lt.json").write_text(json.dumps(d))
    with pytest.raises(splits.SplitFileError, match="class_freq"):
        splits.load_long_tail_split("voc_lt", str(tmp_path))


def test_missing_files_message_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        splits.load_long_tail_split("coco_lt", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "coco_lt.json") in msg
    for f in ("img_id.pkl", "class_split.pkl", "class_freq.pkl"):
        assert str(tmp_path / "coco" / f) in msg
    assert "appendix/coco/longtail2017/class_freq.pkl" in msg
    assert "download_splits=True" in msg


def _fake_fetch(lt_splits_dir, calls, corrupt=None):
    files = {
        "appendix/coco/longtail2017/": lt_splits_dir / "dbloss_appendix" / "coco",
        "appendix/VOCdevkit/longtail2012/": lt_splits_dir / "dbloss_appendix" / "voc",
    }

    def fetch(url):
        calls.append(url)
        for prefix, directory in files.items():
            if prefix in url:
                data = (directory / url.rsplit("/", 1)[1]).read_bytes()
                return data + b"\n" if corrupt and url.endswith(corrupt) else data
        raise AssertionError(url)

    return fetch


def test_pinned_sha256_match_the_shared_originals(lt_splits_dir):
    for name, sub in (("coco_lt", "coco"), ("voc_lt", "voc")):
        for f in splits.OFFICIAL_FILES[name]:
            data = (lt_splits_dir / "dbloss_appendix" / sub / f.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f.sha256


@pytest.mark.parametrize("name", ["coco_lt", "voc_lt"])
def test_download_verifies_and_loads(lt_splits_dir, tmp_path, monkeypatch, name):
    calls = []
    monkeypatch.setattr(splits, "_fetch_url", _fake_fetch(lt_splits_dir, calls))
    split = splits.load_long_tail_split(name, str(tmp_path / "splits"), download=True)
    assert len(calls) == 3 and all(
        c.startswith("https://raw.githubusercontent.com/") for c in calls
    )
    reference = splits.load_long_tail_split(name, str(lt_splits_dir))
    assert split.image_ids == reference.image_ids
    np.testing.assert_array_equal(split.labels, reference.labels)
    # Once present, the files are not fetched again.
    splits.load_long_tail_split(name, str(tmp_path / "splits"), download=True)
    assert len(calls) == 3


def test_download_rejects_corrupted_file(lt_splits_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(splits, "_fetch_url", _fake_fetch(lt_splits_dir, calls, "class_freq.pkl"))
    with pytest.raises(splits.SplitFileError, match="sha256"):
        splits.load_long_tail_split("coco_lt", str(tmp_path), download=True)
    assert not (tmp_path / "coco" / "class_freq.pkl").exists()


def test_download_without_internet_says_what_to_do(tmp_path, monkeypatch):
    def offline(url):
        raise OSError("Name or service not known")

    monkeypatch.setattr(splits, "_fetch_url", offline)
    with pytest.raises(splits.SplitFileError, match="put the files by hand") as e:
        splits.load_long_tail_split("voc_lt", str(tmp_path), download=True)
    assert str(tmp_path / "voc" / "img_id.txt") in str(e.value)
