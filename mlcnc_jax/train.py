"""Training state, the pure train and eval steps, and the train / evaluate loops."""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from mlcnc_jax import checkpoint, losses, metrics, parallel, prototypes, reports, storage
from mlcnc_jax.models import create_model, pretrained
from mlcnc_jax.optim import create_optimizer

# Outputs of the model that the losses read; the rest never leaves the step.
_LOSS_OUTPUTS = ("logits", "class_features", "projected")


@flax.struct.dataclass
class TrainState:
    """Everything a killed run needs to resume exactly (the data position is `step`)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    etf: Any  # frozen ETF label embedding and classifier ({} for the baseline model)
    opt_state: Any
    ema: Any  # {'params', 'batch_stats'}: exponential moving average of the weights
    prototypes: Any  # prototypes.PrototypeState, or None for the baseline model
    rng: jax.Array


@flax.struct.dataclass
class Schedule:
    """Step counts of a run, derived from the config and the training split."""

    steps_per_epoch: int = flax.struct.field(pytree_node=False)
    total_steps: int = flax.struct.field(pytree_node=False)
    warmup_steps: int = flax.struct.field(pytree_node=False)


def make_schedule(config: ml_collections.ConfigDict, train_labels: np.ndarray) -> Schedule:
    """Steps per epoch (the sampler's epoch unless the config fixes it), total and warm-up steps."""
    from mlcnc_jax.data import pipeline  # the input pipeline owns the epoch definition

    if config.train.steps_per_epoch > 0:
        steps_per_epoch = int(config.train.steps_per_epoch)
    else:
        size = pipeline.epoch_size(train_labels, config.data.sampling)
        steps_per_epoch = max(1, math.ceil(size / config.train.batch_size))
    warmup_epochs = config.loss.warmup_epochs if config.model.name == "mlcnc" else 0
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * int(config.train.num_epochs),
        warmup_steps=steps_per_epoch * int(warmup_epochs),
    )


def model_fingerprint(config: ml_collections.ConfigDict, class_names: list[str]) -> dict:
    """What shapes a checkpoint: the model settings (not where weights came from) and classes."""
    model = config.model.to_dict()
    model.pop("pretrained")
    return {"model": model, "num_classes": len(class_names), "class_names": list(class_names)}


def init_variables(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Initialises the model's variables (params, batch_stats, etf) on the host."""
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(
        {"params": rng, "dropout": rng}, dummy
    )
    return flax.core.unfreeze(variables)


def check_pretrained_path(config: ml_collections.ConfigDict) -> None:
    """Fails at once, saying where the weights go, when config.model.pretrained is missing."""
    path = config.model.pretrained
    if path and not os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"Pretrained backbone weights not found: {path}. config.model.pretrained names either "
            f"torchvision's ImageNet weights for {config.model.backbone} (.safetensors, or .pth with "
            "torch installed; see README, 'Real benchmarks') or the workdir of a "
            "configs/pretrain.py run (built-in data). Put them there, pass "
            "--config.model.pretrained=PATH, or train from scratch with --config.model.pretrained=''."
        )


