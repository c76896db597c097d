"""A run's cost on paper: XLA's FLOP count of the compiled step x steps, at a stated utilisation.

The budget of a run on one accelerator is

    train   = train-step FLOPs x total steps / (MFU x peak FLOP/s)
    eval    = eval-step FLOPs x eval batches per pass x passes / (MFU x peak FLOP/s)
    save    = train-state bytes x checkpoints written / disk bandwidth

The FLOP counts are XLA's cost analysis of the project's compiled train step
(`step.compile_train_step`) and eval step (`step.eval_step`) for the config's model
settings and compute dtype (bfloat16 in the reference recipes). Compiling ResNet-50 takes
20-60 s on a 2-core CPU, too slow for `--mode=plan`, so they are measured once
(`python -m benchmarks.step_flops`) and stored in step_flops.json beside this module,
keyed by `model_key`; `--mode=plan` reads them and prints the budget for any config
whose key is stored.

The model-FLOP utilisation (MFU) is not guessed: it is the one that published ResNet-50
training throughputs imply (`reference_mfu`). ResNet-50's forward pass is about 4.1 G
multiply-accumulates per 224 px image (often quoted as "4.1 GFLOP"); XLA counts two FLOPs
per multiply-accumulate, and training costs about 3x the forward pass, so a training image
is about 24.6 GFLOP in XLA's units (XLA itself counts 25 for ResNet-50 + the MLC-NC head).
About 3,000 images/s on one H100 (MLPerf-class, mixed precision) is then 74 TFLOP/s, 7.5 %
of the H100's dense bfloat16 peak of 989 TFLOP/s; 2,500 images/s on one A100 is 20 % of its
312 TFLOP/s. ResNet-50 keeps an H100's tensor cores far less busy than an A100's (its
BatchNorm, ReLU and small convolutions are bound by memory bandwidth, which grew 1.6x while
the dense peak grew 3.2x), so the H100's own figure is the one used. That MFU is
MLPerf-class speed, which an untuned loop does not reach: read the hours as a floor.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

STEP_FLOPS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_flops.json")
REGENERATE = "python -m benchmarks.step_flops --config=CONFIG"

# Published ResNet-50 (224 px) figures the MFU is derived from.
RESNET50_FORWARD_MACS = 4.1e9  # multiply-accumulates per image, forward
FLOPS_PER_MAC = 2  # XLA's cost analysis counts a multiply-accumulate as 2 FLOPs
TRAIN_OVER_FORWARD = 3  # forward + backward (gradients of activations and of weights)
RESNET50_TRAIN_FLOPS_PER_IMAGE = RESNET50_FORWARD_MACS * FLOPS_PER_MAC * TRAIN_OVER_FORWARD
# Dense bfloat16 peak FLOP/s (data sheets, SXM parts) and published training images/s.
REFERENCE_ACCELERATORS = {
    "H100": {"peak_flops": 989e12, "images_per_s": 3000.0},
    "A100": {"peak_flops": 312e12, "images_per_s": 2500.0},
}
ACCELERATOR = "H100"
# Sustained write bandwidth assumed for checkpoints: a local NVMe SSD writes 2-3 GB/s,
# network and cloud disks often 0.2-1 GB/s; 1 GB/s sits between them.
DISK_BYTES_PER_S = 1e9


def reference_mfu(accelerator: str = ACCELERATOR) -> float:
    """The MFU that the published ResNet-50 training throughput implies on `accelerator`."""
    ref = REFERENCE_ACCELERATORS[accelerator]
    return ref["images_per_s"] * RESNET50_TRAIN_FLOPS_PER_IMAGE / ref["peak_flops"]


def _active_losses(config: ml_collections.ConfigDict) -> str:
    # Every registered loss term with a non-zero weight (terms the model cannot feed are
    # skipped by the objective alike for every key, so they need no special case here).
    from mlcnc_jax import objective

    names = [name for name in objective.TERMS if float(config.loss.get(name, 0.0))]
    return "+".join(names) or "none"


def model_key(config: ml_collections.ConfigDict, num_classes: int) -> str:
    """The settings that fix the compiled step's FLOPs, as one string.

    Model (name, backbone, head sizes, attention, classifier, classes), input (image size,
    batch sizes), compute dtype and which loss terms are computed. Optimizer settings,
    learning rates and loss weights change no FLOP count that matters and are left out.
    """
    m = config.model
    return (
        f"{m.name}/{m.backbone}/{int(config.data.image_size)}px/{config.dtype}"
        f"/K{int(num_classes)}/D{int(m.embed_dim)}/p{int(m.proj_dim)}/h{int(m.num_heads)}"
        f"/{m.attention}/{m.classifier}/losses={_active_losses(config)}"
        f"/batch{int(config.train.batch_size)}/eval{int(config.eval.batch_size)}"
    )


def load_step_flops(path: str = STEP_FLOPS_FILE) -> dict[str, dict]:
    """The stored measurements, by `model_key` ({} when the file is missing)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["entries"]


