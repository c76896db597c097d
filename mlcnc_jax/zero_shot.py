"""Zero-shot CLIP: the test split scored by image-text cosine, with no training.

`--mode=eval --config.model.zero_shot=True` with a CLIP backbone (configs/voc_lt_clip.py,
configs/coco_lt_clip.py) in a fresh workdir: each test image's embedding (the class
token after `ln_post`, times `proj`: `ViT(..., pooled=True)`) is compared by cosine with
each class's text embedding (the class names in config.model.class_prompts through CLIP's
text tower, or config.model.text_embeddings). CLIP's softmax over classes is for
single-label data; a multi-label image can hold several classes, so each class is scored
on its own, by its cosine. The evaluator turns the score into a sigmoid of it; AP and mAP
depend only on each class's ranking of the images, which a monotone map keeps.

The report is a trained run's: eval_0.json (mAP total / head / medium / tail, per-class
AP, the neural-collapse measures of the image embeddings), the AP-against-frequency
plot, and summary.json, written by the same functions (evaluation.py, reports.py). The
raw and the EMA entries are the same weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mlcnc_jax import console, parallel, reports, storage
from mlcnc_jax.evaluation import Evaluator
from mlcnc_jax.models import clip, make_backbone, text_classifier, vit
from mlcnc_jax.results import RunResult


class ZeroShotCLIP(nn.Module):
    """Per-class cosine of CLIP's image embedding with the class text embeddings.

    The text embeddings [K, D] are the variable ('zero_shot', 'text'), given at apply.

    Attributes:
        backbone: a CLIP `ViT` with `output_dim` (its joint image-text space).
    """

    backbone: nn.Module

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """{'logits': cosines [B, K], 'features': unit image embeddings [B, D]}."""
        image = self.backbone(images, train, pooled=True).astype(jnp.float32)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = self.variable("zero_shot", "text", lambda: jnp.zeros((1, image.shape[-1]))).value
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        return {"logits": image @ text.T, "features": image}


def clip_backbone(config: ml_collections.ConfigDict) -> vit.ViT:
    """The configured backbone, which must be a CLIP ViT with a projection.

    Raises:
        ValueError: for any other backbone.
    """
    backbone = make_backbone(config.model.backbone)
    if not (
        isinstance(backbone, vit.ViT)
        and backbone.ln_pre
        and not backbone.patch_bias
        and backbone.output_dim
    ):
        raise ValueError(
            f"config.model.zero_shot needs a CLIP backbone (an image encoder with CLIP's "
            f"image-text projection, e.g. clip_vit_b16); config.model.backbone is "
            f"{config.model.backbone!r}. Use configs/voc_lt_clip.py or configs/coco_lt_clip.py."
        )
    return backbone


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Scores the test split zero-shot and writes the reports of a trained run's evaluation.

    Args:
        config: a CLIP config (model.pretrained: the CLIP file; class_prompts or
            text_embeddings for the classes).
        workdir: where eval_0.json, its plot, summary.json and the class text embeddings go.

    Returns:
        The run's result: the evaluation of step 0 (CLIP's weights as both raw and EMA).

    Raises:
        FileNotFoundError: missing weights (before any data is read).
        ValueError: a backbone that is not a CLIP ViT, or no class text at all.
    """
    from mlcnc_jax import backbone_weights  # noqa: PLC0415
    from mlcnc_jax.data import pipeline, sources  # noqa: PLC0415

    workdir = storage.resolve(workdir)
    backbone = clip_backbone(config)
    weights = backbone_weights.pretrained_path(config)
    if not weights:
        raise FileNotFoundError(
            "config.model.zero_shot scores with CLIP's own weights: set config.model.pretrained "
            "to the CLIP file (pretrained=none leaves nothing to score with)."
        )
    backbone_weights.check_pretrained_path(config)  # before the data is read
    text_classifier.check_text_weights(config)
    if (
        not text_classifier.needs_class_names(config)
        and not str(config.model.text_embeddings).strip()
    ):
        raise ValueError(
            "config.model.zero_shot needs the classes' text: config.model.class_prompts (e.g. "
            "\"('a photo of a {}.',)\") or config.model.text_embeddings=FILE.npy."
        )
    is_main = jax.process_index() == 0
    if is_main:
        storage.makedirs(workdir)
    dataset = sources.load_dataset(config)
    config = text_classifier.prepare_class_text(config, dataset.class_names, workdir)
    text = text_classifier.load_text_embeddings(
        config.model.text_embeddings,
        dataset.num_classes,
        dataset=config.data.name,
        joint_dim=backbone.output_dim,
    )
    variables = {
        "params": {"backbone": clip.load_clip_params(weights, backbone)},
        "zero_shot": {"text": jnp.asarray(text)},
    }
    placement = parallel.Placement(config.parallel)
    evaluator = Evaluator(
        ZeroShotCLIP(backbone),
        lambda: pipeline.eval_batches(dataset.test, config, global_batch=config.eval.batch_size),
        num_images=len(dataset.test),
        class_split=dataset.class_split,
        mesh=placement.mesh,
        progress=is_main,
        image_norm=(tuple(config.data.mean), tuple(config.data.std)),
    )
    if is_main:
        console.say(
            f"Zero-shot {config.model.backbone} from {weights} on {dataset.name}: "
            f"{dataset.num_classes} classes, {len(dataset.test)} test images"
        )
    # No training: the raw and the EMA weights are CLIP's.
    results = evaluator.evaluate(variables, None, step=0, desc="zero-shot")
    summary = None
    if is_main:
        reports.write_eval_report(
            workdir,
            results,
            class_names=dataset.class_names,
            class_freq=dataset.class_freq,
            class_split=dataset.class_split,
            dataset=dataset.name,
        )
        summary = reports.write_run_summary(workdir, total_steps=0)
        console.say(f"zero-shot mAP {results.raw.map.total:.2f}")
    return RunResult.from_summary(results, summary)
