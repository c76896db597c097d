"""The installable package: the `mlcnc` command line, built-in config names, the wheel's contents."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
from absl import flags

from mlcnc_jax import cli, configuration
from mlcnc_jax.configuration import ResumeOptions

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_builtin_configs_are_the_files_of_the_configs_package():
    names = configuration.builtin_configs()
    expected = sorted(p.stem for p in CONFIGS.glob("*.py") if not p.name.startswith("_"))
    assert names == expected
    assert {"default", "coco_lt", "voc_lt", "ablations"} <= set(names)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("default", "default.py"),
        ("coco_lt.py", "coco_lt.py"),
        ("configs/voc_lt.py", "voc_lt.py"),
        ("ablations.py:bce_uniform", "ablations.py:bce_uniform"),
        ("ablations:bce_uniform", "ablations.py:bce_uniform"),
    ],
)
def test_config_names_resolve_to_the_builtin_files_from_any_directory(
    value, expected, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # nothing named like a config here
    assert configuration.resolve_config(value) == str(CONFIGS / expected)


def test_existing_config_files_are_used_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert configuration.resolve_config("configs/default.py") == "configs/default.py"
    assert (
        configuration.resolve_config("configs/ablations.py:focal") == "configs/ablations.py:focal"
    )
    # A user's file shadows a built-in name.
    own = tmp_path / "default.py"
    own.write_text("")
    monkeypatch.chdir(tmp_path)
    assert configuration.resolve_config("default.py") == "default.py"


@pytest.mark.parametrize("value", ["no_such_config", "elsewhere/default.py", "/x/coco_lt.py:a"])
def test_unknown_config_is_a_clear_error(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="built-in configs: ablations, coco_lt"):
        configuration.resolve_config(value)


def test_resolve_config_argv_handles_both_flag_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["mlcnc", "--config=coco_lt", "--config.data.root=/data", "--workdir=w"]
    assert configuration.resolve_config_argv(argv) == [
        "mlcnc",
        f"--config={CONFIGS / 'coco_lt.py'}",
        "--config.data.root=/data",
        "--workdir=w",
    ]
    assert configuration.resolve_config_argv(["mlcnc", "--config", "voc_lt"])[2] == str(
        CONFIGS / "voc_lt.py"
    )


def test_flags_reach_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(cli, "run", lambda *a, **k: calls.append((a, k)))
    cli.define_flags()
    cli.define_flags()  # twice is harmless (run.py and a test in one process)
    argv = [
        "mlcnc",
        "--config=ablations:bce_uniform",
        "--config.train.batch_size=32",
        "--workdir=wd",
        "--mode=eval",
        "--multihost",
        "--coordinator_address=10.0.0.2:8476",
        "--num_processes=4",
        "--process_id=3",
        "--restore_step=40",
        "--allow_config_change=train.num_epochs,seed",
        "--force_unlock",
    ]
    argv = configuration.resolve_config_argv(argv)
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    try:
        rest = flags.FLAGS(argv)
        cli._main(rest)
    finally:
        flags.FLAGS.unparse_flags()
    (config, workdir, mode), kwargs = calls[0]
    assert config.train.batch_size == 32
    assert config.loss.bce == 1.0 and config.loss.two_way == 0.0  # the ablation's setting
    assert (workdir, mode) == ("wd", "eval")
    assert kwargs == {
        "multihost": True,
        "coordinator_address": "10.0.0.2:8476",
        "num_processes": 4,
        "process_id": 3,
        "resume": ResumeOptions(
            allow_config_change=("train.num_epochs", "seed"), restore_step=40, force_unlock=True
        ),
        "overrides": ["train.batch_size"],
    }


def test_command_from_another_directory_loads_a_builtin_config(tmp_path):
    # As the installed `mlcnc` command does: the configs come from the package, not the cwd.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlcnc_jax.cli import main; main()",
            "--config=coco_lt",
            f"--workdir={tmp_path / 'wd'}",
            f"--config.data.root={tmp_path / 'none'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode != 0
    # coco_lt's recipe (ResNet-50 ImageNet weights) was loaded and checked before any work.
    assert "resnet50_imagenet.safetensors" in result.stderr, result.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, "-c", "from mlcnc_jax.cli import main; main()", "--config=cocolt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "no built-in config named 'cocolt'" in bad.stderr and "coco_lt" in bad.stderr


def test_wheel_holds_the_package_the_configs_and_the_command(tmp_path):
    # Built from a copy, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "tests", "benchmarks", "notebooks", "__pycache__", "workdir", ".*"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = (tmp_path / "dist").glob("mlcnc_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ROOT.glob("mlcnc_jax/**/*.py"):
        assert module.relative_to(ROOT).as_posix() in names
    for config in CONFIGS.glob("*.py"):
        assert f"configs/{config.name}" in names
    # The shipped trunk that the default config fine-tunes from.
    assert "mlcnc_jax/trunks/synthetic_pretrain_resnet_small_32.safetensors" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mlcnc = mlcnc_jax.cli:main" in text
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: jax==" in requires and "Requires-Dist: flax==" in requires