def load_pretrained(variables: dict, path: str) -> dict:
    """Replaces the backbone weights: torchvision file, or a workdir of this project.

    A workdir's latest checkpoint gives its backbone (e.g. a CPU backbone
    pre-trained on other classes); a .safetensors / .pth file gives torchvision
    ImageNet weights.
    """
    path = os.path.expanduser(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(path), "checkpoints"), item_names=("state", "meta")
        )
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"config.model.pretrained={path} has no checkpoint under {path}/checkpoints."
            )
        saved = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
            "state"
        ]
        variables = dict(variables)
        for collection in ("params", "batch_stats"):
            target = variables[collection]["backbone"]
            source = saved[collection]["backbone"]
            if jax.tree.structure(target) != jax.tree.structure(source) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(source))
            ):
                raise ValueError(
                    f"The backbone in {path} does not match config.model.backbone="
                    "(different architecture or width): pre-train with the same backbone."
                )
            variables[collection] = {
                **variables[collection],
                "backbone": jax.tree.map(jnp.asarray, source),
            }
        return variables
    return pretrained.load_pretrained_backbone(path, variables)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    num_classes: int,
) -> TrainState:
    """Builds the initial state (with pretrained backbone weights when configured)."""
    rng = jax.random.PRNGKey(config.seed)
    init_rng, state_rng = jax.random.split(rng)
    variables = init_variables(model, config, init_rng)
    if config.model.pretrained:
        variables = load_pretrained(variables, config.model.pretrained)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    protos = None
    if config.model.name == "mlcnc":
        protos = prototypes.init_prototypes(num_classes, config.model.proj_dim)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        etf=variables.get("etf", {}),
        opt_state=tx.init(params),
        ema={"params": params, "batch_stats": batch_stats},
        prototypes=protos,
        rng=state_rng,
    )
    # Every leaf its own buffer (the EMA starts as the weights, zeros may be shared):
    # the train step donates the state, and a buffer must not be donated twice.
    return jax.tree.map(jnp.copy, state)