def stored_step_flops(
    config: ml_collections.ConfigDict, num_classes: int, path: str = STEP_FLOPS_FILE
) -> dict | None:
    """The stored measurement for this config's model settings, or None."""
    return load_step_flops(path).get(model_key(config, num_classes))


def budget(
    *,
    train_step_flops: float,
    total_steps: int,
    eval_step_flops: float,
    eval_batches_per_pass: int,
    eval_passes: int,
    state_bytes: float,
    checkpoints: int,
    mfu: float | None = None,
    peak_flops: float | None = None,
    disk_bytes_per_s: float = DISK_BYTES_PER_S,
) -> dict[str, float]:
    """Hours of training, evaluation and checkpoint writes on one accelerator.

    Args:
      train_step_flops: FLOPs of one train step (the whole global batch).
      total_steps: train steps of the run.
      eval_step_flops: FLOPs of one eval step (one padded batch).
      eval_batches_per_pass: eval batches per pass over the test split (padding included).
      eval_passes: passes over the test split (evaluations x 2: raw and EMA weights).
      state_bytes: bytes of the train state that a checkpoint writes.
      checkpoints: checkpoints written.
      mfu: model-FLOP utilisation (default: `reference_mfu()`).
      peak_flops: the accelerator's peak FLOP/s (default: the H100's dense bfloat16).
      disk_bytes_per_s: sustained checkpoint write bandwidth.

    Returns:
      {'mfu', 'peak_flops', 'disk_bytes_per_s', 'train_hours', 'eval_hours',
      'checkpoint_hours', 'hours'}.
    """
    mfu = reference_mfu() if mfu is None else float(mfu)
    peak = REFERENCE_ACCELERATORS[ACCELERATOR]["peak_flops"] if peak_flops is None else peak_flops
    if not 0.0 < mfu <= 1.0 or peak <= 0 or disk_bytes_per_s <= 0:
        raise ValueError(
            f"budget: mfu must be in (0, 1] and peak_flops, disk_bytes_per_s > 0; got mfu={mfu}, "
            f"peak_flops={peak}, disk_bytes_per_s={disk_bytes_per_s}."
        )
    sustained = mfu * peak
    train_s = train_step_flops * total_steps / sustained
    eval_s = eval_step_flops * eval_batches_per_pass * eval_passes / sustained
    save_s = state_bytes * checkpoints / disk_bytes_per_s
    return {
        "mfu": mfu,
        "peak_flops": peak,
        "disk_bytes_per_s": disk_bytes_per_s,
        "train_hours": train_s / 3600.0,
        "eval_hours": eval_s / 3600.0,
        "checkpoint_hours": save_s / 3600.0,
        "hours": (train_s + eval_s + save_s) / 3600.0,
    }


