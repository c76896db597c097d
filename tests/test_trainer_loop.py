"""The accelerator-shaped step loop: nothing leaves the devices between two log points, a
non-finite loss is still caught before anything is saved, device prefetch and uint8 input
give the same numbers, and a run killed during an asynchronous save resumes exactly."""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import poison_batch, tiny_config

from mlcnc_jax import checkpoint, cli, experiment, parallel, trainer
from mlcnc_jax.state import initial_train_state
from mlcnc_jax.step import normalize_images


def _fetch_counter(monkeypatch) -> list[int]:
    """Records how many steps' metrics each fetch carried."""
    sizes: list[int] = []
    real = trainer.fetch_metrics

    def counted(metrics):
        sizes.append(len(metrics))
        return real(metrics)

    monkeypatch.setattr(trainer, "fetch_metrics", counted)
    return sizes


def _guard_device_fetches(monkeypatch) -> list[str]:
    """Makes every fetch of a jax.Array's value outside `trainer.on_host` fail.

    On a GPU or TPU `jax.transfer_guard_device_to_host` does this; on the CPU, where device
    memory is host memory, JAX does not count a fetch as a transfer, so the one path every
    fetch takes (`float()`, `np.asarray`, `jax.device_get`, printing: ArrayImpl._value)
    is watched instead.
    """
    from jax._src import array

    allowed = [0]
    refused: list[str] = []
    value = array.ArrayImpl._value

    def guarded(self):
        if not allowed[0]:
            refused.append(f"{self.dtype}{list(self.shape)}")
            raise AssertionError("a device array was fetched in the step loop")
        return value.fget(self)

    real_on_host = trainer.on_host

    @contextlib.contextmanager
    def on_host():
        allowed[0] += 1
        try:
            with real_on_host():
                yield
        finally:
            allowed[0] -= 1

    monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded))
    monkeypatch.setattr(trainer, "on_host", on_host)
    return refused


def test_nothing_leaves_the_devices_between_log_points(data_root, tmp_path, monkeypatch):
    # 12 steps; metrics fetched every 4, a checkpoint every 6 and an evaluation at the end:
    # fetches after steps 4, 6 (save), 8, 12 and nowhere else.
    config = tiny_config(
        data_root,
        **{
            "train.steps_per_epoch": 6,
            "train.num_epochs": 2,
            "train.log_every_steps": 4,
            "train.checkpoint_every_steps": 6,
            "train.eval_every_epochs": 2,
        },
    )
    sizes = _fetch_counter(monkeypatch)
    steps_seen: list[int] = []

    class Record:
        def on_step(self, step, metrics):
            assert isinstance(metrics["loss"], float)  # on the host, as hooks expect
            steps_seen.append(step)

    run = experiment.build(config, str(tmp_path), hooks=[Record()])
    # Any fetch from a device outside the loop's host points (metrics, evaluation,
    # checkpoints, hooks) raises, explicit or implicit (float(), np.asarray, printing).
    state = run.initial_state(training=True)
    batches = run.batches(int(state.step))
    refused = _guard_device_fetches(monkeypatch)
    with jax.transfer_guard_device_to_host("disallow_explicit"):
        results = run.trainer.train(state, batches)
    monkeypatch.undo()
    assert not refused
    assert sizes == [4, 2, 2, 4]
    assert steps_seen == list(range(1, 13))
    assert results.step == 12
    assert checkpoint.Checkpointer(str(tmp_path), {}).steps() == [6, 12]


def test_nonfinite_loss_between_fetches_names_its_step_and_is_never_saved(data_root, tmp_path):
    # Checkpoints after steps 2 and 4, metrics fetched every 4 steps (and before each save):
    # step 3's NaN is found at step 4's fetch, before step 4 is saved.
    config = tiny_config(
        data_root,
        **{"train.log_every_steps": 4, "train.checkpoint_every_steps": 2},
    )
    with pytest.raises(FloatingPointError, match="at step 3 ") as stopped:
        cli.run(config, str(tmp_path), "train", wrap_batches=poison_batch(3))
    assert checkpoint.Checkpointer(str(tmp_path), {}).steps() == [2]
    assert "step 2 (1 steps back): finite" in str(stopped.value)


