"""End to end: the default config, shrunk, trains, evaluates, checkpoints, resumes and predicts."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from configs import default
from mlcnc_jax import checkpoint, cli, experiment


def tiny_config(data_root: str, **overrides):
    c = default.get_config()
    c.data.root = data_root
    c.data.image_size = 32
    c.data.resize_size = 36
    c.model.backbone = "resnet_small"
    c.model.embed_dim = 32
    c.model.proj_dim = 4
    c.model.num_heads = 2
    c.train.batch_size = 16
    c.eval.batch_size = 256
    c.eval.max_images = 256  # evenly spaced over the 2,400 test images: one batch
    c.train.steps_per_epoch = 3
    c.train.num_epochs = 2
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 2
    c.train.eval_every_epochs = 2
    c.train.ema_decay = 0.9
    c.loss.warmup_epochs = 1
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        setattr(c[section] if section else c, field, value)
    return c


class StopAfter(Exception):
    pass


def stop_after(steps: int, prefetch: int = 2):
    """Wraps the training iterator so that the run dies right after step `steps` (a kill).

    The Trainer reads `prefetch` batches ahead: it asks for batch `steps + prefetch` when
    step `steps` is done (its checkpoint and evaluation too), and the wrapper dies there.
    """

    def wrap(batches):
        for _ in range(steps + prefetch - 1):
            yield next(batches)
        raise StopAfter()

    return wrap


def test_train_evaluate_resume_predict(data_root, tmp_path):
    assert jax.device_count() == 8
    config = tiny_config(data_root, **{"train.keep_best": True, "train.eval_every_epochs": 1})

    full = cli.run(config, str(tmp_path / "full"), "train")
    workdir = tmp_path / "full"
    # Promised files: eval report with every test image scored, plot, checkpoints, summaries.
    report = json.loads((workdir / "eval_6.json").read_text())
    assert report["num_images_scored"] == report["num_images_expected"] > 0
    assert len(report["per_class"]) == 20
    assert set(report["map_raw"]) == {"total", "head", "medium", "tail"}
    assert 0 < report["map_raw"]["total"] <= 100
    assert {"nc1", "nc2", "mean_angle"} <= set(report["neural_collapse_raw"])
    assert (workdir / "ap_vs_freq_6.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    # The last 2 checkpoints are kept, and (keep_best) the one of the best test mAP, in place.
    best = [
        json.loads((workdir / f"eval_{k}.json").read_text())["map_raw"]["total"] for k in (3, 6)
    ]
    best_step = (3, 6)[int(np.argmax(best))]
    kept = sorted(os.listdir(workdir / "checkpoints"), key=int)
    assert kept == sorted({"4", "6", str(best_step)}, key=int)
    assert checkpoint.Checkpointer(str(workdir), {}, keep_best=True).best_step() == best_step

    # A run killed after step 5 (last checkpoint at step 4) resumes to the same result.
    with pytest.raises(StopAfter):
        cli.run(config, str(tmp_path / "resumed"), "train", wrap_batches=stop_after(5))
    assert checkpoint.Checkpointer(str(tmp_path / "resumed"), {}).latest_step() == 4
    resumed = cli.run(config, str(tmp_path / "resumed"), "train")
    for name in ("raw", "ema"):
        want, got = getattr(full.final, name), getattr(resumed.final, name)
        for group, value in want.map.as_dict().items():
            np.testing.assert_allclose(got.map.as_dict()[group], value, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(got.ap, want.ap, atol=1e-6)

    # --mode=eval scores the latest checkpoint the same way.
    evaluated = cli.run(config, str(workdir), "eval")
    np.testing.assert_allclose(evaluated.final.raw.ap, full.final.raw.ap, atol=1e-6)

    # --mode=predict on image files, with attention maps.
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            images / f"img{i}.png"
        )
    config.predict.inputs = str(images)
    config.predict.attention_maps = True
    config.predict.threshold = 0.0  # every class passes: checks the ordering and the format
    out = json.loads(pathlib.Path(cli.run(config, str(workdir), "predict")).read_text())
    assert [os.path.basename(p["image"]) for p in out["predictions"]] == ["img0.png", "img1.png"]
    first = out["predictions"][0]
    assert len(first["classes"]) == 20
    scores = [c["score"] for c in first["classes"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert os.path.getsize(first["attention_map"]) > 1000


def step_losses(config, workdir, steps):
    run = experiment.build(config, str(workdir))
    placement = run.placement
    state = placement.place(run.initial_state())
    batches = run.batches(0)
    out = []
    for _ in range(steps):
        state, m = run.trainer.train_step(state, placement.shard(next(batches)))
        out.append(float(np.asarray(m["loss"]).reshape(-1)[0]))
    return out, placement.unplace(state)


def test_pmap_matches_jit(data_root, tmp_path):
    # With the attention dropout on: its masks are drawn per example, not per device.
    # At lr 1e-5: jit and pmap sum gradients in another order, and Adam turns that float32
    # rounding in near-zero gradient entries into steps of up to the learning rate (as
    # test_multihost.py explains); a dropout mask that depended on the split would still
    # change every loss far beyond the tolerance.
    config = tiny_config(
        data_root,
        **{
            "loss.warmup_epochs": 0,
            "train.steps_per_epoch": 2,
            "train.num_epochs": 3,  # the 5 steps compared, within the plan
            "train.learning_rate": 1e-5,
        },
    )
    assert config.model.attention_dropout > 0
    jit_losses, jit_state = step_losses(config, tmp_path / "jit", 5)
    config.parallel = "pmap"
    pmap_losses, pmap_state = step_losses(config, tmp_path / "pmap", 5)
    np.testing.assert_allclose(pmap_losses, jit_losses, atol=1e-5)
    # BatchNorm statistics are averaged over the devices under pmap: the same as over the
    # global batch. (Parameters are not compared leaf by leaf: some, like the attention's key
    # bias, have a zero gradient, and Adam turns float noise in those into full-size steps.)
    for a, b in zip(
        jax.tree.leaves(jit_state.batch_stats), jax.tree.leaves(pmap_state.batch_stats)
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    assert int(pmap_state.step) == int(jit_state.step) == 5
    assert jit_losses[-1] != jit_losses[0]


def poison_batch(n: int):
    """Wraps the training iterator so that its n-th batch carries a NaN pixel (as floats:
    the step takes floating images as normalised, and uint8 cannot hold a NaN)."""

    def wrap(batches):
        for i, batch in enumerate(batches, start=1):
            if i == n:
                image = batch["image"].astype(np.float32)
                image.reshape(-1)[0] = np.nan
                batch = {**batch, "image": image}
            yield batch

    return wrap


def test_nan_loss_stops_and_keeps_last_checkpoint(data_root, tmp_path):
    config = tiny_config(data_root, **{"train.checkpoint_every_steps": 1})
    with pytest.raises(FloatingPointError, match="step 4") as stopped:
        cli.run(config, str(tmp_path), "train", wrap_batches=poison_batch(4))
    assert checkpoint.Checkpointer(str(tmp_path), {}).latest_step() == 3
    # The message says how far back each kept checkpoint is, that its weights are sound,
    # and how to resume from it.
    message = str(stopped.value)
    assert "step 3 (1 steps back): finite, largest |weight|" in message
    assert "step 2 (2 steps back)" in message and "--restore_step=3" in message


def test_checkpoint_from_another_model_is_refused(data_root, tmp_path):
    config = tiny_config(data_root, **{"train.num_epochs": 1, "loss.warmup_epochs": 0})
    cli.run(config, str(tmp_path), "train")
    config.model.proj_dim = 8
    # Eval uses the workdir's saved config: the other proj_dim is refused as a contradiction
    # when given on the command line...
    with pytest.raises(ValueError, match="model.proj_dim=8, trained with 4"):
        cli.run(config, str(tmp_path), "eval", overrides=["model.proj_dim"])
    # ...and, without the saved config (a workdir of an older version), by the checkpoint.
    (tmp_path / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointMismatchError, match="proj_dim"):
        cli.run(config, str(tmp_path), "eval")