def plan_budget(
    config: ml_collections.ConfigDict, plan: dict[str, Any], path: str = STEP_FLOPS_FILE
) -> dict | None:
    """The budget of a `plan.make_plan` result from the stored FLOPs, or None if not stored."""
    stored = stored_step_flops(config, plan["num_classes"], path)
    if stored is None:
        return None
    # Padded eval batches: the padding rows are computed too.
    eval_batches = math.ceil(plan["test_images"] / stored["eval_batch_size"])
    result = budget(
        train_step_flops=stored["train_step_flops"],
        total_steps=plan["total_steps"],
        eval_step_flops=stored["eval_step_flops"],
        eval_batches_per_pass=eval_batches,
        eval_passes=plan["eval_passes"],
        state_bytes=stored["state_bytes"],
        checkpoints=plan["checkpoints"],
    )
    return {
        "accelerator": ACCELERATOR,
        "train_step_flops": stored["train_step_flops"],
        "eval_step_flops": stored["eval_step_flops"],
        "eval_batches_per_pass": eval_batches,
        "state_bytes": stored["state_bytes"],
        **result,
    }


# ----------------------------------------------------------------------------- measuring


def measure_step_flops(config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """XLA's FLOP counts of the compiled train and eval steps, and the train state's bytes.

    Nothing is initialised or run: the state is abstract (`jax.eval_shape`), the steps are
    lowered and compiled for the default backend, and the compiled programs' cost analysis
    gives the FLOPs. No weights are loaded (`model.pretrained` is ignored).

    Args:
      config: the experiment config (model, dtype, image size, batch sizes, losses).
      num_classes: K.

    Returns:
      {'key', 'train_step_flops', 'eval_step_flops', 'state_bytes', 'batch_size',
      'eval_batch_size', 'image_size', 'compile_s', 'backend', 'jax'}.
    """
    import functools
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mlcnc_jax import objective, optim, step
    from mlcnc_jax.models import create_model, get_family
    from mlcnc_jax.state import initial_train_state

    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: no pretrained file
    config.model.pretrained = ""
    k, size = int(num_classes), int(config.data.image_size)
    batch, eval_batch = int(config.train.batch_size), int(config.eval.batch_size)
    model = create_model(config, k)
    tx, lr_schedule = optim.create_optimizer(config, total_steps=10**6)
    loss_fn = objective.make_objective(
        config.loss, objective.ClassStats(np.ones(k), num_train=1000), warmup_steps=1
    )
    train_step = step.compile_train_step(
        model,
        tx,
        loss_fn,
        lr_schedule,
        family=get_family(config.model.name),
        steps_per_epoch=1000,
        ema_decay=config.train.ema_decay,
    )
    state = jax.eval_shape(lambda: initial_train_state(config, model, tx, k))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch, k), jnp.float32)
    t0 = time.perf_counter()
    train_cost = train_step.lower(state, {"image": images, "labels": labels}).compile()
    eval_fn = jax.jit(
        functools.partial(step.eval_step, model=model, family=get_family(config.model.name))
    )
    eval_images = jax.ShapeDtypeStruct((eval_batch, size, size, 3), jnp.float32)
    eval_cost = eval_fn.lower(state.variables(), eval_images).compile()
    compile_s = time.perf_counter() - t0
    state_bytes = sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state)
    )
    return {
        "key": model_key(config, k),
        "train_step_flops": _flops(train_cost.cost_analysis()),
        "eval_step_flops": _flops(eval_cost.cost_analysis()),
        "state_bytes": int(state_bytes),
        "batch_size": batch,
        "eval_batch_size": eval_batch,
        "image_size": size,
        "compile_s": round(compile_s, 1),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }


def _flops(cost: Any) -> float:
    # cost_analysis() gives a dict (a list of one dict in older jax).
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA's cost analysis gave no FLOP count on this backend.")
    return float(cost["flops"])
