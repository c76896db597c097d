"""The composition root: config -> dataset, step plan, model, optimizer, objective,
iterators, evaluator, checkpointer, hooks -> Trainer.

Everything the command line runs is assembled here and nowhere else; the parts
(trainer.py, step.py, objective.py, evaluation.py, ...) receive what they use.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
    prototypes,
    storage,
)
from mlcnc_jax.backbone_weights import check_pretrained_path, load_pretrained, pretrained_path
from mlcnc_jax.configuration import DEFAULT_RESUME, ResumeOptions
from mlcnc_jax.evaluation import Evaluator
from mlcnc_jax.models import create_model
from mlcnc_jax.state import Schedule, TrainState, create_train_state, init_variables, make_schedule
from mlcnc_jax.trainer import Hook, Trainer


def initial_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    num_classes: int,
    example_input: jax.Array | None = None,
) -> TrainState:
    """The fresh state of a run: initialised weights (pre-trained backbone when configured).

    Args:
      config: the experiment config (seed, image size, pretrained, model name, proj_dim).
      model: the model.
      tx: the optimizer.
      num_classes: K.
      example_input: one input the model takes (default: a [1, S, S, 3] zero image).
    """
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    if example_input is None:
        size = config.data.image_size
        example_input = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = init_variables(model, example_input, init_rng)
    if pretrained_path(config):
        variables = load_pretrained(
            variables, pretrained_path(config), backbone=getattr(model, "backbone", None)
        )
    protos = None
    if config.model.name == "mlcnc":
        protos = prototypes.init_prototypes(num_classes, config.model.proj_dim)
    return create_train_state(variables, tx, rng=state_rng, prototypes=protos)


@dataclasses.dataclass
class Experiment:
    """A run assembled from its config: every part, and how to train or evaluate it.

    Attributes:
      config: the experiment config.
      workdir: where checkpoints and reports go.
      dataset: the `MultiLabelDataset`.
      plan: the step plan.
      model, tx, lr_schedule, loss_fn: what the train step uses.
      checkpointer: the run's `checkpoint.Checkpointer`.
      placement: jit or pmap.
      evaluator: scores the test split.
      trainer: the `Trainer`.
      resume: how training resumes (restore step, allowed config changes).
    """

    config: ml_collections.ConfigDict
    workdir: str
    dataset: Any
    plan: Schedule
    model: nn.Module
    tx: optax.GradientTransformation
    lr_schedule: Callable
    loss_fn: objective.Objective
    checkpointer: checkpoint.Checkpointer
    placement: parallel.Placement
    evaluator: Evaluator
    trainer: Trainer
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

    def train_batches(self, start_step: int = 0) -> Iterator[dict]:
        """This host's batches of the tf.data pipeline from global step `start_step` to the end."""
        from mlcnc_jax.data import pipeline

        return pipeline.train_batches(
            self.dataset.train,
            self.config,
            global_batch=self.config.train.batch_size,
            start_step=start_step,
            num_steps=max(0, self.plan.total_steps - start_step),
        )

    def train(self, wrap_batches: Callable[[Iterator[dict]], Iterator[dict]] | None = None) -> dict:
        """Trains (or resumes) to the end of the plan; returns the last evaluation.

        Args:
          wrap_batches: optionally wraps the training iterator (e.g. to record or
            alter what the step receives).
        """
        state = self.initial_state(training=True)
        batches = self.train_batches(int(state.step))
        if wrap_batches is not None:
            batches = wrap_batches(batches)
        try:
            return self.trainer.train(state, batches)
        finally:
            # Free the tf.data iterator (its threads and buffers) now: one process may
            # train many runs (benchmarks/quality.py).
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            del batches
            gc.collect()

    def evaluate(self) -> dict:
        """Scores the latest sound checkpoint, or `resume.restore_step` (writes its reports)."""
        if self.checkpointer.latest_step() is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.checkpointer.directory}: train first (--mode=train)."
            )
        return self.trainer.run_eval(self.initial_state())