def compute_losses(
    outputs: dict[str, jax.Array],
    labels: jax.Array,
    *,
    loss_config: ml_collections.ConfigDict,
    proto_state: Any,
    in_warmup: jax.Array,
    class_freq: np.ndarray,
    num_train: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the configured loss terms, and each term.

    Terms with weight 0 are not computed. During warm-up, the total is FLA
    alone with weight `loss.warmup_fla` (the reference code's schedule).

    Returns:
      (total loss, {term name: value}).
    """
    c = loss_config
    logits = outputs["logits"]
    terms = {}
    if c.two_way:
        terms["two_way"] = losses.two_way_loss(logits, labels, tp=c.two_way_tp, tn=c.two_way_tn)
    if c.bce:
        terms["bce"] = losses.bce_loss(logits, labels)
    if c.focal:
        terms["focal"] = losses.focal_loss(logits, labels)
    if c.asl:
        terms["asl"] = losses.asymmetric_loss(logits, labels)
    if c.db:
        terms["db"] = losses.distribution_balanced_loss(
            logits, labels, jnp.asarray(class_freq), num_train
        )
    has_head = "class_features" in outputs
    if has_head and (c.fla or c.warmup_epochs):
        terms["fla"] = losses.alignment_loss(
            outputs["class_features"], outputs["label_embedding"], labels
        )
    if has_head and c.fpc:
        protos, valid = prototypes.current(proto_state, c.prototypes)
        terms["fpc"] = losses.calibration_loss(
            outputs["projected"], protos, labels, tau=c.fpc_tau, valid=valid
        )
    weights = {name: getattr(c, name) for name in terms}
    total = sum(weights[name] * value for name, value in terms.items())
    if "fla" in terms:
        total = jnp.where(in_warmup, c.warmup_fla * terms["fla"], total)
    return total, terms


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    schedule: Schedule,
    lr_schedule: Callable,
    class_freq: np.ndarray,
    num_train: int,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch.

    Under jit the batch is the global batch. Under pmap (`axis_name` set) each
    device holds a shard: the model outputs are all-gathered so every loss sees
    the global batch, and gradients are averaged with `lax.pmean` (the
    all-gather's transpose sums the cotangents of the replicated loss, so the
    mean is the global gradient).

    Returns:
      (new state, metrics) with the total loss, each term and the learning rate.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    labels = batch["labels"]
    in_warmup = state.step < schedule.warmup_steps

    def loss_fn(params):
        variables = {
            "params": params,
            "batch_stats": state.batch_stats,
            **({"etf": state.etf} if state.etf else {}),
        }
        outputs, mutated = model.apply(
            variables, batch["image"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        gathered = {k: outputs[k] for k in _LOSS_OUTPUTS if k in outputs}
        all_labels = labels
        if axis_name is not None:
            gathered = jax.lax.all_gather(gathered, axis_name, tiled=True)
            all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
        if "label_embedding" in outputs:
            gathered["label_embedding"] = outputs["label_embedding"]
        total, terms = compute_losses(
            gathered,
            all_labels,
            loss_config=config.loss,
            proto_state=state.prototypes,
            in_warmup=in_warmup,
            class_freq=class_freq,
            num_train=num_train,
        )
        return total, (total, terms, gathered, all_labels, mutated.get("batch_stats", {}))

    grads, (total, terms, outputs, all_labels, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params
    )
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    decay = config.train.ema_decay
    ema = jax.tree.map(
        lambda e, p: decay * e + (1.0 - decay) * p,
        state.ema,
        {"params": params, "batch_stats": batch_stats},
    )

    protos = state.prototypes
    if protos is not None:
        protos = prototypes.accumulate(protos, outputs["projected"], all_labels)
        epoch_end = (state.step + 1) % schedule.steps_per_epoch == 0
        ended = prototypes.end_epoch(protos)
        protos = jax.tree.map(lambda a, b: jnp.where(epoch_end, a, b), ended, protos)

    step_metrics = {
        "loss": total,
        **{f"loss_{k}": v for k, v in terms.items()},
        "learning_rate": lr_schedule(state.step),
    }
    if "logit_scale" in params:
        step_metrics["logit_scale"] = jnp.reshape(params["logit_scale"], ())

    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema=ema,
        prototypes=protos,
    )
    return new_state, step_metrics


def compile_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    schedule: Schedule,
    lr_schedule: Callable,
    class_freq: np.ndarray,
    num_train: int,
    axis_name: str | None = None,
) -> Callable:
    """`train_step` bound to its settings and compiled, the state donated.

    jax.jit by default; jax.pmap over the local devices when `axis_name` is given.
    """
    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        config=config,
        schedule=schedule,
        lr_schedule=lr_schedule,
        class_freq=class_freq,
        num_train=num_train,
        axis_name=axis_name,
    )
    if axis_name:
        return jax.pmap(step_fn, axis_name=axis_name, donate_argnums=(0,))
    return jax.jit(step_fn, donate_argnums=(0,))


def eval_step(variables: dict, images: jax.Array, *, model: nn.Module) -> dict[str, jax.Array]:
    """Scores (sigmoid of the logits) and the features used for the neural-collapse measures."""
    outputs = model.apply(variables, images, train=False)
    result = {"scores": jax.nn.sigmoid(outputs["logits"].astype(jnp.float32))}
    result["features"] = (
        outputs["class_features"] if "class_features" in outputs else outputs["features"]
    )
    return result


class Trainer:
    """Builds everything a run needs from a config; trains, evaluates and restores.

    Args:
      config: the experiment config.
      workdir: where checkpoints, summaries and reports go.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        from mlcnc_jax.data import sources

        self.config = config
        self.workdir = storage.resolve(workdir)
        self.is_main = jax.process_index() == 0
        if self.is_main:
            storage.makedirs(self.workdir)
        parallel.check_batch_size(config.train.batch_size)
        parallel.check_batch_size(config.eval.batch_size)
        if config.parallel not in ("jit", "pmap"):
            raise ValueError(f"Unknown config.parallel {config.parallel!r}: use 'jit' or 'pmap'.")

        check_pretrained_path(config)  # before the (possibly slow) dataset checks
        self.dataset = sources.load_dataset(config)
        self.num_classes = self.dataset.num_classes
        self.schedule = make_schedule(config, self.dataset.train.labels)
        self.mesh = parallel.make_mesh()
        self.axis_name = parallel.AXIS if config.parallel == "pmap" else None
        self.model = create_model(config, self.num_classes, axis_name=self.axis_name)
        self.eval_model = create_model(config, self.num_classes) if self.axis_name else self.model
        self.tx, self.lr_schedule = create_optimizer(config, self.schedule.total_steps)
        self.checkpointer = checkpoint.Checkpointer(
            self.workdir,
            model_fingerprint(config, self.dataset.class_names),
            keep=config.train.keep_checkpoints,
            keep_best=config.train.keep_best,
        )
        self._train_step = compile_train_step(
            self.model,
            self.tx,
            config,
            self.schedule,
            self.lr_schedule,
            self.dataset.class_freq,
            len(self.dataset.train),
            axis_name=self.axis_name,
        )
        self._eval_step = jax.jit(functools.partial(eval_step, model=self.eval_model))

    # ----------------------------------------------------------------- state
    def initial_state(self) -> TrainState:
        """The freshly initialised state, or the latest checkpoint's when there is one."""
        state = create_train_state(self.config, self.model, self.tx, self.num_classes)
        if self.checkpointer.latest_step() is not None:
            state = self.checkpointer.restore(state)
            logging.info(
                "Resumed from %s at step %d.", self.checkpointer.directory, int(state.step)
            )
        return state

    def _place(self, state: TrainState) -> TrainState:
        return (
            parallel.pmap_replicate(state)
            if self.axis_name
            else parallel.replicate(state, self.mesh)
        )

    def _unplace(self, state: TrainState) -> TrainState:
        return parallel.unreplicate(state) if self.axis_name else state

    def _shard(self, batch: dict[str, np.ndarray]) -> dict:
        return parallel.to_pmap(batch) if self.axis_name else parallel.to_global(batch, self.mesh)

    # ----------------------------------------------------------------- train
    def train(self) -> dict:
        """Trains to the end of the schedule, evaluating and checkpointing on the way.

        Returns:
          The last evaluation's results (see `evaluate`).
        """
        # clu's writers import TensorFlow: only the training loop needs them.
        from clu import metric_writers, parameter_overview, periodic_actions

        from mlcnc_jax.data import pipeline

        config, schedule = self.config, self.schedule
        writer = metric_writers.create_default_writer(self.workdir, just_logging=not self.is_main)
        state = self.initial_state()
        start = int(state.step)
        if start == 0 and self.is_main:
            parameter_overview.log_parameter_overview(state.params)
            writer.write_hparams(_flat_hparams(config))
        logging.info(
            "Training %d steps (%d per epoch, warm-up %d) from step %d on %d device(s), global batch %d.",
            schedule.total_steps,
            schedule.steps_per_epoch,
            schedule.warmup_steps,
            start,
            jax.device_count(),
            config.train.batch_size,
        )
        batches = pipeline.train_batches(
            self.dataset.train, config, global_batch=config.train.batch_size, start_step=start
        )
        hooks = []
        if self.is_main:
            hooks.append(
                periodic_actions.ReportProgress(
                    num_train_steps=schedule.total_steps,
                    writer=writer,
                    every_steps=config.train.log_every_steps,
                )
            )
        eval_every = max(1, config.train.eval_every_epochs * schedule.steps_per_epoch)
        placed = self._place(state)
        del state
        results = {}
        pending: list[dict] = []
        for step in range(start, schedule.total_steps):
            batch = self._shard(next(batches))
            placed, step_metrics = self._train_step(placed, batch)
            # Waiting on each step keeps XLA's CPU collectives from deadlocking and
            # lets a NaN stop the run before it reaches a checkpoint.
            step_metrics = jax.tree.map(
                lambda x: np.asarray(x).reshape(-1)[0], jax.device_get(step_metrics)
            )
            if not np.isfinite(step_metrics["loss"]):
                raise FloatingPointError(
                    f"The loss became {step_metrics['loss']} at step {step + 1} "
                    f"(terms: { {k: float(v) for k, v in step_metrics.items()} }). The run stopped; the last "
                    f"good checkpoint in {self.checkpointer.directory} is kept. Lower "
                    "--config.train.learning_rate or check the data."
                )
            pending.append(step_metrics)
            done = step + 1
            for hook in hooks:
                hook(done)
            if done % config.train.log_every_steps == 0 or done == schedule.total_steps:
                means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
                writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()})
                pending = []
            last = done == schedule.total_steps
            if done % config.train.checkpoint_every_steps == 0 or last:
                self.checkpointer.save(done, self._unplace(placed))
            if done % eval_every == 0 or last:
                results = self.evaluate(self._unplace(placed), writer=writer)
                self.checkpointer.save_best(
                    done, self._unplace(placed), results["raw"]["map"]["total"]
                )
        writer.flush()
        if start >= schedule.total_steps:
            results = self.evaluate(self._unplace(placed), writer=writer)
        return results

    # -------------------------------------------------------------- evaluate
    def predict_scores(
        self, variables: dict, split
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scores every image of `split` exactly once.

        Returns:
          (scores [N,K], labels [N,K], pair features [M,D], pair labels [M,K]):
          the features of each positive (image, class) pair (or of each image
          and its labels, for the baseline) for the neural-collapse measures.
        """
        from mlcnc_jax.data import pipeline

        variables = parallel.replicate(variables, self.mesh)
        scores, labels, feats, feat_labels = [], [], [], []
        for batch in pipeline.eval_batches(
            split, self.config, global_batch=self.config.eval.batch_size
        ):
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

    def evaluate(self, state: TrainState, writer: Any = None) -> dict:
        """mAP (total/head/medium/tail) for the raw and EMA weights, per-class AP and NC measures.

        Writes `eval_<step>.json` and `ap_vs_freq_<step>.png` to the workdir (process 0).
        """
        step = int(state.step)
        split = self.dataset.test
        class_split = self.dataset.class_split
        etf = {"etf": state.etf} if state.etf else {}
        results: dict[str, Any] = {"step": step}
        t0 = time.time()
        for name, weights in (
            ("raw", {"params": state.params, "batch_stats": state.batch_stats}),
            ("ema", state.ema),
        ):
            scores, labels, feats, feat_labels = self.predict_scores({**weights, **etf}, split)
            if len(scores) != len(split):
                raise RuntimeError(f"Scored {len(scores)} test images, expected {len(split)}.")
            ap = metrics.average_precision(scores, labels)
            results[name] = {
                "map": metrics.lt_map(scores, labels, class_split),
                "ap": ap,
                "neural_collapse": metrics.neural_collapse(feats, feat_labels),
            }
        results["num_images_scored"] = int(len(scores))
        results["num_images_expected"] = int(len(split))
        logging.info(
            "Step %d eval (%.1fs): mAP raw %s | EMA %s",
            step,
            time.time() - t0,
            _fmt_map(results["raw"]["map"]),
            _fmt_map(results["ema"]["map"]),
        )
        if self.is_main:
            if writer is not None:
                scalars = {}
                for name in ("raw", "ema"):
                    scalars.update(
                        {f"eval/{name}_map_{g}": v for g, v in results[name]["map"].items()}
                    )
                    scalars.update(
                        {f"eval/{name}_{k}": v for k, v in results[name]["neural_collapse"].items()}
                    )
                writer.write_scalars(step, scalars)
                writer.flush()
            reports.write_eval_report(
                self.workdir,
                results,
                class_names=self.dataset.class_names,
                class_freq=self.dataset.class_freq,
                class_split=class_split,
                dataset=self.dataset.name,
            )
        return results


def _fmt_map(m: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in m.items())


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
    flat = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk("", config.to_dict())
    return flat


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the configured model and returns the final evaluation."""
    return Trainer(config, workdir).train()


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Scores the latest checkpoint of `workdir` on the test split."""
    trainer = Trainer(config, workdir)
    if trainer.checkpointer.latest_step() is None:
        raise FileNotFoundError(
            f"No checkpoint in {trainer.checkpointer.directory}: train first (--mode=train)."
        )
    return trainer.evaluate(trainer.initial_state())
