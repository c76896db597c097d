"""Zero-shot CLIP (--mode=eval --config.model.zero_shot=True) on the fake VOC / COCO trees.

Random weights (a tiny CLIP-layout ViT and text tower), so the mAP means nothing; what is
checked is the path (class names -> text tower -> stored embeddings; weights -> image
embeddings; the same reports as a trained run) and the scores, against a numpy
reference: cosines of the image embeddings with the class text embeddings, each class's
AP by scikit-learn.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_clip_configs import TINY, _clip_file, _tiny, tiny_clip  # noqa: F401 (fixture)
from test_recipes import _tree

from configs import coco_lt_clip, voc_lt_clip
from mlcnc_jax import cli
from mlcnc_jax.data import pipeline, sources
from mlcnc_jax.models import clip, vit

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _zero_shot_config(module, name, tmp_path, weights):
    root, freq = _tree(tmp_path, name)
    config = _tiny(module.get_config(), root, weights)
    config.model.zero_shot = True
    return config, freq


def _reference(config, weights, text):
    # The test images in evaluation order, embedded by the ViT (itself proven against torch
    # in test_clip_convert.py), then the cosines and each class's AP in numpy / scikit-learn.
    dataset = sources.load_dataset(config)
    backbone = vit.ViT(**TINY)
    params = clip.load_clip_params(str(weights), backbone)
    embed = jax.jit(lambda p, x: backbone.apply({"params": p}, x, pooled=True))
    images, labels = [], []
    for batch in pipeline.eval_batches(dataset.test, config, global_batch=16):
        keep = batch["mask"].astype(bool)
        pixels = pipeline.normalize_pixels(batch["image"], config.data.mean, config.data.std)
        images.append(np.asarray(embed(params, pixels))[keep])
        labels.append(batch["labels"][keep])
    image, labels = np.concatenate(images).astype(np.float64), np.concatenate(labels)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    cos = image @ t.T
    ap = [
        100 * sklearn_metrics.average_precision_score(labels[:, k], cos[:, k])
        if labels[:, k].any()
        else np.nan
        for k in range(labels.shape[1])
    ]
    return cos, np.asarray(ap), dataset


@pytest.mark.parametrize(
    "module,name,test_images", [(voc_lt_clip, "voc_lt", 6), (coco_lt_clip, "coco_lt", 5)]
)
@pytest.mark.usefixtures("tiny_clip")
def test_zero_shot_scores_cosines_from_class_names_alone(module, name, test_images, tmp_path):
    weights = tmp_path / "clip.safetensors"  # the whole CLIP: image and text towers
    _clip_file(weights, seed=3)
    config, freq = _zero_shot_config(module, name, tmp_path, weights)
    work = tmp_path / "zero_shot"
    results = cli.run(config, str(work), "eval")
    assert results.final.step == 0 and results.final.num_images_scored == test_images
    # The class names went through the text tower; the stored array is the classifier.
    text = np.load(work / "class_text_embeddings.npy")
    assert text.shape == (len(freq), TINY["output_dim"])
    cos, ap, dataset = _reference(config, weights, text)
    report = json.loads((work / "eval_0.json").read_text())
    got_ap = np.array([np.nan if c["ap_raw"] is None else c["ap_raw"] for c in report["per_class"]])
    np.testing.assert_allclose(100 * got_ap, ap, atol=1e-3)  # per class as a fraction
    assert report["map_raw"]["total"] == pytest.approx(np.nanmean(ap), abs=1e-3)
    for group in ("head", "medium", "tail"):
        idx = dataset.class_split[group]
        want = np.nanmean(ap[idx]) if idx and np.isfinite(ap[idx]).any() else None
        assert report["map_raw"][group] == (want if want is None else pytest.approx(want, abs=1e-3))
    assert report["map_ema"] == report["map_raw"]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["final"]["map_raw"]["total"] == pytest.approx(np.nanmean(ap), abs=1e-3)
    # The scores themselves: the evaluator's sigmoid of the cosines.
    from mlcnc_jax import zero_shot
    from mlcnc_jax.evaluation import Evaluator
    from mlcnc_jax.parallel import make_mesh

    evaluator = Evaluator(
        zero_shot.ZeroShotCLIP(vit.ViT(**TINY)),
        lambda: pipeline.eval_batches(dataset.test, config, global_batch=16),
        num_images=len(dataset.test),
        class_split=dataset.class_split,
        mesh=make_mesh(),
        image_norm=(tuple(config.data.mean), tuple(config.data.std)),
    )
    variables = {
        "params": {"backbone": clip.load_clip_params(str(weights), vit.ViT(**TINY))},
        "zero_shot": {"text": text},
    }
    scores = evaluator.predict_scores({"raw": variables})["raw"][0]
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-cos)), atol=1e-5)


@pytest.mark.usefixtures("tiny_clip")
def test_zero_shot_stops_before_the_data_without_weights_or_clip(tmp_path):
    config = voc_lt_clip.get_config()
    config.model.zero_shot = True
    config.data.root = str(tmp_path / "no_data")
    missing = tmp_path / "weights" / "clip_vit_b16_openai.safetensors"
    config.model.pretrained = str(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        cli.run(config, str(tmp_path / "work"), "eval")
    config.model.backbone, config.train.layer_decay = "vit_cpu", 1.0  # a ViT, not CLIP's
    with pytest.raises(ValueError, match="needs a CLIP backbone"):
        cli.run(config, str(tmp_path / "work"), "eval")
    with pytest.raises(ValueError, match="use it with --mode=eval"):
        cli.run(config, str(tmp_path / "work"), "train")
