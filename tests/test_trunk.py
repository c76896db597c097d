"""The built-in pre-trained trunk: it ships, loads into the backbone, and knows its classes."""

import hashlib
import json

import jax
import numpy as np
import pytest

from configs import default, pretrain
from mlcnc_jax import metrics, trunks
from mlcnc_jax.data import pipeline, synthetic_labels, synthetic_render
from mlcnc_jax.models import create_model, pretrained

# Every 4th image of the balanced 1,200-image 'pretrain' test split: all 20 classes.
_SLICE = range(0, 20 * synthetic_labels.PRETRAIN_TEST_PER_CLASS, 4)


def _metadata() -> dict:
    trunk = pretrained.read_trunk(trunks.SYNTHETIC_PRETRAIN)
    assert trunk is not None, f"{trunks.SYNTHETIC_PRETRAIN} is not a trunk file"
    return trunk[1]


def test_shipped_trunk_is_the_recorded_file():
    with open(trunks.SYNTHETIC_PRETRAIN, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == trunks.SYNTHETIC_PRETRAIN_SHA256
    meta = _metadata()
    config = pretrain.get_config()
    assert meta["backbone"] == config.model.backbone == default.get_config().model.backbone
    assert json.loads(meta["class_names"]) == list(synthetic_labels.CLASS_SETS["pretrain"])
    # Pre-trained on other classes than the benchmark's: never a target class.
    assert not set(json.loads(meta["class_names"])) & set(synthetic_labels.CLASS_SETS["target"])


def test_default_config_fine_tunes_from_the_shipped_trunk():
    assert default.get_config().model.pretrained == trunks.SYNTHETIC_PRETRAIN


def test_trunk_loads_into_the_backbone_and_scores_on_its_own_test_classes():
    config = pretrain.get_config()
    size = config.data.image_size
    model = create_model(config, num_classes=20)
    variables = model.init(jax.random.PRNGKey(1), np.zeros((1, size, size, 3)), train=False)
    loaded = pretrained.load_pretrained_backbone(trunks.SYNTHETIC_PRETRAIN, variables)
    saved, _ = pretrained.read_trunk(trunks.SYNTHETIC_PRETRAIN)
    for collection in ("params", "batch_stats"):
        for a, b in zip(
            jax.tree.leaves(loaded[collection]["backbone"]),
            jax.tree.leaves(saved[collection]["backbone"]),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), b)
    # The head is not the backbone's: it keeps its fresh initialisation.
    np.testing.assert_array_equal(
        np.asarray(loaded["params"]["classifier"]["kernel"]),
        np.asarray(variables["params"]["classifier"]["kernel"]),
    )

    rendered = list(
        synthetic_render.generate("pretrain", size, config.data.synthetic_seed, "test", _SLICE)
    )
    images = np.stack([pipeline.preprocess_for_eval(png, config) for _, png, _ in rendered])
    labels = np.stack([row for _, _, row in rendered])
    assert labels.sum(0).min() >= 10  # every class is in the slice
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])(saved, images)
    score = 100 * float(np.mean(metrics.average_precision(np.asarray(logits), labels)))
    assert score >= 95.0, f"trunk scores {score:.1f} mAP on its own test classes"


def test_trunk_round_trip_and_foreign_files(tmp_path):
    variables = {
        "params": {"backbone": {"conv1": {"kernel": np.ones((3, 3, 3, 4), np.float32)}}},
        "batch_stats": {"backbone": {"bn1": {"mean": np.arange(4, dtype=np.float32)}}},
    }
    path = str(tmp_path / "t.safetensors")
    pretrained.save_trunk(path, variables, {"backbone": "tiny"})
    tree, meta = pretrained.read_trunk(path)
    assert meta["backbone"] == "tiny" and meta["format"] == pretrained.TRUNK_FORMAT
    np.testing.assert_array_equal(tree["batch_stats"]["backbone"]["bn1"]["mean"], np.arange(4))
    # A torchvision-style safetensors file is not a trunk: the torchvision converter reads it.
    from safetensors.numpy import save_file

    other = str(tmp_path / "tv.safetensors")
    save_file({"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, other)
    assert pretrained.read_trunk(other) is None


def test_trunk_of_another_backbone_is_refused(tmp_path):
    config = default.get_config()
    config.model.name = "baseline"
    config.model.backbone = "resnet18"
    model = create_model(config, num_classes=3)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False)
    )
    with pytest.raises(ValueError, match="do not fit the configured backbone"):
        pretrained.load_pretrained_backbone(trunks.SYNTHETIC_PRETRAIN, variables)
