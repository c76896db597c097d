"""run.py as a user meets it: config overrides, unknown keys, missing data and weights."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_py(*args, timeout=900, env=None):  # generous: a loaded CPU is slow to make the data
    env = {
        **os.environ,
        "XLA_FLAGS": "",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unknown_config_key_is_an_error(tmp_path):
    result = run_py(
        "--config=configs/default.py", f"--workdir={tmp_path}", "--config.train.batchsize=16"
    )
    assert result.returncode != 0
    # One line with the suggestion, no traceback.
    assert "unknown config field 'train.batchsize'" in result.stderr
    assert "did you mean --config.train.batch_size?" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_stats_with_overrides(tmp_path):
    # Overrides reach the program: a 32 px synthetic_lt generated into a temporary root.
    result = run_py(
        "--config=configs/default.py",
        f"--workdir={tmp_path / 'wd'}",
        "--mode=data_stats",
        f"--config.data.root={tmp_path / 'data'}",
        "--config.data.image_size=32",
        "--config.data.resize_size=36",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert 1000 <= stats["num_train_images"] <= 1200  # about VOC-LT's 1,142
    assert stats["num_test_images"] >= 2000
    assert len(stats["class_freq"]) == 20
    assert (len(stats["head"]), len(stats["medium"]), len(stats["tail"])) == (6, 6, 8)
    assert all(stats["class_freq"][c] >= 100 for c in stats["head"])
    assert all(stats["class_freq"][c] < 20 for c in stats["tail"])
    assert (tmp_path / "wd" / "class_histogram.png").exists()
    assert (tmp_path / "data" / "synthetic_lt" / "target_32").is_dir()


@pytest.mark.parametrize("config", ["coco_lt", "voc_lt"])
def test_benchmark_configs_fail_at_once_without_weights(config, tmp_path):
    result = run_py(
        f"--config=configs/{config}.py",
        f"--workdir={tmp_path}",
        f"--config.data.root={tmp_path}/none",
    )
    assert result.returncode != 0
    assert "Pretrained backbone weights not found" in result.stderr
    assert "resnet50_imagenet.safetensors" in result.stderr
    assert "Traceback" not in result.stderr  # a bad input: its message, not a traceback


def test_benchmark_config_fails_at_once_without_data(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"fc.weight": np.zeros((2, 2), np.float32)}, str(weights))  # read after the data
    result = run_py(
        "--config=configs/coco_lt.py",
        f"--workdir={tmp_path / 'wd'}",
        f"--config.data.root={tmp_path / 'coco'}",
        f"--config.model.pretrained={weights}",
    )
    assert result.returncode != 0
    assert str(tmp_path / "coco") in result.stderr


def test_which_errors_are_the_users():
    import errno

    from mlcnc_jax import cli, configuration
    from mlcnc_jax.errors import UserError
    from mlcnc_jax.models import text_classifier

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/eval_4.json")
    assert cli.is_user_error(full)
    assert cli.describe_user_error(full) == (
        "/runs/a/eval_4.json: No space left on device (free some space, or choose another "
        "--workdir; the run resumes from its last checkpoint)"
    )
    assert cli.is_user_error(configuration.InvalidConfigError("x"))
    assert cli.is_user_error(UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid"))
    # A ValueError raised while reading the user's text embeddings is about them...
    try:
        text_classifier.load_text_embeddings(__file__, 3)
    except ValueError as e:
        assert cli.is_user_error(e) and __file__ in str(e)
    # ...one raised anywhere else is a bug, and keeps its traceback.
    try:
        int("not a number")
    except ValueError as e:
        assert not cli.is_user_error(e)
    assert issubclass(UserError, ValueError)
