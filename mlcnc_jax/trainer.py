"""The training loop over an injected iterator: NaN guard, checkpoint and eval cadence, hooks.

The Trainer builds nothing from the config: it receives the model, optimizer and
loss function (compiled into the step here), the training iterator (anything
that yields numpy batches {'image', 'labels'}), the evaluation function and the
checkpointer; what the run writes or prints is done by hooks. `experiment.py` wires
it up from a config; a test or a host without TensorFlow can feed it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from mlcnc_jax import parallel
from mlcnc_jax.models.families import ModelFamily
from mlcnc_jax.objective import Objective
from mlcnc_jax.results import Evaluation
from mlcnc_jax.state import StepCounts, TrainState
from mlcnc_jax.step import compile_train_step


def on_host():
    """Where the loop may fetch from the devices: metrics, evaluation, checkpoints, hooks.

    Everything else in the step loop stays on the devices: run the loop under
    `jax.transfer_guard_device_to_host("disallow_explicit")` and any fetch outside these
    places raises (tests/test_trainer_loop.py does).
    """
    return jax.transfer_guard_device_to_host("allow")


def fetch_metrics(metrics: list[dict]) -> list[dict[str, float]]:
    """The metrics of several steps, in one transfer, as host floats.

    Under pmap each value has a leading device axis (identical copies): the first is kept.
    """
    host = jax.device_get(metrics)
    return [{k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()} for m in host]


class Hook:
    """What a hook may do at each point of a run (every method is optional: no-ops here)."""

    def on_start(self, state: TrainState, start_step: int) -> None:
        """Before the first step (`state` on the host, `start_step` > 0 when resuming)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After step `step` (1-based count of steps done), with its metrics on the host.

        Called in order for every step, a log interval's steps together when their
        metrics are fetched (every `log_every_steps`, and before evaluations and saves).
        """

    def on_eval(self, step: int, results: Evaluation) -> None:
        """After each evaluation."""

    def on_end(self, step: int) -> None:
        """After the last step."""


class Trainer:
    """Trains a state for its step counts, evaluating and checkpointing on the way.

    Args:
      model: the model (`models.create_model`, with `placement.axis_name`).
      family: its `models.ModelFamily`.
      tx: the optimizer.
      loss_fn: the objective (`objective.make_objective`).
      lr_schedule: the learning-rate schedule.
      steps: the run's step counts.
      evaluate: `evaluate(state) -> results` (e.g. an `evaluation.Evaluator`).
      placement: jit or pmap placement of the state and batches.
      ema_decay: decay of the weights' moving average.
      checkpointer: a `checkpoint.Checkpointer`, or None to save nothing.
      hooks: `Hook`s called at each point of the run.
      eval_every_steps: evaluate after every this many steps (and after the last).
      checkpoint_every_steps: save after every this many steps (and after the last).
      log_every_steps: fetch the step metrics (check them, tell the hooks) after every
        this many steps, and before every evaluation and save.
      prefetch: how many batches are placed on the devices ahead of the step that uses
        them (and how many steps the host may run ahead of the devices).
      image_norm: (mean, std) per channel: uint8 images are scaled to [0, 1] and
        normalised by the compiled step; floating images are taken as normalised.
      select: the score that picks the best checkpoint (default: raw total mAP).
      is_reported: `is_reported(step)` says whether the evaluation of `step` was
        reported; a resumed run first runs an evaluation that was due at its restored
        step and is not (e.g. the run was killed while evaluating). None: never.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        family: ModelFamily,
        tx: optax.GradientTransformation,
        loss_fn: Objective,
        lr_schedule: Callable,
        steps: StepCounts,
        evaluate: Callable[[TrainState], Evaluation],
        placement: parallel.Placement,
        ema_decay: float,
        checkpointer: Any = None,
        hooks: Sequence[Hook] = (),
        eval_every_steps: int,
        checkpoint_every_steps: int,
        log_every_steps: int = 1,
        prefetch: int = 2,
        image_norm: tuple[Sequence[float], Sequence[float]] | None = None,
        select: Callable[[Evaluation], float] = lambda r: r.raw.map.total,
        is_reported: Callable[[int], bool] | None = None,
    ):
        self.steps = steps
        self.evaluate = evaluate
        self.placement = placement
        self.checkpointer = checkpointer
        self.hooks = list(hooks)
        self.eval_every_steps = max(1, int(eval_every_steps))
        self.checkpoint_every_steps = max(1, int(checkpoint_every_steps))
        self.log_every_steps = max(1, int(log_every_steps))
        self.prefetch = max(1, int(prefetch))
        self.keep_best = bool(getattr(checkpointer, "keep_best", False))
        # XLA's CPU collectives over several processes (gloo) can deadlock when one
        # process runs steps ahead of another: there, and only there, each step is waited
        # for (a wait, not a transfer). One process's devices, or any GPU/TPU, never wait.
        self.sync_every_step = jax.process_count() > 1 and jax.default_backend() == "cpu"
        self.select = select
        self.is_reported = is_reported
        self.train_step = compile_train_step(
            model,
            tx,
            loss_fn,
            lr_schedule,
            family=family,
            steps_per_epoch=steps.steps_per_epoch,
            ema_decay=ema_decay,
            axis_name=placement.axis_name,
            image_norm=image_norm,
        )

    def _call(self, method: str, *args) -> None:
        for hook in self.hooks:
            fn = getattr(hook, method, None)  # any object with some of Hook's methods will do
            if fn is not None:
                fn(*args)

    def run_eval(self, state: TrainState) -> Evaluation:
        """Evaluates a host state and tells the hooks."""
        results = self.evaluate(state)
        self._call("on_eval", int(state.step), results)
        return results

    def _eval_due(self, step: int) -> bool:
        return step % self.eval_every_steps == 0 or step == self.steps.total_steps

    def _save(self, step: int, state: TrainState, score: float | None) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(step, state, score=score)

    def train(self, state: TrainState, batches: Iterator[dict]) -> Evaluation:
        """Trains from `state.step` to the last step.

        The host never waits for a step's result before dispatching the next one: the
        step metrics stay on the devices and are fetched together every
        `log_every_steps` steps and before every evaluation and checkpoint
        (`fetch_metrics`), where a non-finite loss stops the run before anything of it
        is saved. The next `prefetch` batches are placed on the devices while a step
        runs; the host runs at most `prefetch` steps ahead of the devices.

        Args:
          state: the host state to start from (fresh, or restored to resume).
          batches: this host's training batches from step `state.step` on.

        Returns:
          The last evaluation.
        """
        counts = self.steps
        with on_host():
            start = int(state.step)
            self._call("on_start", state, start)
        logging.info(
            "Training %d steps (%d per epoch, warm-up %d) from step %d on %d device(s).",
            counts.total_steps,
            counts.steps_per_epoch,
            counts.warmup_steps,
            start,
            jax.device_count(),
        )
        results = None
        if 0 < start < counts.total_steps and self._eval_due(start):
            if self.is_reported is not None and not self.is_reported(start):
                logging.warning("Step %d's evaluation has no report: running it first.", start)
                with on_host():
                    results = self.run_eval(state)
        placed = self.placement.place(state)
        del state
        device_batches = self.placement.prefetch(batches, self.prefetch)
        try:
            pending: list[tuple[int, dict]] = []  # (step, metrics still on the devices)
            for step in range(start, counts.total_steps):
                try:
                    batch = next(device_batches)
                except StopIteration:
                    raise RuntimeError(
                        f"The training iterator ended after step {step} of {counts.total_steps}: "
                        "pass one that yields batches to the last step (e.g. an infinite one)."
                    ) from None
                placed, step_metrics = self.train_step(placed, batch)
                done = step + 1
                pending.append((done, step_metrics))
                if len(pending) > self.prefetch:
                    # Bounds how far the host runs ahead (and so how many batches wait on the
                    # devices): a wait, not a transfer; the devices still have steps queued.
                    jax.block_until_ready(pending[-1 - self.prefetch][1]["loss"])
                if self.sync_every_step:
                    jax.block_until_ready(step_metrics["loss"])
                last = done == counts.total_steps
                checkpoint_due = done % self.checkpoint_every_steps == 0 or last
                eval_due = self._eval_due(done)
                if not (done % self.log_every_steps == 0 or checkpoint_due or eval_due):
                    continue
                with on_host():
                    self._check_and_report(pending)
                    pending = []
                    score = None
                    if eval_due:
                        host = self.placement.unplace(placed)
                        results = self.run_eval(host)
                        score = self.select(results)
                    if checkpoint_due or (eval_due and self.keep_best):
                        self._save(done, self.placement.unplace(placed), score)
        finally:
            if self.checkpointer is not None:
                # A run stopped early (an error, SIGTERM) still completes the saves it began.
                self.checkpointer.wait_until_finished()
        if start >= counts.total_steps:
            with on_host():
                results = self.run_eval(self.placement.unplace(placed))
        self._call("on_end", max(start, counts.total_steps))
        return results

    def _check_and_report(self, pending: list[tuple[int, dict]]) -> None:
        """Fetches the pending steps' metrics, stops at the first non-finite loss, tells hooks."""
        if not pending:
            return
        fetched = fetch_metrics([m for _, m in pending])
        for (done, _), step_metrics in zip(pending, fetched):
            if not np.isfinite(step_metrics["loss"]):
                self._stop_on_nonfinite(done, step_metrics)
        for (done, _), step_metrics in zip(pending, fetched):
            self._call("on_step", done, step_metrics)

    def _stop_on_nonfinite(self, done: int, step_metrics: dict) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait_until_finished()  # earlier saves: finish, then describe
            recovery = self.checkpointer.describe_for_recovery(done)
        else:
            recovery = "Nothing was saved (no checkpointer)."
        raise FloatingPointError(
            f"The loss became {step_metrics['loss']} at step {done} "
            f"(terms: { {k: float(v) for k, v in step_metrics.items()} }). The run "
            "stopped; nothing of this step or later was saved, every checkpoint is kept. "
            f"{recovery}\nOr check the data."
        )