def test_prefetch_keeps_order_and_places_batches_as_the_step_takes_them():
    placement = parallel.Placement("jit")
    batches = [{"image": np.full((8, 2, 2, 3), i, np.uint8)} for i in range(5)]
    placed = list(placement.prefetch(iter(batches), size=2))
    assert [int(b["image"][0, 0, 0, 0]) for b in placed] == [0, 1, 2, 3, 4]
    assert all(isinstance(b["image"], jax.Array) for b in placed)
    assert placed[0]["image"].sharding.spec == jax.sharding.PartitionSpec(parallel.AXIS)
    pmapped = list(parallel.Placement("pmap").prefetch(iter(batches), size=3))
    n = jax.local_device_count()
    assert pmapped[4]["image"].shape == (n, 8 // n, 2, 2, 3)
    # The prefetcher reads `size` batches ahead of the consumer, not more.
    reads = []

    def source():
        for i, b in enumerate(batches):
            reads.append(i)
            yield b

    stream = placement.prefetch(source(), size=2)
    next(stream)
    assert reads == [0, 1]


def test_uint8_images_are_normalised_on_the_device_as_the_host_did():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (pixels.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    out = normalize_images(jax.numpy.asarray(pixels), (mean, std))
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    floats = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)  # already normalised: kept
    np.testing.assert_array_equal(np.asarray(normalize_images(floats, (mean, std))), floats)


_KILL_DURING_SAVE = """
import asyncio, os, signal, sys, time
sys.path.insert(0, {tests!r})
from orbax.checkpoint._src.path import atomicity
from test_train import tiny_config
from mlcnc_jax import cli

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def slow_finalize(self, *args, **kwargs):
    # Step 3's files are written; its rename into place is held back, and the process is
    # killed meanwhile, while training goes on (the save is asynchronous).
    if str(self.get_final()).endswith("/3"):
        with open({marker!r}, "w") as f:
            f.write("writing step 3")
        await asyncio.sleep(60)
    return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize

class KillAtStep4:
    def on_step(self, step, metrics):
        # Training went on past step 3; once step 3's save is on its last stretch, die.
        if step == 4:
            for _ in range(600):
                if os.path.exists({marker!r}):
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.1)

config = tiny_config({data_root!r}, **{overrides!r})
cli.run(config, {workdir!r}, "train", hooks=[KillAtStep4()])
"""


def test_kill_during_an_asynchronous_save_resumes_to_the_same_numbers(data_root, tmp_path):
    # Evaluations after steps 3 and 6, checkpoints after 2, 3 (the best so far, kept by
    # keep_best), 4 and 6; the run is killed while step 3's checkpoint is being written.
    overrides = {
        "train.log_every_steps": 1,
        "train.checkpoint_every_steps": 2,
        "train.eval_every_epochs": 1,
        "train.keep_best": True,
    }
    config = tiny_config(data_root, **overrides)
    full = cli.run(config, str(tmp_path / "full"), "train")

    work = tmp_path / "killed"
    marker = tmp_path / "saving"
    script = _KILL_DURING_SAVE.format(
        tests=str(pathlib.Path(__file__).parent),
        marker=str(marker),
        data_root=data_root,
        overrides=overrides,
        workdir=str(work),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert marker.exists()  # it died with step 3's save begun and unfinished
    names = os.listdir(work / "checkpoints")
    assert "2" in names and "3" not in names
    assert any(n.startswith("3.") and "tmp" in n for n in names), names
    assert checkpoint.Checkpointer(str(work), {}).latest_step() == 2

    resumed = cli.run(config, str(work), "train")
    for name in ("raw", "ema"):
        got, want = getattr(resumed.final, name), getattr(full.final, name)
        np.testing.assert_allclose(got.ap, want.ap, atol=1e-6)
        np.testing.assert_allclose(
            list(got.map.as_dict().values()), list(want.map.as_dict().values()), atol=1e-6
        )
    assert (
        json.loads((work / "eval_6.json").read_text())["map_raw"]
        == json.loads((tmp_path / "full" / "eval_6.json").read_text())["map_raw"]
    )
    # The checkpoint kept as the best is the one the reports call best.
    best = json.loads((work / "summary.json").read_text())["best_raw_on_test"]["step"]
    assert checkpoint.Checkpointer(str(work), {}, keep_best=True).best_step() == best
    assert str(best) in os.listdir(work / "checkpoints")
    assert not any("tmp" in n for n in os.listdir(work / "checkpoints"))  # cleared on start


def test_evaluation_reads_the_split_once_for_the_raw_and_the_ema_weights():
    from configs import default
    from mlcnc_jax import optim
    from mlcnc_jax.data import arrays
    from mlcnc_jax.evaluation import Evaluator
    from mlcnc_jax.models import create_model, get_family

    c = default.get_config()
    c.model.embed_dim, c.model.proj_dim, c.model.num_heads = 16, 4, 2
    k, n = 5, 20
    model = create_model(c, k)
    tx, _ = optim.create_optimizer(c, total_steps=10)
    state = initial_train_state(c, model, tx, k)
    # EMA weights unlike the raw ones, so that mixing them up shows.
    state = state.replace(ema=jax.tree.map(lambda x: x * 0.5, state.ema))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = (rng.random((n, k)) < 0.4).astype(np.float32)
    labels[0] = 1.0
    passes = []

    def batches():
        passes.append(1)
        return arrays.eval_batches(pixels, labels, global_batch=8, mean=None, std=None)

    evaluator = Evaluator(
        model,
        batches,
        family=get_family(c.model.name),
        num_images=n,
        class_split={"head": [0, 1], "medium": [2], "tail": [3, 4]},
        mesh=parallel.make_mesh(),
        image_norm=(tuple(c.data.mean), tuple(c.data.std)),
    )
    both = evaluator(state)
    assert len(passes) == 1
    alone = {
        "raw": evaluator.score({"raw": state.variables()})["raw"],
        "ema": evaluator.score({"ema": state.ema_variables()})["ema"],
    }
    for name, scores in (("raw", both.raw), ("ema", both.ema)):
        np.testing.assert_allclose(scores.ap, alone[name].ap, atol=1e-6)
    assert not np.allclose(both.raw.ap, both.ema.ap, equal_nan=True)
