"""Nothing saved is changed behind the user's back, and bad inputs that would corrupt the
numbers are refused before any training. One scenario per failure a careful user found."""

import builtins
import errno
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from test_reliability import _config

from configs import default
from mlcnc_jax import cli, configuration, predict, reports, storage
from mlcnc_jax.configuration import ResumeOptions
from mlcnc_jax.data import coco, custom, sources
from mlcnc_jax.errors import UserError


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """One tiny finished run (checkpoints and evaluations at steps 3 and 6), copied per test."""
    work = tmp_path_factory.mktemp("trained") / "run"
    cli.run(_config(data_root), str(work), "train")
    return work


def _copy(trained, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    return work


def _fail_writes(monkeypatch, marker):
    """Makes every file opened for writing whose name contains `marker` fail: a full disk."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if marker in str(file) and any(c in mode for c in "wax"):
            handle.close()  # created (or truncated), nothing written
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return handle

    monkeypatch.setattr(builtins, "open", fake_open)


# 1 ------------------------------------------------------------------------------------


def test_a_subset_eval_never_replaces_the_run_reports(trained, data_root, tmp_path):
    work = _copy(trained, tmp_path)
    report = (work / "eval_6.json").read_bytes()
    summary = (work / "summary.json").read_bytes()
    plain = default.get_config()
    plain.data.root = data_root
    plain.eval.max_images = 50
    results = cli.run(plain, str(work), "eval", overrides=["data.root", "eval.max_images"])
    assert results.final.num_images_scored == 50
    assert (work / "eval_6.json").read_bytes() == report
    assert (work / "summary.json").read_bytes() == summary
    quick = json.loads((work / "eval_6_subset_50.json").read_text())
    assert quick["test_subset"] == {"images": 50, "of": 2400}
    assert quick["map_raw"]["total"] == pytest.approx(results.final.raw.map.total)
    assert (work / "ap_vs_freq_6_subset_50.png").exists()
    # The run's own reports say which part of the split they scored.
    assert json.loads(report)["test_subset"] == {"images": 256, "of": 2400}


# 2 ------------------------------------------------------------------------------------


def test_a_failed_report_write_is_evaluated_again_on_resume(data_root, tmp_path, monkeypatch):
    config = _config(data_root)
    work = tmp_path / "run"
    with monkeypatch.context() as patch:
        _fail_writes(patch, "eval_3.json")
        with pytest.raises(OSError, match="No space left"):
            cli.run(config, str(work), "train")
    # Atomic: no half-written report (the old code left a 0-byte eval_3.json behind).
    assert not (work / "eval_3.json").exists()
    assert not [p.name for p in work.iterdir() if p.name.endswith(".tmp")]
    cli.run(config, str(work), "train")  # resumes at step 3: its evaluation first
    assert json.loads((work / "eval_3.json").read_text())["step"] == 3
    assert json.loads((work / "summary.json").read_text())["num_evaluations"] == 2


def test_an_unreadable_report_counts_as_missing(tmp_path):
    (tmp_path / "eval_4.json").write_text("")
    (tmp_path / "eval_8.json").write_text('{"step": 8')
    (tmp_path / "eval_12.json").write_text('{"step": 12}')
    assert not reports.has_eval_report(str(tmp_path), 4)
    assert not reports.has_eval_report(str(tmp_path), 8)
    assert reports.has_eval_report(str(tmp_path), 12)
    (tmp_path / "summary.json").write_text("")
    assert reports.read_summary(str(tmp_path)) is None


def test_small_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    storage.write_text(str(path), "old")
    with monkeypatch.context() as patch:
        _fail_writes(patch, "summary.json")
        with pytest.raises(OSError):
            storage.write_text(str(path), "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    storage.write_text(str(path), "new")
    assert path.read_text() == "new"


# 4 ------------------------------------------------------------------------------------


def test_restore_step_sets_the_abandoned_reports_aside(trained, data_root, tmp_path):
    work = _copy(trained, tmp_path)
    old_report = (work / "eval_6.json").read_bytes()
    old_plot = (work / "ap_vs_freq_6.png").read_bytes()
    changed = _config(data_root, **{"train.learning_rate": 5e-3})
    back = ResumeOptions(allow_config_change=("train.learning_rate",), restore_step=3)
    cli.run(changed, str(work), "train", resume=back)
    assert (work / "checkpoints" / "6.set_aside").is_dir()
    # The abandoned branch's step 6 is kept beside the new one, never overwritten.
    assert (work / "eval_6.set_aside.json").read_bytes() == old_report
    assert (work / "ap_vs_freq_6.set_aside.png").read_bytes() == old_plot
    new = json.loads((work / "eval_6.json").read_text())
    assert new["map_raw"] != json.loads(old_report)["map_raw"]
    assert (work / "eval_3.json").exists()  # reports up to the restored step stay
    summary = json.loads((work / "summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [3, 6]
    assert summary["final"]["map_raw"] == new["map_raw"]


# 5 ------------------------------------------------------------------------------------


def _coco_file(path, images, annotations):
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            }
        )
    )
    return str(path)


def test_duplicate_coco_ids_and_file_names_are_refused(tmp_path):
    annotations = [{"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 2}]
    twice = [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}]
    with pytest.raises(UserError, match=r"dup.json: 1 image id\(s\) appear more than once.*1"):
        coco.read_coco_annotations(_coco_file(tmp_path / "dup.json", twice, annotations[:1]))
    same_file = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}]
    with pytest.raises(UserError, match=r"file_name\(s\) appear more than once.*'a.png'"):
        coco.read_coco_annotations(_coco_file(tmp_path / "dup.json", same_file, annotations))
    fine = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]
    ann = coco.read_coco_annotations(_coco_file(tmp_path / "ok.json", fine, annotations))
    assert ann.image_classes == {1: [0], 2: [1]}


def test_duplicate_csv_rows(tmp_path, caplog):
    path = tmp_path / "a.csv"
    path.write_text("a.png,cat\nb.png,dog\na.png,cat\nb.png,dog\nc.png,cat\n")
    with caplog.at_level("WARNING"):
        images, classes = custom.read_csv(str(path))
    assert [p.rsplit("/", 1)[-1] for p in images] == ["a.png", "b.png", "c.png"]
    assert classes == [["cat"], ["dog"], ["cat"]]
    assert "2 row(s) repeat an earlier row exactly (first: line 3)" in caplog.text
    path.write_text("a.png,cat\nb.png,dog\na.png,dog\n")
    with pytest.raises(UserError, match=r"a.csv:3: image 'a.png' is listed again.*line 1"):
        custom.read_csv(str(path))


# 6 ------------------------------------------------------------------------------------


def test_each_predict_keeps_the_earlier_predictions(tmp_path):
    from test_predict import NAMES, _trained_workdir

    workdir, c = _trained_workdir(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(images / "a.png")
    c.predict.inputs = str(images)
    first = predict.predict(c, workdir)
    before = (tmp_path / "run" / "predictions.json").read_bytes()
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    c.predict.inputs = str(text)
    with pytest.raises(predict.UnreadableImagesError):
        predict.predict(c, workdir)
    assert (tmp_path / "run" / "predictions.json").read_bytes() == before
    second = json.loads((tmp_path / "run" / "predictions_2.json").read_text())
    assert second["predictions"] == [] and len(second["failed"]) == 1
    assert json.loads(before)["predictions"][0]["scores"].keys() == set(NAMES)
    assert first.endswith("predictions.json")


# 7 ------------------------------------------------------------------------------------


def test_a_write_error_keeps_the_config_change_history(tmp_path, monkeypatch):
    c = default.get_config()
    configuration.save_config(str(tmp_path), c)
    history = tmp_path / "config_changes.jsonl"
    history.write_text('{"step": 100, "changes": {"train.num_epochs": {"saved": 5, "now": 10}}}\n')
    kept = history.read_text()
    c.train.num_epochs = 40
    with monkeypatch.context() as patch:
        _fail_writes(patch, "config_changes")
        with pytest.raises(OSError):
            configuration.check_resume(str(tmp_path), c, ["train.num_epochs"], step=200)
    assert history.read_text() == kept
    configuration.check_resume(str(tmp_path), c, ["train.num_epochs"], step=200)
    lines = history.read_text().splitlines()
    assert lines[0] == kept.strip() and json.loads(lines[1])["step"] == 200


# 8 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workdir", ["", "  "])
def test_an_empty_workdir_is_refused(tmp_path, monkeypatch, workdir, data_root):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--workdir is empty"):
        cli.run(_config(data_root), workdir, "data_stats")
    assert list(tmp_path.iterdir()) == []


# 9, 10 --------------------------------------------------------------------------------


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_any_data(tmp_path):
    config = _config(str(tmp_path / "data"), **{"train.batch_size": 1_000_000_000})
    with pytest.raises(configuration.InvalidConfigError, match=r"train.batch_size = 1000000000"):
        cli.run(config, str(tmp_path / "run"), "train")
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    # The estimate: 8 x 224 x 224 x 3 float32 values.
    assert configuration.batch_bytes(8, 224) == 8 * 224 * 224 * 3 * 4


def test_a_warm_up_as_long_as_the_run_is_refused(tmp_path):
    config = _config(str(tmp_path), **{"loss.warmup_epochs": 2, "train.num_epochs": 2})
    with pytest.raises(configuration.InvalidConfigError, match="loss.warmup_epochs = 2"):
        configuration.validate(config)
    config.loss.warmup_epochs = 1
    configuration.validate(config)
    config.model.name = "baseline"  # no FLA warm-up at all
    config.loss.warmup_epochs = 5
    configuration.validate(config)


# 11 -----------------------------------------------------------------------------------


def _csv_data(tmp_path, test_rows):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "train.csv").write_text("0.png,cat\n1.png,dog\n2.png,cat dog\n")
    (tmp_path / "test.csv").write_text("image,labels\n" + test_rows)
    c = _config(str(tmp_path))
    c.data.name = "csv"
    c.data.train_annotations = str(tmp_path / "train.csv")
    c.data.test_annotations = str(tmp_path / "test.csv")
    c.data.train_images = c.data.test_images = str(folder)
    return c


def test_an_empty_test_split_is_refused_before_training(tmp_path):
    config = _csv_data(tmp_path, "")
    with pytest.raises(UserError, match=r"test.csv \(config.data.test_annotations\) lists no"):
        cli.run(config, str(tmp_path / "run"), "train")
    assert not (tmp_path / "run" / "checkpoints").exists()
    # The check itself, for any source.
    dataset = custom.load_csv(
        config.data.train_annotations, config.data.train_images, config.data.train_annotations, ""
    )
    dataset.test = sources.subset(dataset.test, [])
    with pytest.raises(UserError, match="the test split of csv holds no images"):
        sources.check_split_sizes(dataset, config)
