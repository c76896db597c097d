"""Thin orbax wrapper: the whole training state plus a JSON record of what made it.

`restore_variables` reads only the model's weights (params, batch statistics,
the ETF collection) out of a checkpoint, without an optimizer: for prediction
and for pre-trained backbones.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp

from mlcnc_jax import storage

# The parts of a saved TrainState that the model itself needs.
VARIABLE_COLLECTIONS = ("params", "batch_stats", "etf")


def model_fingerprint(config: Any, class_names: list[str]) -> dict:
    """What shapes a checkpoint: the model settings (not where weights came from) and classes."""
    model = config.model.to_dict()
    model.pop("pretrained")
    return {"model": model, "num_classes": len(class_names), "class_names": list(class_names)}


class CheckpointMismatchError(ValueError):
    """A checkpoint was made by a different model or dataset than the current config."""


class Checkpointer:
    """Saves and restores training states under `<workdir>/checkpoints`.

    Each checkpoint holds two items: 'state' (the TrainState pytree: params,
    batch statistics, the ETF collection, optimizer state, EMA, prototype
    statistics, step, RNG) and 'meta' (JSON: the model fingerprint, the step
    and, for best checkpoints, the score that chose it). The data iterator
    position is the step itself: the input pipeline restarts from it.

    Args:
      workdir: the run's directory.
      fingerprint: JSON-able description of the model and data that shape the
        state; restoring a checkpoint with another fingerprint fails clearly.
      keep: how many of the latest checkpoints to keep.
      keep_best: also keep the best checkpoint by test mAP, in
        `<workdir>/best_checkpoint_by_test_map`.
    """

    def __init__(self, workdir: str, fingerprint: dict, keep: int = 2, keep_best: bool = False):
        self.fingerprint = json.loads(json.dumps(fingerprint))
        workdir = storage.resolve(workdir)
        self.directory = storage.join(workdir, "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self.best = None
        if keep_best:
            best_options = ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                best_fn=lambda metrics: metrics["test_map"],
                best_mode="max",
                enable_async_checkpointing=False,
            )
            self.best = ocp.CheckpointManager(
                storage.join(workdir, "best_checkpoint_by_test_map"),
                options=best_options,
                item_names=("state", "meta"),
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON record of checkpoint `step` (default: the latest)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory}. Train first (--mode=train)."
            )
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def save(self, step: int, state: Any) -> None:
        """Saves `state` (replicated or host arrays) as checkpoint `step`."""
        meta = {"step": int(step), "model": self.fingerprint}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def save_best(self, step: int, state: Any, test_map: float) -> None:
        """Offers `state` as the best checkpoint; kept only if its test mAP is the best so far."""
        if self.best is None:
            return
        meta = {"step": int(step), "model": self.fingerprint, "test_map": float(test_map)}
        self.best.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics={"test_map": float(test_map)},
            force=True,
        )
        self.best.wait_until_finished()

    def check_fingerprint(self, step: int) -> None:
        """Raises CheckpointMismatchError, naming the differing settings, for another model."""
        saved = self.read_meta(step).get("model")
        if saved != self.fingerprint:
            diff = sorted(
                k
                for k in set(saved or {}) | set(self.fingerprint)
                if (saved or {}).get(k) != self.fingerprint.get(k)
            )
            details = ", ".join(
                f"{k}: checkpoint={(saved or {}).get(k)!r} config={self.fingerprint.get(k)!r}"
                for k in diff
            )
            raise CheckpointMismatchError(
                f"The checkpoint at {self.directory} (step {step}) was made with another model "
                f"config ({details}). Use a fresh --workdir, or the model settings of that run."
            )

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores checkpoint `step` (default: the latest) into the structure of `target`.

        Args:
          target: a state with the expected structure, shapes and shardings.
          step: which checkpoint; None for the latest.

        Returns:
          The restored state.

        Raises:
          FileNotFoundError: there is no checkpoint.
          CheckpointMismatchError: the checkpoint was made with another model config.
        """
        step = self.manager.latest_step() if step is None else step
        self.check_fingerprint(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]

    def restore_variables(self, step: int | None = None, *, check: bool = True) -> dict:
        """The model's variables of checkpoint `step` (default: the latest), no optimizer needed.

        Args:
          step: which checkpoint; None for the latest.
          check: refuse a checkpoint of another model (see `restore`).

        Returns:
          {'params', 'batch_stats', 'etf'} as saved (host arrays; empty collections
          stay empty dicts).
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory}. Train first (--mode=train)."
            )
        if check:
            self.check_fingerprint(step)
        saved = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )["state"]
        return {name: saved.get(name) or {} for name in VARIABLE_COLLECTIONS}

    def close(self) -> None:
        self.manager.close()
        if self.best is not None:
            self.best.close()
