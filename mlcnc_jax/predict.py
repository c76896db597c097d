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
from mlcnc_jax.errors import UserError
from mlcnc_jax.models import create_model, get_family

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
        raise UserError("Nothing to predict: set --config.predict.inputs=IMAGE_OR_FOLDER[,...].")
    return paths


class UnreadableImagesError(UserError, RuntimeError):
    """Some inputs could not be read; the predictions of the others were written."""


def _free_output_names(workdir: str) -> tuple[str, str]:
    """`predictions.json` and `attention/`, or the first free `predictions_<n>.json` and
    `attention_<n>/`: each predict keeps what earlier ones wrote."""
    from etils import epath

    n = 1
    while True:
        tail = "" if n == 1 else f"_{n}"
        json_path = storage.join(workdir, f"predictions{tail}.json")
        attention_dir = storage.join(workdir, f"attention{tail}")
        if not epath.Path(json_path).exists() and not epath.Path(attention_dir).exists():
            return json_path, attention_dir
        n += 1


def predict(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes `<workdir>/predictions.json` (and attention maps when configured).

    Uses the latest checkpoint of `workdir` (raw weights) and the class names
    stored with it, so the dataset itself is not needed. The images go through the model
    in batches of up to `config.eval.batch_size` (the last one padded, so that the model
    compiles once). Attention maps are named so that no two inputs share one (`one.png`
    and `one.jpg` give `one_png.png` and `one_jpg.png`). An image that cannot be read is
    skipped and listed under 'failed' in the JSON. Earlier results are kept: when
    `predictions.json` (or `attention/`) exists, this run writes `predictions_2.json` and
    `attention_2/` (and so on).

    Returns:
      The path of the JSON file.

    Raises:
      UnreadableImagesError: after writing the JSON, when any input could not be read
        (naming each).
    """
    from mlcnc_jax import console, output_naming
    from mlcnc_jax.data import pipeline

    workdir = storage.resolve(workdir)
    paths = list_inputs(config.predict.inputs)
    family = get_family(config.model.name)
    if config.predict.attention_maps and not family.has_attention_maps:
        raise UserError("Attention maps need the MLC-NC model (config.model.name='mlcnc').")
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
        if config.predict.attention_maps:  # the family has them (checked above)
            result["attention"] = out["attention"]
        return result

    read, failed = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                encoded = f.read()
            read.append((path, pipeline.preprocess_for_eval(encoded, config)))
        except Exception as e:  # noqa: BLE001 - any read or decode error means the same here
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            logging.warning("Skipping %s: cannot read it as an image (%s)", path, reason)
            failed.append({"image": path, "error": f"{type(e).__name__}: {reason}"})

    out_path, attention_dir = _free_output_names(workdir)
    map_names = output_naming.output_names(paths) if config.predict.attention_maps else {}
    predictions = []
    # One compiled call per batch of a fixed size (the last batch padded with zeros).
    batch_size = max(1, min(int(config.eval.batch_size), len(read)))
    for first in range(0, len(read), batch_size):
        chunk = read[first : first + batch_size]
        images = np.stack([image for _, image in chunk])
        padded = np.zeros((batch_size, *images.shape[1:]), images.dtype)
        padded[: len(chunk)] = images
        out = jax.device_get(forward(padded))
        for row, (path, image) in enumerate(chunk):
            scores = out["scores"][row]
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
                map_path = storage.join(attention_dir, map_names[path])
                save_attention_map(
                    map_path, image, out["attention"][row], shown, class_names, scores, config
                )
                entry["attention_map"] = map_path
            predictions.append(entry)
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
    console.say(describe_predictions(predictions, config.predict.threshold, meta["step"]))
    console.say(f"Predictions written to {out_path}")
    if config.predict.attention_maps and predictions:
        console.say(f"Attention maps in {attention_dir}")
    if failed:
        raise UnreadableImagesError(
            f"{len(failed)} of {len(paths)} image(s) could not be read and were skipped "
            f"(listed under 'failed' in {out_path}; the others' predictions are there):\n"
            + "\n".join(f"  {f['image']}: {f['error']}" for f in failed)
        )
    return out_path


def describe_predictions(
    predictions: list[dict], threshold: float, step: int, shown: int = 5, top: int = 3
) -> str:
    """What a person sees of a predict run: the count, then the top classes of the first few.

    Args:
      predictions: the 'predictions' entries of the JSON.
      threshold: the score a class needs to be listed.
      step: the checkpoint's step.
      shown: how many images are listed.
      top: how many classes per image.

    Returns:
      Lines such as 'a.jpg: cat 0.91, dog 0.62' (classes at or above the threshold, else
      the best one in brackets).
    """
    import os

    lines = [
        f"Predicted {len(predictions)} image(s) with the checkpoint of step {step} "
        f"(classes scoring >= {threshold:g}):"
    ]
    for entry in predictions[:shown]:
        listed = entry["classes"][:top]
        if listed:
            text = ", ".join(f"{c['name']} {c['score']:.2f}" for c in listed)
            if len(entry["classes"]) > top:
                text += f" (+{len(entry['classes']) - top} more)"
        else:
            best = max(entry["scores"], key=entry["scores"].get)
            text = f"none (best: {best} {entry['scores'][best]:.2f})"
        lines.append(f"  {os.path.basename(entry['image'])}: {text}")
    if len(predictions) > shown:
        lines.append(f"  ... and {len(predictions) - shown} more")
    return "\n".join(lines)


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
