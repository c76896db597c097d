"""Thin orbax wrapper: the whole training state plus a JSON record of what made it.

`restore_variables` reads only the model's weights (params, batch statistics,
the ETF collection) out of a checkpoint, without an optimizer: for prediction
and for pre-trained backbones.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mlcnc_jax import storage
from mlcnc_jax.errors import UserError

# The parts of a saved TrainState that the model itself needs.
VARIABLE_COLLECTIONS = ("params", "batch_stats", "etf")

# orbax writes a replicated jax.Array "replica-parallel" by default: each replica writes a
# slice of it, which costs one device-side slice per array and replica. For the many small
# arrays of a training state that doubles the save time (the default model's state on 8 CPU
# devices: 2.05 s against 1.05 s from one replica, benchmarks/checkpoint_save.py); so only
# arrays whose per-replica slice is at least this large are written replica-parallel.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _write_small_arrays_from_one_replica() -> None:
    """Sets orbax's jax.Array handler to MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL.

    Leaves a handler alone that is not orbax's default (one a user registered).
    """
    default = ocp.type_handlers.get_type_handler(jax.Array)
    if type(default) is not ocp.type_handlers.ArrayHandler:
        return
    if getattr(default, "_min_slice_bytes_for_replica_parallel", None) is not None:
        return
    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(default, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
    )
    # orbax logs a warning for every override; this one is the project's own, on import.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        logging.set_verbosity(verbosity)


_write_small_arrays_from_one_replica()


def model_fingerprint(config: Any, class_names: list[str]) -> dict:
    """What shapes a checkpoint: the model settings (not where weights came from) and classes."""
    model = config.model.to_dict()
    model.pop("pretrained")
    return {"model": model, "num_classes": len(class_names), "class_names": list(class_names)}


class CheckpointMismatchError(UserError):
    """A checkpoint was made by a different model or dataset than the current config."""


def read_numpy_tree(path: str) -> Any:
    """Every array of an orbax PyTree checkpoint item (e.g. `<step>/state`), as numpy arrays.

    Reads on any topology: nothing is placed on devices, whatever devices saved it.
    """
    from etils import epath

    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(epath.Path(path))
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(
        epath.Path(path), args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )


# The JSON item in which earlier versions kept the model fingerprint.
LEGACY_META_ITEM = "meta"


def _test_map(metrics: dict) -> float:
    return float(metrics["test_map"])


# Largest |weight| of a checkpoint worth resuming from: trained weights of these models are
# of order 1 (the logit scale of order 10); a diverging run's grow by many orders.
SANE_WEIGHT = 1e4


class Checkpointer:
    """Saves and restores training states under `<workdir>/checkpoints`, in the background.

    One orbax `CheckpointManager`, asynchronous: `save` returns once the state's arrays
    are copied off the devices, and the files are written while training goes on. Each
    checkpoint holds the item 'state' (the TrainState pytree: params, batch statistics,
    the ETF collection, optimizer state, EMA, prototype statistics, step, RNG); its
    metadata records the model fingerprint and the step; with `keep_best` its metrics
    record the test mAP of the evaluation at that step. The data iterator position is the
    step itself: the input pipeline restarts from it.

    Which checkpoints stay is the manager's preservation policy: the latest `keep`, and
    with `keep_best` also the one of the best test mAP (kept where it was saved, never
    written twice).

    Args:
      workdir: the run's directory.
      fingerprint: JSON-able description of the model and data that shape the
        state; restoring a checkpoint with another fingerprint fails clearly.
      keep: how many of the latest checkpoints to keep.
      keep_best: also keep the checkpoint of the best test mAP.
      asynchronous: write in the background (False: `save` returns when written).
    """

    def __init__(
        self,
        workdir: str,
        fingerprint: dict,
        keep: int = 2,
        keep_best: bool = False,
        asynchronous: bool = True,
    ):
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.keep_best = bool(keep_best)
        workdir = storage.resolve(workdir)
        self.directory = storage.join(workdir, "checkpoints")
        policies = [ocp.checkpoint_managers.LatestN(n=max(1, int(keep)))]
        if keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=_test_map, n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            create=True,
            # A save cut short (a kill) leaves a temporary directory: removed on start.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # Metrics are written (and read back on resume) only with a best_fn.
            best_fn=_test_map if keep_best else None,
            best_mode="max",
        )
        # 'meta' is the JSON item of checkpoints from earlier versions (read_meta reads it).
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", LEGACY_META_ITEM)
        )

    def latest_step(self) -> int | None:
        """The newest checkpoint's step (saves in progress are finished first)."""
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step of the best test mAP (with `keep_best`), else None."""
        if not self.keep_best:
            return None
        self.manager.wait_until_finished()
        scored = [s for s in self.manager.all_steps() if self.manager.metrics(s) is not None]
        return max(scored, key=lambda s: _test_map(self.manager.metrics(s)), default=None)

    def read_meta(self, step: int | None = None) -> dict:
        """The record of checkpoint `step` (default: the latest): {'step', 'model'}."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory}. Train first (--mode=train)."
            )
        meta = self.manager.metadata(step).custom_metadata
        if meta and "model" in meta:
            return dict(meta)
        return self.manager.restore(
            step, args=ocp.args.Composite(**{LEGACY_META_ITEM: ocp.args.JsonRestore()})
        )[LEGACY_META_ITEM]

    def save(self, step: int, state: Any, score: float | None = None) -> None:
        """Starts saving `state` (replicated or host arrays) as checkpoint `step`.

        Returns once the arrays are copied off the devices (the state may then be
        donated to the next step); the files are written in the background, into a
        temporary directory renamed when complete, so a killed save leaves no checkpoint.

        Args:
          step: the step.
          state: the training state.
          score: the test mAP of the evaluation at this step, if there was one (with
            `keep_best` it decides whether the checkpoint stays as the best).
        """
        metrics = {"test_map": float(score)} if score is not None and self.keep_best else None
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
            metrics=metrics,
            custom_metadata={"step": int(step), "model": self.fingerprint},
            force=True,
        )

    def wait_until_finished(self) -> None:
        """Blocks until every save has been written (and the checkpoints to drop dropped)."""
        self.manager.wait_until_finished()

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
        step = self.latest_step() if step is None else step
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
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory}. Train first (--mode=train)."
            )
        if check:
            self.check_fingerprint(step)
        # As host numpy arrays: the devices the checkpoint was saved from need not exist
        # here (another process count, another machine).
        saved = read_numpy_tree(storage.join(self.directory, str(step), "state"))
        return {name: saved.get(name) or {} for name in VARIABLE_COLLECTIONS}

    def steps(self) -> list[int]:
        """The steps of the kept checkpoints, ascending (saves in progress finished first)."""
        self.manager.wait_until_finished()
        return sorted(self.manager.all_steps())

    def weight_health(self, step: int) -> tuple[bool, float]:
        """(all parameters finite, largest |parameter|) of checkpoint `step`."""
        params = self.restore_variables(step, check=False)["params"]
        leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
        finite = all(bool(np.isfinite(x).all()) for x in leaves)
        largest = max((float(np.nanmax(np.abs(x))) for x in leaves if x.size), default=0.0)
        return finite, largest

    def describe_for_recovery(self, failed_step: int) -> str:
        """Which kept checkpoints a diverged run can resume from, and how far back each is.

        Args:
          failed_step: the step at which training failed.

        Returns:
          Lines naming each kept checkpoint (newest first) with its distance from
          `failed_step`, whether its parameters are finite and of a normal size, and the
          --restore_step to use.
        """
        steps = self.steps()
        if not steps:
            return (
                f"No checkpoint was saved before step {failed_step}: start again (a fresh "
                "--workdir) with a lower --config.train.learning_rate."
            )
        lines, sound = [], []
        for step in reversed(steps):
            try:
                finite, largest = self.weight_health(step)
            except Exception as e:  # noqa: BLE001 - a broken checkpoint is reported, not raised
                lines.append(f"  step {step}: unreadable ({type(e).__name__})")
                continue
            normal = finite and largest <= SANE_WEIGHT
            if normal:
                sound.append(step)
            state = (
                "not finite"
                if not finite
                else f"finite, largest |weight| {largest:.3g}"
                + ("" if normal else f" (over {SANE_WEIGHT:g}: it would diverge again)")
            )
            lines.append(f"  step {step} ({failed_step - step} steps back): {state}")
        advice = (
            f"Resume from step {sound[0]} with a lower learning rate: --restore_step={sound[0]} "
            "--config.train.learning_rate=LR --allow_config_change=train.learning_rate"
            if sound
            else "No kept checkpoint has weights of a normal size: start again in a fresh "
            "--workdir with a lower --config.train.learning_rate."
        )
        return f"Checkpoints kept in {self.directory}:\n" + "\n".join(lines) + "\n" + advice

    def close(self) -> None:
        """Finishes the saves in progress, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