def build(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    resume: ResumeOptions = DEFAULT_RESUME,
) -> Experiment:
    """Assembles the run of `config` in `workdir`.

    Args:
      config: the experiment config.
      workdir: the run's directory.
      hooks: more trainer hooks, after the console and the reports.
      resume: how training resumes.

    Returns:
      The `Experiment`.
    """
    from mlcnc_jax import reports
    from mlcnc_jax.data import pipeline, sources
    from mlcnc_jax.models import text_classifier

    workdir = storage.resolve(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        storage.makedirs(workdir)
    parallel.check_batch_size(config.train.batch_size)
    parallel.check_batch_size(config.eval.batch_size)
    placement = parallel.Placement(config.parallel)

    check_pretrained_path(config)  # before the (possibly slow) dataset checks
    text_classifier.check_text_weights(config)
    if is_main:
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
    if is_main and config.eval.max_images:
        console.say(
            f"Evaluation on {len(dataset.test)} evenly spaced test images "
            f"(eval.max_images = {config.eval.max_images}; 0 scores the whole split)"
        )
    # Class names -> text embeddings, once, stored in the workdir (config names the file).
    config = text_classifier.prepare_class_text(config, dataset.class_names, workdir)
    plan = make_schedule(config, dataset.train.labels)
    model = create_model(config, dataset.num_classes, axis_name=placement.axis_name)
    eval_model = create_model(config, dataset.num_classes) if placement.axis_name else model
    tx, lr_schedule = optim.create_optimizer(config, plan.total_steps)
    loss_fn = objective.make_objective(
        config.loss,
        objective.ClassStats(dataset.class_freq, len(dataset.train)),
        warmup_steps=plan.warmup_steps,
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
        lambda: pipeline.eval_batches(dataset.test, config, global_batch=config.eval.batch_size),
        num_images=len(dataset.test),
        class_split=dataset.class_split,
        mesh=placement.mesh,
        progress=is_main,
        image_norm=image_norm,
    )
    run_hooks: list[Hook] = []
    if is_main:
        run_hooks.append(
            console.Console(
                plan,
                config.train.batch_size,
                describe=f"{config.model.name} ({config.model.backbone}, {config.dtype}) on "
                f"{dataset.name}: {dataset.num_classes} classes, {len(dataset.train)} training / "
                f"{len(dataset.test)} test images",
                table_path=storage.join(workdir, reports.PARAMETER_TABLE),
            )
        )
        run_hooks.append(
            reports.RunReports(
                workdir, config, dataset, config.train.log_every_steps, plan.total_steps
            )
        )
    run_hooks.extend(hooks)
    trainer = Trainer(
        model=model,
        tx=tx,
        loss_fn=loss_fn,
        lr_schedule=lr_schedule,
        plan=plan,
        evaluate=evaluator,
        placement=placement,
        ema_decay=config.train.ema_decay,
        checkpointer=checkpointer,
        hooks=run_hooks,
        eval_every_steps=config.train.eval_every_epochs * plan.steps_per_epoch,
        checkpoint_every_steps=config.train.checkpoint_every_steps,
        log_every_steps=config.train.log_every_steps,
        prefetch=config.train.prefetch_batches,
        image_norm=image_norm,
        is_reported=lambda step: parallel.broadcast_flag(
            is_main and reports.has_eval_report(workdir, step)
        ),
    )
    return Experiment(
        config=config,
        workdir=workdir,
        dataset=dataset,
        plan=plan,
        model=model,
        tx=tx,
        lr_schedule=lr_schedule,
        loss_fn=loss_fn,
        checkpointer=checkpointer,
        placement=placement,
        evaluator=evaluator,
        trainer=trainer,
        resume=resume,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    wrap_batches: Callable[[Iterator[dict]], Iterator[dict]] | None = None,
    resume: ResumeOptions = DEFAULT_RESUME,
) -> dict:
    """Trains (or resumes) the configured model and returns the final evaluation."""
    return build(config, workdir, hooks=hooks, resume=resume).train(wrap_batches)


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, resume: ResumeOptions = DEFAULT_RESUME
) -> dict:
    """Scores the latest checkpoint of `workdir` (or `resume.restore_step`) on the test split."""
    return build(config, workdir, resume=resume).evaluate()
