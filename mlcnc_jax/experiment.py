"""The experiment API: `build(config, workdir, ...)` assembles a run, `Experiment` runs it.

    run = experiment.build(config, workdir)           # the config's dataset, tf.data batches
    result = run.train()                              # a `results.RunResult`
    run = experiment.build(config, workdir, dataset=my_dataset, train_batches=my_batches)

The command line, the notebook and the benchmarks build every run here: config ->
dataset, step counts, model family and module, optimizer, objective, batches,
evaluator, checkpointer, hooks -> `Trainer`. The parts (trainer.py, step.py,
objective.py, evaluation.py, ...) receive what they use and build nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import optax
from flax import linen as nn

from mlcnc_jax import (
    checkpoint,
    checkpoint_health,
    configuration,
    console,
    objective,
    optim,
    parallel,
    storage,
)
from mlcnc_jax.backbone_weights import check_pretrained_path, pretrained_path
from mlcnc_jax.configuration import DEFAULT_RESUME, ResumeOptions
from mlcnc_jax.data import feeds
from mlcnc_jax.data.dataset import MultiLabelDataset
from mlcnc_jax.evaluation import Evaluator
from mlcnc_jax.models import ModelFamily, create_model, get_family
from mlcnc_jax.reports import is_reported_everywhere, run_hooks
from mlcnc_jax.results import RunResult
from mlcnc_jax.state import StepCounts, TrainState, initial_train_state, step_counts
from mlcnc_jax.trainer import Hook, Trainer

# train_batches(start_step) -> this host's batches from global step `start_step` on.
TrainBatches = Callable[[int], Iterator[dict]]


@dataclasses.dataclass
class Experiment:
    """A run assembled from its config: every part, and how to train or evaluate it.

    Attributes:
      config: the experiment config.
      workdir: where checkpoints and reports go.
      dataset: the `MultiLabelDataset`.
      steps: the run's step counts.
      family: the model family (`models.families`).
      model, tx, lr_schedule, loss_fn: what the train step uses.
      checkpointer: the run's `checkpoint.Checkpointer`.
      placement: jit or pmap.
      evaluator: scores the test split.
      trainer: the `Trainer`.
      batches: `batches(start_step)`: this host's training batches from that step on.
      reports: the hook writing the workdir's reports (None where this process writes none).
      resume: how training resumes (restore step, allowed config changes).
    """

    config: ml_collections.ConfigDict
    workdir: str
    dataset: MultiLabelDataset
    steps: StepCounts
    family: ModelFamily
    model: nn.Module
    tx: optax.GradientTransformation
    lr_schedule: Callable
    loss_fn: objective.Objective
    checkpointer: checkpoint.Checkpointer
    placement: parallel.Placement
    evaluator: Evaluator
    trainer: Trainer
    batches: TrainBatches
    reports: Any = None
    resume: ResumeOptions = DEFAULT_RESUME

    def restore_step(self, *, training: bool) -> int | None:
        """The checkpoint to start from: `resume.restore_step`, else the latest sound one.

        A broken latest checkpoint stops the run, naming it and the newest sound step to
        pass as --restore_step. Training from an earlier step sets the newer checkpoints
        aside (renamed `<step>.set_aside`, never deleted) so that those steps can be saved
        again; evaluating one leaves them as they are.
        """
        return checkpoint_health.choose_start_step(
            self.checkpointer, self.workdir, self.resume.restore_step, training=training
        )

    def initial_state(self, *, training: bool = False) -> TrainState:
        """The freshly initialised state, or the chosen checkpoint's when there is one.

        Args:
          training: the state a training run starts from: a fresh run saves its config
            (config.json); a resumed one is checked against it (`configuration.check_resume`).
        """
        state = initial_train_state(self.config, self.model, self.tx, self.dataset.num_classes)
        step = self.restore_step(training=training)
        is_main = jax.process_index() == 0
        if step is None:
            if training:
                configuration.save_config(self.workdir, self.config, jax.process_index())
            return state
        if training:
            configuration.check_resume(
                self.workdir,
                self.config,
                self.resume.allow_config_change,
                step=step,
                process_index=jax.process_index(),
            )
        state = self.checkpointer.restore(state, step)
        if is_main and training:
            console.say(f"Resuming from {self.checkpointer.directory}/{step}")
        return state

    def _result(self, final) -> RunResult:
        return RunResult.from_summary(final, getattr(self.reports, "summary", None))

    def train(
        self, wrap_batches: Callable[[Iterator[dict]], Iterator[dict]] | None = None
    ) -> RunResult:
        """Trains (or resumes) to the last step; returns the run's result.

        Args:
          wrap_batches: optionally wraps the training iterator (e.g. to record or
            alter what the step receives).
        """
        state = self.initial_state(training=True)
        batches = self.batches(int(state.step))
        if wrap_batches is not None:
            batches = wrap_batches(batches)
        try:
            return self._result(self.trainer.train(state, batches))
        finally:
            # Free the iterator (tf.data's threads and buffers) now, not at garbage collection.
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def evaluate(self) -> RunResult:
        """Scores the latest sound checkpoint, or `resume.restore_step` (writes its reports)."""
        if self.checkpointer.latest_step() is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.checkpointer.directory}: train first (--mode=train)."
            )
        return self._result(self.trainer.run_eval(self.initial_state()))


def build(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    dataset: MultiLabelDataset | None = None,
    train_batches: TrainBatches | None = None,
    hooks: Sequence[Hook] = (),
    reports: bool = True,
    resume: ResumeOptions = DEFAULT_RESUME,
) -> Experiment:
    """Assembles the run of `config` in `workdir`.

    Args:
      config: the experiment config.
      workdir: the run's directory (checkpoints, reports).
      dataset: the data to train and score on; default: config.data's
        (`data.sources.load_dataset`). A `MultiLabelDataset` whose splits hold file
        paths or encoded images is read by tf.data; one holding decoded pixels in
        memory by numpy (`data.feeds`).
      train_batches: `train_batches(start_step)` -> this host's training batches
        ({'image', 'labels'}) from global step `start_step` on; default: the
        dataset's, drawn by the project's sampler (`data.feeds.train_batches`).
      hooks: more trainer hooks, after the console and the reports.
      reports: write the workdir's reports (eval_<step>.json, summary.json, the
        TensorBoard scalars; clu's writer needs TensorFlow) and print progress.
      resume: how training resumes.

    Returns:
      The `Experiment`.
    """
    from mlcnc_jax.models import text_classifier

    workdir = storage.resolve(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        storage.makedirs(workdir)
    parallel.check_batch_size(config.train.batch_size)
    parallel.check_batch_size(config.eval.batch_size)
    placement = parallel.Placement(config.parallel)
    family = get_family(config.model.name)

    check_pretrained_path(config)  # before the (possibly slow) dataset checks
    text_classifier.check_text_weights(config)
    if dataset is None:
        dataset = _load_dataset(config, announce=is_main)
    # Class names -> text embeddings, once, stored in the workdir (config names the file).
    config = text_classifier.prepare_class_text(config, dataset.class_names, workdir)
    steps = step_counts(config, dataset.train.labels)
    model = create_model(config, dataset.num_classes, axis_name=placement.axis_name)
    eval_model = create_model(config, dataset.num_classes) if placement.axis_name else model
    tx, lr_schedule = optim.create_optimizer(config, steps.total_steps)
    loss_fn = objective.make_objective(
        config.loss,
        objective.ClassStats(dataset.class_freq, len(dataset.train)),
        warmup_steps=steps.warmup_steps,
    )
    checkpointer = checkpoint.Checkpointer(
        workdir,
        checkpoint.model_fingerprint(config, dataset.class_names),
        keep=config.train.keep_checkpoints,
        keep_best=config.train.keep_best,
    )
    image_norm = (tuple(config.data.mean), tuple(config.data.std))
    evaluator = Evaluator(
        eval_model,
        lambda: feeds.eval_batches(dataset.test, config),
        family=family,
        num_images=len(dataset.test),
        class_split=dataset.class_split,
        mesh=placement.mesh,
        progress=is_main and reports,
        image_norm=image_norm,
    )
    run_reports = run_hooks(config, workdir, dataset, steps) if is_main and reports else []
    trainer = Trainer(
        model=model,
        family=family,
        tx=tx,
        loss_fn=loss_fn,
        lr_schedule=lr_schedule,
        steps=steps,
        evaluate=evaluator,
        placement=placement,
        ema_decay=config.train.ema_decay,
        checkpointer=checkpointer,
        hooks=[*run_reports, *hooks],
        eval_every_steps=config.train.eval_every_epochs * steps.steps_per_epoch,
        checkpoint_every_steps=config.train.checkpoint_every_steps,
        log_every_steps=config.train.log_every_steps,
        prefetch=config.train.prefetch_batches,
        image_norm=image_norm,
        is_reported=is_reported_everywhere(workdir, is_main and reports),
    )
    if train_batches is None:

        def train_batches(start_step: int) -> Iterator[dict]:
            num_steps = max(0, steps.total_steps - start_step)
            return feeds.train_batches(
                dataset.train, config, start_step=start_step, num_steps=num_steps
            )

    return Experiment(
        config=config,
        workdir=workdir,
        dataset=dataset,
        steps=steps,
        family=family,
        model=model,
        tx=tx,
        lr_schedule=lr_schedule,
        loss_fn=loss_fn,
        checkpointer=checkpointer,
        placement=placement,
        evaluator=evaluator,
        trainer=trainer,
        batches=train_batches,
        reports=run_reports[-1] if run_reports else None,
        resume=resume,
    )


def _load_dataset(config: ml_collections.ConfigDict, announce: bool) -> MultiLabelDataset:
    """config.data's dataset, saying where the backbone's weights come from and what is scored."""
    from mlcnc_jax.data import sources

    if announce:
        source = pretrained_path(config)
        console.say(
            f"Backbone {config.model.backbone}: "
            + (
                f"pre-trained weights from {source}"
                if source
                else "from scratch (no pre-trained weights)"
            )
        )
    dataset = sources.load_dataset(config)
    if announce and config.eval.max_images:
        console.say(
            f"Evaluation on {len(dataset.test)} evenly spaced test images "
            f"(eval.max_images = {config.eval.max_images}; 0 scores the whole split)"
        )
    return dataset
