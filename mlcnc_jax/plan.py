"""--mode=plan: what a config's run will cost, computed from the training split alone.

Prints the steps per epoch, total and warm-up steps, the learning-rate peak, images
seen, evaluation passes, an estimate of accelerator-hours at the throughput in
`config.plan` and, for model settings whose XLA FLOP count is stored (`budget`), the
budget on paper on one H100, then one JSON line. Nothing is compiled or trained, so it
runs on any machine that can read the dataset's annotations.
"""

from __future__ import annotations

import json
import math

import ml_collections
import numpy as np

from mlcnc_jax.errors import UserError


def make_plan(config: ml_collections.ConfigDict, train_labels: np.ndarray, num_test: int) -> dict:
    """The budget of a run of `config`.

    Evaluations follow the training loop: every `train.eval_every_epochs` epochs and
    at the last step, each scoring the test split twice (raw and EMA weights).
    Accelerator-hours assume the `config.plan` throughputs on one accelerator and
    linear scaling (N accelerators: the same accelerator-hours in 1/N of the time).
    'budget' is the budget on paper on one H100 (`budget.plan_budget`: the stored XLA
    FLOP counts of the compiled steps at the MFU of published ResNet-50 throughputs), or
    None when no FLOP count is stored for `budget_key`.

    Args:
      config: the experiment config.
      train_labels: [N, K] multi-hot training labels (they set the class-aware epoch).
      num_test: number of test images.

    Returns:
      A JSON-able dict (see the keys below).
    """
    from mlcnc_jax import budget, state

    # The run's step counts (steps per epoch, total, warm-up), as the training loop takes them.
    counts = state.step_counts(config, train_labels)
    t = config.train
    batch = int(t.batch_size)
    total = counts.total_steps
    eval_every = max(1, int(t.eval_every_epochs) * counts.steps_per_epoch)
    evaluations = total // eval_every + (1 if total % eval_every else 0)
    images_seen = total * batch
    eval_images = evaluations * 2 * int(num_test)
    train_rate = float(config.plan.train_images_per_second)
    eval_rate = float(config.plan.eval_images_per_second)
    if train_rate <= 0 or eval_rate <= 0:
        raise UserError(
            "config.plan.train_images_per_second and eval_images_per_second must be > 0."
        )
    train_hours = images_seen / train_rate / 3600.0
    eval_hours = eval_images / eval_rate / 3600.0
    p = {
        "dataset": config.data.name,
        "recipe": config.recipe,
        "recipe_changes": _recipe_changes(config),
        "num_classes": int(np.asarray(train_labels).shape[1]),
        "train_images": int(np.asarray(train_labels).shape[0]),
        "test_images": int(num_test),
        "sampling": config.data.sampling,
        "batch_size": batch,
        "steps_per_epoch": counts.steps_per_epoch,
        "epochs": int(t.num_epochs),
        "total_steps": total,
        "warmup_steps": counts.warmup_steps,
        # torch's OneCycleLR: the peak at step pct_start * T - 1 (0-based).
        "lr_peak_step": (
            max(0.0, t.warmup_fraction * total - 1.0) if t.schedule == "one_cycle" else None
        ),
        "images_seen": images_seen,
        "evaluations": evaluations,
        "eval_passes": 2 * evaluations,
        "eval_images": eval_images,
        "checkpoints": math.ceil(total / max(1, int(t.checkpoint_every_steps))),
        "train_images_per_second": train_rate,
        "eval_images_per_second": eval_rate,
        "accelerator_hours_train": train_hours,
        "accelerator_hours_eval": eval_hours,
        "accelerator_hours": train_hours + eval_hours,
    }
    p["budget_key"] = budget.model_key(config, p["num_classes"])
    p["budget"] = budget.plan_budget(config, p)
    return p


def _recipe_changes(config: ml_collections.ConfigDict) -> dict:
    from mlcnc_jax import configuration

    differences = configuration.recipe_differences(config)
    return {k: {"recipe": a, "config": b} for k, (a, b) in differences.items()}


def format_plan(p: dict) -> str:
    """The plan as a few lines of text for a person."""
    changes = p["recipe_changes"]
    lines = [
        f"dataset {p['dataset']}: {p['train_images']} training images, {p['test_images']} test "
        f"images, {p['num_classes']} classes",
        f"recipe {p['recipe']}"
        + (
            "; changed: "
            + ", ".join(f"{k}={v['config']} (recipe {v['recipe']})" for k, v in changes.items())
            if changes
            else ""
        ),
        f"epoch: {p['steps_per_epoch']} steps of {p['batch_size']} ({p['sampling']} sampling); "
        f"{p['epochs']} epochs = {p['total_steps']} steps, warm-up {p['warmup_steps']} steps",
    ]
    if p["lr_peak_step"] is not None:
        lines.append(f"learning-rate peak at step {p['lr_peak_step']:g} (one-cycle)")
    lines += [
        f"images seen: {p['images_seen']:,}",
        f"evaluations: {p['evaluations']} ({p['eval_passes']} passes, raw and EMA, "
        f"{p['eval_images']:,} images)",
        f"checkpoints written: {p['checkpoints']}",
        f"estimate: {p['accelerator_hours']:.2f} accelerator-hours "
        f"(train {p['accelerator_hours_train']:.2f} at {p['train_images_per_second']:g} images/s, "
        f"eval {p['accelerator_hours_eval']:.2f} at {p['eval_images_per_second']:g} images/s; "
        "set --config.plan.train_images_per_second / eval_images_per_second to your measured rates)",
        _format_budget(p),
    ]
    return "\n".join(lines)


def _format_budget(p: dict) -> str:
    b = p.get("budget")
    if b is None:
        from mlcnc_jax import budget

        return (
            f"budget on paper: no XLA FLOP count stored for these model settings "
            f"({p.get('budget_key')}); measure it with `{budget.REGENERATE}` "
            "(add --num_classes=K for a dataset other than coco_lt / voc_lt)"
        )
    sustained = b["mfu"] * b["peak_flops"]
    return (
        f"budget on paper, one {b['accelerator']}: {b['hours']:.2f} hours (train "
        f"{b['train_hours']:.2f} + eval {b['eval_hours']:.2f} + checkpoint writes "
        f"{b['checkpoint_hours']:.3f})\n"
        f"  train: {p['total_steps']:,} steps x {b['train_step_flops'] / 1e12:.3f} TFLOP (XLA's "
        f"count of the compiled step); eval: {p['eval_passes']} passes x "
        f"{b['eval_batches_per_pass']} batches x {b['eval_step_flops'] / 1e12:.3f} TFLOP; both at "
        f"{100 * b['mfu']:.1f} % MFU ({sustained / 1e12:.0f} of {b['peak_flops'] / 1e12:.0f} "
        "TFLOP/s: what the published ~3,000 ResNet-50 training images/s imply; an untuned loop "
        f"takes longer); checkpoints: {p['checkpoints']} x {b['state_bytes'] / 1e6:.0f} MB at "
        f"{b['disk_bytes_per_s'] / 1e9:g} GB/s"
    )


def plan(config: ml_collections.ConfigDict) -> dict:
    """Loads the dataset's splits, prints the plan and a last JSON line, returns the plan."""
    from mlcnc_jax.data import sources

    dataset = sources.load_dataset(config)
    p = make_plan(config, dataset.train.labels, len(dataset.test))
    print(format_plan(p))
    print(json.dumps(p), flush=True)
    return p
