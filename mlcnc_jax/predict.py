"""Predicting the classes of the user's own images with a trained checkpoint."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mlcnc_jax import checkpoint, storage
from mlcnc_jax.models import create_model

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def list_inputs(inputs: str) -> list[str]:
    """Image paths from a comma-separated list of files and folders."""
    paths = []
    for item in [s.strip() for s in inputs.split(",") if s.strip()]:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise FileNotFoundError(
                    f"The folder {item} holds no image files ({', '.join(IMAGE_EXTENSIONS)})."
                )
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(
                f"No such image file or folder: {item} (from --config.predict.inputs)."
            )
    if not paths:
        raise ValueError("Nothing to predict: set --config.predict.inputs=IMAGE_OR_FOLDER[,...].")
    return paths


class UnreadableImagesError(RuntimeError):
    """Some inputs could not be read; the predictions of the others were written."""


def predict(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes `<workdir>/predictions.json` (and attention maps when configured).

    Uses the latest checkpoint of `workdir` (raw weights) and the class names
    stored with it, so the dataset itself is not needed. Attention maps are named
    so that no two inputs share one (`one.png` and `one.jpg` give `one_png.png`
    and `one_jpg.png`). An image that cannot be read is skipped and listed under
    'failed' in the JSON.

    Returns:
      The path of the JSON file.

    Raises:
      UnreadableImagesError: after writing the JSON, when any input could not be read
        (naming each).
    """
    from mlcnc_jax import output_naming
    from mlcnc_jax.data import pipeline

    workdir = storage.resolve(workdir)
    paths = list_inputs(config.predict.inputs)
    meta = checkpoint.Checkpointer(workdir, {}).read_meta()
    class_names = meta["model"]["class_names"]
    num_classes = len(class_names)

    model = create_model(config, num_classes)
    checkpointer = checkpoint.Checkpointer(
        workdir, checkpoint.model_fingerprint(config, class_names)
    )
    variables = {k: v for k, v in checkpointer.restore_variables().items() if v}

    @jax.jit
    def forward(images):
        out = model.apply(variables, images, train=False)
        result = {"scores": jax.nn.sigmoid(out["logits"].astype(jnp.float32))}
        if "attention" in out:
            result["attention"] = out["attention"]
        return result

    predictions, failed = [], []
    attention_dir = storage.join(workdir, "attention")
    map_names = output_naming.output_names(paths) if config.predict.attention_maps else {}
    if config.predict.attention_maps and config.model.name != "mlcnc":
        raise ValueError("Attention maps need the MLC-NC model (config.model.name='mlcnc').")
    for path in paths:
        try:
            with open(path, "rb") as f:
                encoded = f.read()
            image = pipeline.preprocess_for_eval(encoded, config)
        except Exception as e:  # noqa: BLE001 - any read or decode error means the same here
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            logging.warning("Skipping %s: cannot read it as an image (%s)", path, reason)
            failed.append({"image": path, "error": f"{type(e).__name__}: {reason}"})
            continue
        out = jax.device_get(forward(image[None]))
        scores = out["scores"][0]
        order = np.argsort(-scores)
        chosen = [int(i) for i in order if scores[i] >= config.predict.threshold]
        entry = {
            "image": path,
            "classes": [{"name": class_names[i], "score": float(scores[i])} for i in chosen],
            "scores": {class_names[i]: float(scores[i]) for i in range(num_classes)},
        }
        if config.predict.attention_maps:
            shown = chosen or [int(order[0])]
            storage.makedirs(attention_dir)
            out_path = storage.join(attention_dir, map_names[path])
            save_attention_map(
                out_path, image, out["attention"][0], shown, class_names, scores, config
            )
            entry["attention_map"] = out_path
        predictions.append(entry)
    out_path = storage.join(workdir, "predictions.json")
    storage.write_text(
        out_path,
        json.dumps(
            {
                "threshold": config.predict.threshold,
                "step": meta["step"],
                "predictions": predictions,
                "failed": failed,
            },
            indent=1,
        ),
    )
    logging.info("Wrote predictions for %d image(s) to %s", len(predictions), out_path)
    if failed:
        raise UnreadableImagesError(
            f"{len(failed)} of {len(paths)} image(s) could not be read and were skipped "
            f"(listed under 'failed' in {out_path}; the others' predictions are there):\n"
            + "\n".join(f"  {f['image']}: {f['error']}" for f in failed)
        )
    return out_path


def save_attention_map(
    path: str,
    image: np.ndarray,
    attention: np.ndarray,
    classes: list[int],
    class_names: list[str],
    scores: np.ndarray,
    config: ml_collections.ConfigDict,
) -> None:
    """Saves the image beside one heat map per class of where that class's query attended.

    Args:
      path: PNG to write.
      image: [H, W, 3] normalised model input.
      attention: [K, N] attention weights over the N = h*w backbone tokens.
      classes: class indices to show.
      class_names: all class names.
      scores: [K] sigmoid scores.
      config: the config (for the normalisation constants).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = np.clip(image * np.asarray(config.data.std) + np.asarray(config.data.mean), 0, 1)
    n = attention.shape[-1]
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise ValueError(f"Cannot lay {n} attention tokens out as a square grid.")
    fig, axes = plt.subplots(1, len(classes) + 1, figsize=(3 * (len(classes) + 1), 3.2))
    axes[0].imshow(rgb)
    axes[0].set_title("input", fontsize=9)
    for ax, c in zip(axes[1:], classes):
        heat = np.asarray(attention[c], np.float32).reshape(side, side)
        ax.imshow(rgb)
        ax.imshow(
            heat,
            cmap="jet",
            alpha=0.5,
            extent=(0, rgb.shape[1], rgb.shape[0], 0),
            interpolation="bilinear",
        )
        ax.set_title(f"{class_names[c]} ({scores[c]:.2f})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=100)
    plt.close(fig)
