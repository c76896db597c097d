"""What a run does when things go wrong: kills, changed configs, busy workdirs, broken
checkpoints, bad values, divergence. Each scenario is a tiny run of the default config."""

import json
import os

import numpy as np
import pytest
from test_train import StopAfter, stop_after, tiny_config

from configs import default
from mlcnc_jax import checkpoint, checkpoint_health, cli, configuration, workdir_lock
from mlcnc_jax.configuration import ResumeOptions


def _config(data_root, **overrides):
    # 2 epochs of 3 steps; a checkpoint and an evaluation at every epoch end.
    return tiny_config(
        data_root,
        **{"train.checkpoint_every_steps": 3, "train.eval_every_epochs": 1, **overrides},
    )


def test_resume_reports_a_lost_evaluation_and_checks_the_config(data_root, tmp_path):
    config = _config(data_root)
    work = tmp_path / "run"
    # Killed after step 3's checkpoint and evaluation; the kill came during the evaluation,
    # so its report is missing (as if the process died before writing it).
    with pytest.raises(StopAfter):
        cli.run(config, str(work), "train", wrap_batches=stop_after(3))
    saved_report = json.loads((work / "eval_3.json").read_text())
    (work / "eval_3.json").unlink()
    (work / "ap_vs_freq_3.png").unlink()
    assert json.loads((work / "config.json").read_text())["config"]["train"]["num_epochs"] == 2

    # A resume with another learning rate or seed is refused, naming each field and the flag.
    changed = _config(data_root, **{"train.learning_rate": 5e-3, "seed": 7})
    with pytest.raises(configuration.ConfigChangedError) as refused:
        cli.run(changed, str(work), "train")
    message = str(refused.value)
    assert "train.learning_rate: 0.001 (saved) -> 0.005 (now)" in message
    assert "seed: 0 (saved) -> 7 (now)" in message
    assert "--allow_config_change=seed,train.learning_rate" in message
    assert not (work / "eval_3.json").exists()  # nothing ran

    # The same config resumes, runs the lost evaluation first, and ends as always.
    results = cli.run(config, str(work), "train")
    again = json.loads((work / "eval_3.json").read_text())
    assert again["map_raw"] == saved_report["map_raw"]
    assert again["per_class"] == saved_report["per_class"]
    assert (work / "ap_vs_freq_3.png").exists() and results.final.step == 6

    # Extending the run on purpose: allowed, recorded, and the saved config follows.
    longer = _config(data_root, **{"train.num_epochs": 3})
    with pytest.raises(configuration.ConfigChangedError, match="train.num_epochs"):
        cli.run(longer, str(work), "train")
    allow = ResumeOptions(allow_config_change=("train.num_epochs",))
    assert cli.run(longer, str(work), "train", resume=allow).final.step == 9
    change = json.loads((work / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["step"] == 6 and change["changes"]["train.num_epochs"] == {"saved": 2, "now": 3}
    assert json.loads((work / "config.json").read_text())["config"]["train"]["num_epochs"] == 3

    # Eval and predict start from the saved config: no training overrides to repeat.
    plain = default.get_config()
    plain.data.root = data_root
    evaluated = cli.run(plain, str(work), "eval", overrides=["data.root"])
    assert evaluated.final.step == 9
    np.testing.assert_allclose(
        json.loads((work / "eval_9.json").read_text())["map_raw"]["total"],
        evaluated.final.raw.map.total,
    )
    plain.model.proj_dim = 8
    with pytest.raises(ValueError, match=r"--config.model.proj_dim=8, trained with 4"):
        cli.run(plain, str(work), "eval", overrides=["data.root", "model.proj_dim"])


def test_broken_latest_checkpoint_is_named_and_kept(data_root, tmp_path):
    config = _config(data_root)
    work = tmp_path / "run"
    with pytest.raises(StopAfter):
        cli.run(config, str(work), "train", wrap_batches=stop_after(3))
    cli.run(config, str(work), "train")  # to step 6: checkpoints 3 and 6
    latest = work / "checkpoints" / "6"
    os.remove(latest / "state" / "_METADATA")
    more = _config(data_root, **{"train.num_epochs": 3})
    allow = ResumeOptions(allow_config_change=("train.num_epochs",))
    with pytest.raises(checkpoint_health.BrokenCheckpointError) as broken:
        cli.run(more, str(work), "train", resume=allow)
    assert f"step 6 at {latest}" in str(broken.value) and "--restore_step=3" in str(broken.value)
    assert latest.is_dir()  # kept as it is

    # --restore_step resumes from the sound one; the newer one is kept, renamed.
    with pytest.raises(FileNotFoundError, match="no checkpoint of that step; it has 3, 6"):
        cli.run(more, str(work), "train", resume=ResumeOptions(restore_step=4))
    back = ResumeOptions(allow_config_change=("train.num_epochs",), restore_step=3)
    assert cli.run(more, str(work), "train", resume=back).final.step == 9
    assert (work / "checkpoints" / "6.set_aside").is_dir()
    assert checkpoint.Checkpointer(str(work), {}).steps() == [6, 9]  # 6 saved again, then 9


def test_a_busy_workdir_is_refused_at_once(data_root, tmp_path):
    with workdir_lock.hold(str(tmp_path)):
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
            cli.run(_config(data_root), str(tmp_path), "train")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("train.keep_checkpoints", 0, "train.keep_checkpoints"),
        ("train.checkpoint_every_steps", 0, "train.checkpoint_every_steps"),
        ("train.log_every_steps", 0, "train.log_every_steps"),
        ("train.learning_rate", -1e-3, "train.learning_rate"),
    ],
)
def test_bad_values_stop_the_run_before_any_data_is_read(tmp_path, key, value, words):
    config = _config(str(tmp_path / "data"), **{key: value})
    with pytest.raises(configuration.InvalidConfigError, match=words):
        cli.run(config, str(tmp_path / "run"), "train")
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_divergence_says_which_checkpoint_is_worth_resuming(data_root, tmp_path):
    # lr 1e30: the step-1 checkpoint holds huge (finite) weights, and the loss then breaks.
    config = _config(data_root, **{"train.learning_rate": 1e30, "train.checkpoint_every_steps": 1})
    with pytest.raises(FloatingPointError) as diverged:
        cli.run(config, str(tmp_path), "train")
    message = str(diverged.value)
    assert "steps back): finite, largest |weight|" in message
    assert "it would diverge again" in message
    assert "No kept checkpoint has weights of a normal size" in message
