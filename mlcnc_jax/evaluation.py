"""Scoring a split: mAP (total / head / medium / tail), per-class AP, neural-collapse measures.

Writes nothing: the reports (reports.py) and the console take the results.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from mlcnc_jax import metrics, parallel
from mlcnc_jax.state import TrainState
from mlcnc_jax.step import eval_step


class Evaluator:
    """Scores the raw and the EMA weights of a state on one split, in one pass over it.

    Args:
      model: the model (built without a pmap axis).
      batches: returns a fresh pass over the split in padded batches
        ({'image', 'labels', 'mask'}, e.g. `pipeline.eval_batches` or
        `arrays.eval_batches`).
      num_images: how many images the split has (every one must be scored once).
      class_split: {'head', 'medium', 'tail'} class index lists.
      mesh: the device mesh.
      progress: show a progress bar per pass.
      image_norm: (mean, std) of uint8 images (`step.normalize_images`).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Callable[[], Iterator[dict]],
        *,
        num_images: int,
        class_split: dict[str, list[int]],
        mesh: jax.sharding.Mesh,
        progress: bool = False,
        image_norm: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        self.progress = progress
        self.batches = batches
        self.num_images = num_images
        self.class_split = class_split
        self.mesh = mesh
        norm = None if image_norm is None else tuple(map(tuple, image_norm))
        one = functools.partial(eval_step, model=model, image_norm=norm)
        # Every weight set scores the same batch: the split is read and sent once.
        self._eval_step = jax.jit(
            lambda weights, images: {name: one(v, images) for name, v in weights.items()}
        )

    def predict_scores(
        self, weights: dict[str, dict], desc: str = "eval"
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Scores every image of the split exactly once with each set of weights.

        Args:
          weights: {name: the model's variables}, e.g. {'raw': ..., 'ema': ...}.
          desc: the progress bar's label.

        Returns:
          {name: (scores [N,K], labels [N,K], pair features [M,D], pair labels [M,K])}:
          the features of each positive (image, class) pair (or of each image and its
          labels, for the baseline) for the neural-collapse measures.
        """
        weights = parallel.replicate(weights, self.mesh)
        parts: dict[str, list] = {name: [] for name in weights}
        batches = self.batches()
        if self.progress:
            from mlcnc_jax import console

            batches = console.progress(batches, desc)
        previous = None
        for batch in batches:
            arrays = parallel.to_global(dict(batch), self.mesh)
            out = self._eval_step(weights, arrays["image"])
            # The previous batch reaches the host while this one is computed.
            if previous is not None:
                self._collect(parts, *previous)
            previous = (out, arrays)
        if previous is not None:
            self._collect(parts, *previous)
        return {
            name: tuple(np.concatenate(p) for p in zip(*chunks)) for name, chunks in parts.items()
        }

    @staticmethod
    def _collect(parts: dict[str, list], out: dict, arrays: dict) -> None:
        mask = parallel.to_host(arrays["mask"]).astype(bool)
        y = parallel.to_host(arrays["labels"])[mask]
        for name, result in out.items():
            s = parallel.to_host(result["scores"])[mask]
            f = parallel.to_host(result["features"])[mask].astype(np.float32)
            if f.ndim == 3:  # per (image, class): keep the positive pairs
                b, c = np.nonzero(y)
                f, fy = f[b, c], np.eye(y.shape[1], dtype=np.float32)[c]
            else:
                fy = y
            parts[name].append((s, y, f, fy))

    def score(self, weights: dict[str, dict], step: int, desc: str = "eval") -> dict[str, Any]:
        """mAP by group, per-class AP and the NC measures of each set of weights.

        Args:
          weights: {name: the model's variables}, e.g. {'raw': ..., 'ema': ...}.
          step: the step the weights are of (recorded in the results).
          desc: the progress bar's label.

        Returns:
          {'step', name: {'map', 'ap', 'neural_collapse'} for each name,
          'num_images_scored', 'num_images_expected', 'seconds'}.
        """
        t0 = time.time()
        results: dict[str, Any] = {"step": int(step)}
        for name, (scores, labels, feats, feat_labels) in self.predict_scores(
            weights, desc
        ).items():
            if len(scores) != self.num_images:
                raise RuntimeError(f"Scored {len(scores)} test images, expected {self.num_images}.")
            results[name] = {
                "map": metrics.lt_map(scores, labels, self.class_split),
                "ap": metrics.average_precision(scores, labels),
                "neural_collapse": metrics.neural_collapse(feats, feat_labels),
            }
        results["num_images_scored"] = int(len(scores))
        results["num_images_expected"] = int(self.num_images)
        results["seconds"] = time.time() - t0
        return results

    def __call__(self, state: TrainState) -> dict[str, Any]:
        """The raw and the EMA weights of `state`, scored in one pass (see `score`)."""
        return self.score({"raw": state.variables(), "ema": state.ema_variables()}, int(state.step))
