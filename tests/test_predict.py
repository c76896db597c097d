"""Prediction from a checkpoint's weights alone, at the default threshold 0.5."""

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from mlcnc_jax import checkpoint, optim, predict
from mlcnc_jax.data import pipeline
from mlcnc_jax.models import create_model
from mlcnc_jax.state import initial_train_state

NAMES = ["cat", "dog", "car", "tree", "boat"]


def _saved_model(tmp_path, step=3):
    """A workdir whose checkpoint holds a freshly initialised tiny model.

    Returns:
      (workdir, config, model, state).
    """
    c = default.get_config()
    c.model.embed_dim, c.model.proj_dim, c.model.num_heads = 16, 4, 2
    c.model.logit_scale_init = 16.0  # scores spread on both sides of 0.5
    model = create_model(c, len(NAMES))
    tx, _ = optim.create_optimizer(c, total_steps=10)
    state = initial_train_state(c, model, tx, len(NAMES))
    workdir = str(tmp_path / "run")
    checkpoint.Checkpointer(
        workdir, checkpoint.model_fingerprint(c, NAMES), asynchronous=False
    ).save(step, state)
    return workdir, c, model, state


def _trained_workdir(tmp_path, step=3):
    """A workdir whose checkpoint holds a freshly initialised tiny model; (workdir, config)."""
    return _saved_model(tmp_path, step)[:2]


def test_predict_lists_the_classes_at_or_above_the_threshold(tmp_path):
    workdir, c, model, state = _saved_model(tmp_path, step=7)

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            images / f"img{i}.png"
        )
    c.predict.inputs = str(images)
    assert c.predict.threshold == 0.5
    out = json.loads(pathlib.Path(predict.predict(c, workdir)).read_text())
    assert out["step"] == 7 and out["threshold"] == 0.5

    below = above = 0
    for entry in out["predictions"]:
        # The scores are the model's on the saved weights...
        x = pipeline.preprocess_for_eval(pathlib.Path(entry["image"]).read_bytes(), c)
        logits = model.apply(state.variables(), x[None], train=False)["logits"][0]
        want = np.asarray(jax.nn.sigmoid(logits))
        np.testing.assert_allclose([entry["scores"][n] for n in NAMES], want, atol=1e-5)
        # ...and the listed classes are exactly those at or above 0.5, best first.
        chosen = sorted((n for n in NAMES if entry["scores"][n] >= 0.5), key=entry["scores"].get)
        assert [x["name"] for x in entry["classes"]] == chosen[::-1]
        above += len(chosen)
        below += len(NAMES) - len(chosen)
    assert above and below  # both sides of the threshold occur


def test_outputs_never_collide_and_unreadable_files_are_skipped(tmp_path):
    workdir, c, _, _ = _saved_model(tmp_path, step=3)

    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "one.png")
    Image.fromarray(pixels).save(images / "one.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    c.predict.inputs = str(images)
    c.predict.attention_maps = True
    with pytest.raises(predict.UnreadableImagesError, match=r"(?s)1 of 3 image\(s\).*broken\.jpg"):
        predict.predict(c, workdir)
    out = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert [pathlib.Path(p["image"]).name for p in out["predictions"]] == ["one.jpg", "one.png"]
    assert [pathlib.Path(f["image"]).name for f in out["failed"]] == ["broken.jpg"]
    maps = sorted(pathlib.Path(p["attention_map"]).name for p in out["predictions"])
    assert maps == ["one_jpg.png", "one_png.png"]
    assert all(pathlib.Path(p["attention_map"]).stat().st_size > 1000 for p in out["predictions"])


def test_batched_predict_equals_image_by_image(tmp_path, capsys):
    workdir, c = _trained_workdir(tmp_path)
    restored = checkpoint.Checkpointer(workdir, checkpoint.model_fingerprint(c, NAMES))
    variables = {k: v for k, v in restored.restore_variables().items() if v}
    model = create_model(c, len(NAMES))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    for i in range(5):  # batches of 2: two full ones and one padded
        size = (40 + 8 * i, 48, 3)
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(images / f"{i}.png")
    c.predict.inputs = str(images)
    c.predict.attention_maps = True
    c.eval.batch_size = 2
    out = json.loads(pathlib.Path(predict.predict(c, workdir)).read_text())
    assert [pathlib.Path(p["image"]).name for p in out["predictions"]] == [
        f"{i}.png" for i in range(5)
    ]
    for entry in out["predictions"]:
        # Image by image, outside predict: the model on one image alone.
        x = pipeline.preprocess_for_eval(pathlib.Path(entry["image"]).read_bytes(), c)
        alone = model.apply(variables, x[None], train=False)
        want = np.asarray(jax.nn.sigmoid(alone["logits"][0]))
        np.testing.assert_allclose([entry["scores"][n] for n in NAMES], want, atol=1e-5)
        assert pathlib.Path(entry["attention_map"]).stat().st_size > 1000
    # The console says how many, the top classes, and where everything went.
    printed = capsys.readouterr().out
    assert "Predicted 5 image(s) with the checkpoint of step 3" in printed
    assert "  0.png: " in printed and "Predictions written to " in printed
    assert "Attention maps in " in printed
