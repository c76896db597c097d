"""Scoring a split: mAP (total / head / medium / tail), per-class AP, neural-collapse measures.

Writes nothing: the reports (reports.py) and the console take the results.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn

from mlcnc_jax import metrics, parallel
from mlcnc_jax.models.families import ModelFamily
from mlcnc_jax.results import Evaluation, GroupMAP, Scores
from mlcnc_jax.state import TrainState
from mlcnc_jax.step import eval_step

PLAIN = ModelFamily()  # outputs 'logits' and per-image 'features'


class Evaluator:
    """Scores the raw and the EMA weights of a state on one split, in one pass over it.

    Args:
      model: the model (built without a pmap axis).
      family: its `models.ModelFamily` (which features the neural-collapse measures read;
        default: a plain classifier's per-image 'features').
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
        family: ModelFamily = PLAIN,
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
        self.family = family
        norm = None if image_norm is None else tuple(map(tuple, image_norm))
        one = functools.partial(eval_step, model=model, family=family, image_norm=norm)
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
          the features whose neural collapse is measured and their labels
          (`ModelFamily.pair_features`).
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

    def _collect(self, parts: dict[str, list], out: dict, arrays: dict) -> None:
        mask = parallel.to_host(arrays["mask"]).astype(bool)
        y = parallel.to_host(arrays["labels"])[mask]
        for name, result in out.items():
            s = parallel.to_host(result["scores"])[mask]
            f = parallel.to_host(result["features"])[mask].astype(np.float32)
            parts[name].append((s, y, *self.family.pair_features(f, y)))

    def score(self, weights: dict[str, dict], desc: str = "eval") -> dict[str, Scores]:
        """mAP by group, per-class AP and the NC measures of each set of weights, in one pass.

        Args:
          weights: {name: the model's variables}, e.g. {'raw': ..., 'ema': ...}.
          desc: the progress bar's label.

        Returns:
          {name: its `Scores`}.
        """
        scores = {}
        for name, (s, labels, feats, feat_labels) in self.predict_scores(weights, desc).items():
            if len(s) != self.num_images:
                raise RuntimeError(f"Scored {len(s)} test images, expected {self.num_images}.")
            scores[name] = Scores(
                map=GroupMAP.from_dict(metrics.lt_map(s, labels, self.class_split)),
                ap=metrics.average_precision(s, labels),
                neural_collapse=metrics.neural_collapse(feats, feat_labels),
            )
        return scores

    def evaluate(self, raw: dict, ema: dict | None, step: int, desc: str = "eval") -> Evaluation:
        """The raw and the EMA weights of `step`, scored in one pass.

        Args:
          raw: the trained weights (the model's variables).
          ema: their moving average; None scores `raw` alone and reports it as both
            (weights that were never trained, e.g. zero-shot CLIP).
          step: the step the weights are of.
          desc: the progress bar's label.
        """
        t0 = time.time()
        scores = self.score({"raw": raw} if ema is None else {"raw": raw, "ema": ema}, desc)
        return Evaluation(
            step=int(step),
            raw=scores["raw"],
            ema=scores.get("ema", scores["raw"]),
            num_images_scored=self.num_images,
            num_images_expected=self.num_images,
            seconds=time.time() - t0,
        )

    def __call__(self, state: TrainState) -> Evaluation:
        """The raw and the EMA weights of `state`, scored in one pass (see `evaluate`)."""
        return self.evaluate(state.variables(), state.ema_variables(), int(state.step))
