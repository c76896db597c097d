"""The saved config of a workdir: resume checks, recorded changes, eval and predict."""

import json
import os

import pytest

from configs import default
from mlcnc_jax import configuration


def _saved(tmp_path, **changes):
    c = default.get_config()
    for key, value in changes.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    configuration.save_config(str(tmp_path), c)
    return c


def test_save_config_round_trips(tmp_path):
    c = _saved(tmp_path, **{"train.learning_rate": 3e-4, "data.mean": (0.1, 0.2, 0.3)})
    record = configuration.load_saved(str(tmp_path))
    restored = configuration.config_from_record(record)
    assert restored.to_dict() == c.to_dict()
    assert restored.data.mean == (0.1, 0.2, 0.3)
    assert configuration.compare_for_resume(record, c) == []


def test_only_process_0_writes(tmp_path):
    configuration.save_config(str(tmp_path), default.get_config(), process_index=1)
    assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.parametrize(
    "key,value",
    [
        ("seed", 1),
        ("train.learning_rate", 1e-2),
        ("train.num_epochs", 40),
        ("data.image_size", 64),
        ("loss.fpc", 0.1),
        ("model.backbone", "resnet18"),
    ],
)
def test_resume_with_a_changed_field_is_refused_with_the_fix(tmp_path, key, value):
    _saved(tmp_path)
    c = default.get_config()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(configuration.ConfigChangedError) as e:
        configuration.check_resume(str(tmp_path), c)
    text = str(e.value)
    assert f"  {key}: " in text and repr(value) in text
    assert f"--allow_config_change={key}" in text


def test_every_difference_is_listed_in_the_flag(tmp_path):
    _saved(tmp_path)
    c = default.get_config()
    c.seed, c.train.learning_rate = 3, 0.5
    with pytest.raises(configuration.ConfigChangedError, match="--allow_config_change=seed,train"):
        configuration.check_resume(str(tmp_path), c)


def test_fields_that_do_not_change_the_numbers_are_not_compared(tmp_path):
    _saved(tmp_path)
    c = default.get_config()
    c.train.log_every_steps = 1
    c.train.checkpoint_every_steps = 7
    c.train.keep_checkpoints = 5
    c.train.eval_every_epochs = 1
    c.eval.batch_size = 8
    c.predict.threshold = 0.3
    c.model.pretrained = "/elsewhere"
    assert configuration.check_resume(str(tmp_path), c) == []


def test_paths_compare_by_what_they_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    c = default.get_config()
    c.data.root = "data"
    configuration.save_config(str(tmp_path / "wd"), c)
    c.data.root = str(tmp_path / "data") + "/"
    assert configuration.check_resume(str(tmp_path / "wd"), c) == []
    c.data.root = str(tmp_path / "other")
    with pytest.raises(configuration.ConfigChangedError, match="data.root"):
        configuration.check_resume(str(tmp_path / "wd"), c)


def test_allowed_change_is_recorded_and_becomes_the_saved_config(tmp_path):
    _saved(tmp_path)
    c = default.get_config()
    before = c.train.num_epochs
    c.train.num_epochs = 40
    allowed = configuration.check_resume(str(tmp_path), c, ["train.num_epochs"], step=600)
    assert allowed == [("train.num_epochs", before, 40)]
    lines = (tmp_path / "config_changes.jsonl").read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["step"] == 600
    assert entry["changes"] == {"train.num_epochs": {"saved": before, "now": 40}}
    assert configuration.load_saved(str(tmp_path))["config"]["train"]["num_epochs"] == 40
    assert configuration.check_resume(str(tmp_path), c) == []  # nothing new to record
    assert len((tmp_path / "config_changes.jsonl").read_text().splitlines()) == 1


def test_misspelt_allow_entry_is_an_error(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ValueError, match="did you mean 'train.num_epochs'"):
        configuration.check_resume(str(tmp_path), default.get_config(), ["train.num_epoch"])


def test_no_saved_config_saves_the_current_one(tmp_path):
    assert configuration.check_resume(str(tmp_path), default.get_config()) == []
    assert os.path.exists(tmp_path / "config.json")


def test_config_for_eval_uses_the_saved_config(tmp_path):
    _saved(tmp_path, **{"data.image_size": 48, "data.resize_size": 54, "model.embed_dim": 64})
    given = default.get_config()  # eval run without the training overrides
    given.eval.batch_size = 16
    given.data.root = "/moved/data"
    argv = ["run.py", "--config.eval.batch_size=16", "--config.data.root=/moved/data"]
    c = configuration.config_for_eval(
        str(tmp_path), given, configuration.command_line_overrides(argv)
    )
    assert (c.data.image_size, c.model.embed_dim) == (48, 64)
    assert (c.eval.batch_size, c.data.root) == (16, "/moved/data")


def test_config_for_eval_refuses_a_contradicting_flag(tmp_path):
    _saved(tmp_path, **{"data.image_size": 48, "data.resize_size": 54})
    given = default.get_config()
    given.data.image_size = 32
    with pytest.raises(ValueError, match=r"--config.data.image_size=32, trained with 48"):
        configuration.config_for_eval(str(tmp_path), given, ["data.image_size"])
    given.data.image_size = 48  # the same value as saved: fine
    assert (
        configuration.config_for_eval(str(tmp_path), given, ["data.image_size"]).data.image_size
        == 48
    )


def test_config_for_eval_from_python_counts_every_difference_as_given(tmp_path):
    _saved(tmp_path, **{"data.image_size": 48, "data.resize_size": 54})
    given = default.get_config()
    given.data.image_size, given.data.resize_size = 48, 54
    given.predict.threshold = 0.3  # settable: taken
    c = configuration.config_for_eval(str(tmp_path), given)
    assert (c.predict.threshold, c.data.image_size) == (0.3, 48)
    given.model.proj_dim = 7  # not settable, and not the saved value: refused
    with pytest.raises(ValueError, match=r"--config.model.proj_dim=7, trained with 20"):
        configuration.config_for_eval(str(tmp_path), given)


def test_config_for_eval_without_saved_config(tmp_path):
    given = default.get_config()
    assert configuration.config_for_eval(str(tmp_path), given, []) is given


def test_a_field_added_to_the_schema_later_counts_with_its_default(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "config.json"
    record = json.loads(path.read_text())
    del record["config"]["train"]["keep_best"], record["config"]["data"]["sampling"]
    path.write_text(json.dumps(record))
    assert configuration.check_resume(str(tmp_path), default.get_config()) == []
    c = default.get_config()
    c.data.sampling = "uniform"
    with pytest.raises(configuration.ConfigChangedError, match="data.sampling: 'class_aware'"):
        configuration.check_resume(str(tmp_path), c)
