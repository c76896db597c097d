"""Scoring a split: mAP (total / head / medium / tail), per-class AP, neural-collapse measures.

Writes nothing: the reports (reports.py) and the console take the results.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from mlcnc_jax import metrics, parallel
from mlcnc_jax.state import TrainState
from mlcnc_jax.step import eval_step


class Evaluator:
    """Scores the raw and the EMA weights of a state on one split.

    Args:
      model: the model (built without a pmap axis).
      batches: returns a fresh pass over the split in padded batches
        ({'image', 'labels', 'mask'}, e.g. `pipeline.eval_batches` or
        `arrays.eval_batches`).
      num_images: how many images the split has (every one must be scored once).
      class_split: {'head', 'medium', 'tail'} class index lists.
      mesh: the device mesh.
      progress: show a progress bar per pass.
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
    ):
        self.progress = progress
        self.batches = batches
        self.num_images = num_images
        self.class_split = class_split
        self.mesh = mesh
        self._eval_step = jax.jit(functools.partial(eval_step, model=model))

    def predict_scores(
        self, variables: dict, desc: str = "eval"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scores every image of the split exactly once.

        Returns:
          (scores [N,K], labels [N,K], pair features [M,D], pair labels [M,K]):
          the features of each positive (image, class) pair (or of each image
          and its labels, for the baseline) for the neural-collapse measures.
        """
        variables = parallel.replicate(variables, self.mesh)
        scores, labels, feats, feat_labels = [], [], [], []
        batches = self.batches()
        if self.progress:
            from mlcnc_jax import console

            batches = console.progress(batches, desc)
        for batch in batches:
            out = self._eval_step(
                variables, parallel.to_global({"image": batch["image"]}, self.mesh)["image"]
            )
            arrays = parallel.to_global(
                {"labels": batch["labels"], "mask": batch["mask"]}, self.mesh
            )
            mask = parallel.to_host(arrays["mask"]).astype(bool)
            y = parallel.to_host(arrays["labels"])[mask]
            s = parallel.to_host(out["scores"])[mask]
            f = parallel.to_host(out["features"])[mask].astype(np.float32)
            scores.append(s)
            labels.append(y)
            if f.ndim == 3:  # per (image, class): keep the positive pairs
                b, c = np.nonzero(y)
                feats.append(f[b, c])
                feat_labels.append(np.eye(y.shape[1], dtype=np.float32)[c])
            else:
                feats.append(f)
                feat_labels.append(y)
        return (
            np.concatenate(scores),
            np.concatenate(labels),
            np.concatenate(feats),
            np.concatenate(feat_labels),
        )

    def __call__(self, state: TrainState) -> dict[str, Any]:
        """mAP by group for the raw and the EMA weights, per-class AP and the NC measures.

        Returns:
          {'step', 'raw': {'map', 'ap', 'neural_collapse'}, 'ema': {...},
          'num_images_scored', 'num_images_expected', 'seconds'}.
        """
        t0 = time.time()
        results: dict[str, Any] = {"step": int(state.step)}
        for name, variables in (("raw", state.variables()), ("ema", state.ema_variables())):
            scores, labels, feats, feat_labels = self.predict_scores(variables, f"eval {name}")
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
