"""Broken checkpoints are named by step, path and reason, never deleted."""

import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlcnc_jax import checkpoint, checkpoint_health


def _state(seed):
    # Random values: large enough to be stored in data files, not inlined in the index.
    w = np.random.default_rng(seed).normal(size=(64, 128)).astype(np.float32)
    return {
        "params": {"w": jnp.asarray(w), "b": jnp.zeros(3)},
        "opt_state": ({"mu": jnp.asarray(w[:, :32] * 2)},),
        "step": jnp.int32(seed),
    }


@pytest.fixture
def checkpoints(tmp_path):
    """A real checkpoint directory, as the trainer writes it: steps 10 and 20."""
    saver = checkpoint.Checkpointer(str(tmp_path), {"model": "m"}, keep=3)
    for step in (10, 20):
        saver.save(step, _state(step))
    saver.close()
    return saver.directory


@pytest.fixture
def legacy_checkpoints(tmp_path):
    """Checkpoints of earlier versions: the model record in a JSON item 'meta'."""
    directory = str(tmp_path / "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=3, create=True, enable_async_checkpointing=False
    )
    manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
    for step in (10, 20):
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state(step)),
                meta=ocp.args.JsonSave({"step": step, "model": {"model": "m"}}),
            ),
            force=True,
        )
    manager.wait_until_finished()
    manager.close()
    return directory


def _data_files(step_dir):
    # The array data (OCDBT value files of process 0), not the metadata.
    state = os.path.join(step_dir, "state")
    return [
        os.path.join(root, f)
        for root, _, files in os.walk(state)
        if os.path.basename(root) == "d" and "ocdbt.process_0" in root
        for f in files
    ]


def test_sound_checkpoints(checkpoints):
    assert checkpoint_health.list_steps(checkpoints) == [10, 20]
    assert checkpoint_health.find_restorable(checkpoints) == (20, [])
    assert checkpoint_health.choose_restore_step(checkpoints) == 20
    assert checkpoint_health.find_restorable(checkpoints + "_none") == (None, [])


def test_truncated_data_file(checkpoints):
    latest = os.path.join(checkpoints, "20")
    for path in _data_files(latest):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    step, broken = checkpoint_health.find_restorable(checkpoints)
    assert step == 10
    assert [(b.step, b.path) for b in broken] == [(20, latest)]
    assert broken[0].reason.startswith("its arrays cannot be read")
    # Without reading the arrays the damage is not seen: only metadata is checked.
    assert checkpoint_health.find_restorable(checkpoints, deep=False) == (20, [])
    with pytest.raises(checkpoint_health.BrokenCheckpointError) as e:
        checkpoint_health.choose_restore_step(checkpoints)
    assert f"step 20 at {latest}" in str(e.value) and "--restore_step=10" in str(e.value)
    assert checkpoint_health.choose_restore_step(checkpoints, allow_fallback=True) == 10
    assert os.path.isdir(latest) and _data_files(latest)  # nothing deleted


def test_deleted_metadata_file(checkpoints):
    os.remove(os.path.join(checkpoints, "20", "state", "_METADATA"))
    step, broken = checkpoint_health.find_restorable(checkpoints, deep=False)
    assert step == 10 and broken[0].step == 20
    assert "state/_METADATA is missing" in broken[0].reason


def test_deleted_step_record(checkpoints):
    os.remove(os.path.join(checkpoints, "20", checkpoint_health.STEP_METADATA))
    _, broken = checkpoint_health.find_restorable(checkpoints)
    assert broken[0].step == 20 and "_CHECKPOINT_METADATA cannot be read" in broken[0].reason


def test_legacy_checkpoints_are_read_and_checked(legacy_checkpoints, tmp_path):
    assert checkpoint_health.find_restorable(legacy_checkpoints) == (20, [])
    saved = checkpoint.Checkpointer(str(tmp_path), {"model": "m"})
    assert saved.read_meta(20) == {"step": 20, "model": {"model": "m"}}
    saved.check_fingerprint(20)
    os.remove(os.path.join(legacy_checkpoints, "20", "meta", "metadata"))
    _, broken = checkpoint_health.find_restorable(legacy_checkpoints)
    assert broken[0].step == 20 and "'meta' item cannot be read" in broken[0].reason


def test_all_broken(checkpoints):
    for step in ("10", "20"):
        os.remove(os.path.join(checkpoints, step, "state", "_METADATA"))
    assert checkpoint_health.find_restorable(checkpoints)[0] is None
    with pytest.raises(checkpoint_health.BrokenCheckpointError, match="no checkpoint in"):
        checkpoint_health.choose_restore_step(checkpoints, allow_fallback=True)


def test_set_aside_lets_the_step_be_saved_again(checkpoints):
    os.remove(os.path.join(checkpoints, "20", "state", "_METADATA"))
    _, broken = checkpoint_health.find_restorable(checkpoints)
    moved = checkpoint_health.set_aside(broken)
    assert moved == [os.path.join(checkpoints, "20.broken")] and os.path.isdir(moved[0])
    saver = checkpoint.Checkpointer(os.path.dirname(checkpoints), {"model": "m"}, keep=3)
    assert saver.steps() == [10]
    saver.save(20, _state(21))
    saver.close()
    assert checkpoint_health.find_restorable(checkpoints) == (20, [])
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(checkpoints, "20", "state"))
    np.testing.assert_array_equal(restored["params"]["w"], _state(21)["params"]["w"])


def test_set_aside_after_a_chosen_step(checkpoints):
    moved = checkpoint_health.set_aside_after(checkpoints, 10)
    assert moved == [os.path.join(checkpoints, "20.set_aside")]
    assert checkpoint_health.list_steps(checkpoints) == [10]
    assert checkpoint_health.set_aside_after(checkpoints, 10) == []
    assert os.path.isdir(moved[0])
