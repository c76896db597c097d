"""The training loop over an injected iterator: NaN guard, checkpoint and eval cadence, hooks.

The Trainer builds nothing from the config: it receives the model, optimizer and
loss function (compiled into the step here), the training iterator (anything
that yields numpy batches {'image', 'labels'}), the evaluation function and the
checkpointer; what the run writes or prints is done by hooks. `build.py` wires
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
from mlcnc_jax.objective import Objective
from mlcnc_jax.state import Schedule, TrainState
from mlcnc_jax.step import compile_train_step


class Hook:
    """What a hook may do at each point of a run (every method is optional: no-ops here)."""

    def on_start(self, state: TrainState, start_step: int) -> None:
        """Before the first step (`state` on the host, `start_step` > 0 when resuming)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After step `step` (1-based count of steps done), with its metrics on the host."""

    def on_eval(self, step: int, results: dict[str, Any]) -> None:
        """After each evaluation (see `evaluation.Evaluator`)."""

    def on_end(self, step: int) -> None:
        """After the last step."""


class Trainer:
    """Trains a state through a schedule, evaluating and checkpointing on the way.

    Args:
      model: the model (`models.create_model`, with `placement.axis_name`).
      tx: the optimizer.
      loss_fn: the objective (`objective.make_objective`).
      lr_schedule: the learning-rate schedule.
      plan: the run's step plan.
      evaluate: `evaluate(state) -> results` (e.g. an `evaluation.Evaluator`).
      placement: jit or pmap placement of the state and batches.
      ema_decay: decay of the weights' moving average.
      checkpointer: a `checkpoint.Checkpointer`, or None to save nothing.
      hooks: `Hook`s called at each point of the run.
      eval_every_steps: evaluate after every this many steps (and after the last).
      checkpoint_every_steps: save after every this many steps (and after the last).
      select: the score that picks the best checkpoint (default: raw total mAP).
      is_reported: `is_reported(step)` says whether the evaluation of `step` was
        reported; a resumed run first runs an evaluation that was due at its restored
        step and is not (e.g. the run was killed while evaluating). None: never.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        tx: optax.GradientTransformation,
        loss_fn: Objective,
        lr_schedule: Callable,
        plan: Schedule,
        evaluate: Callable[[TrainState], dict],
        placement: parallel.Placement,
        ema_decay: float,
        checkpointer: Any = None,
        hooks: Sequence[Hook] = (),
        eval_every_steps: int,
        checkpoint_every_steps: int,
        select: Callable[[dict], float] = lambda r: r["raw"]["map"]["total"],
        is_reported: Callable[[int], bool] | None = None,
    ):
        self.plan = plan
        self.evaluate = evaluate
        self.placement = placement
        self.checkpointer = checkpointer
        self.hooks = list(hooks)
        self.eval_every_steps = max(1, int(eval_every_steps))
        self.checkpoint_every_steps = max(1, int(checkpoint_every_steps))
        self.select = select
        self.is_reported = is_reported
        self.train_step = compile_train_step(
            model,
            tx,
            loss_fn,
            lr_schedule,
            steps_per_epoch=plan.steps_per_epoch,
            ema_decay=ema_decay,
            axis_name=placement.axis_name,
        )

    def _call(self, method: str, *args) -> None:
        for hook in self.hooks:
            fn = getattr(hook, method, None)  # any object with some of Hook's methods will do
            if fn is not None:
                fn(*args)

    def run_eval(self, state: TrainState) -> dict:
        """Evaluates a host state and tells the hooks."""
        results = self.evaluate(state)
        self._call("on_eval", int(state.step), results)
        return results

    def _eval_due(self, step: int) -> bool:
        return step % self.eval_every_steps == 0 or step == self.plan.total_steps

    def _save(self, step: int, state: TrainState) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(step, state)

    def train(self, state: TrainState, batches: Iterator[dict]) -> dict:
        """Trains from `state.step` to the end of the plan.

        Args:
          state: the host state to start from (fresh, or restored to resume).
          batches: this host's training batches from step `state.step` on.

        Returns:
          The last evaluation's results.
        """
        plan = self.plan
        start = int(state.step)
        self._call("on_start", state, start)
        logging.info(
            "Training %d steps (%d per epoch, warm-up %d) from step %d on %d device(s).",
            plan.total_steps,
            plan.steps_per_epoch,
            plan.warmup_steps,
            start,
            jax.device_count(),
        )
        results = {}
        if 0 < start < plan.total_steps and self._eval_due(start):
            if self.is_reported is not None and not self.is_reported(start):
                logging.warning("Step %d's evaluation has no report: running it first.", start)
                results = self.run_eval(state)
        placed = self.placement.place(state)
        del state
        for step in range(start, plan.total_steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"The training iterator ended after step {step} of {plan.total_steps}: "
                    "pass one that yields batches to the end of the plan (e.g. an infinite one)."
                ) from None
            placed, step_metrics = self.train_step(placed, self.placement.shard(batch))
            # Waiting on each step keeps XLA's CPU collectives from deadlocking and
            # lets a NaN stop the run before it reaches a checkpoint.
            step_metrics = jax.tree.map(
                lambda x: np.asarray(x).reshape(-1)[0], jax.device_get(step_metrics)
            )
            done = step + 1
            if not np.isfinite(step_metrics["loss"]):
                recovery = (
                    self.checkpointer.describe_for_recovery(done)
                    if self.checkpointer is not None
                    else "Nothing was saved (no checkpointer)."
                )
                raise FloatingPointError(
                    f"The loss became {step_metrics['loss']} at step {done} "
                    f"(terms: { {k: float(v) for k, v in step_metrics.items()} }). The run "
                    "stopped; nothing of this step was saved, every checkpoint is kept. "
                    f"{recovery}\nOr check the data."
                )
            self._call("on_step", done, step_metrics)
            last = done == plan.total_steps
            if done % self.checkpoint_every_steps == 0 or last:
                self._save(done, self.placement.unplace(placed))
            if self._eval_due(done):
                host = self.placement.unplace(placed)
                results = self.run_eval(host)
                if self.checkpointer is not None:
                    self.checkpointer.save_best(done, host, self.select(results))
        if start >= plan.total_steps:
            results = self.run_eval(self.placement.unplace(placed))
        self._call("on_end", max(start, plan.total_steps))
        return results
