"""Trains MLC-NC on `synthetic_lt` from in-memory numpy batches: the GPU end-to-end check.

GPU hosts may lack TensorFlow, so this check never imports it: the images come
from an .npz file of JPEG bytes rendered beforehand (with `--make_data`, on a
machine that has the project's data dependencies), are decoded once with Pillow,
augmented in numpy (random crop after reflect padding, horizontal flip) and drawn
by a numpy class-aware sampler. Training uses the project's model, losses,
optimizer, TrainState and `train.train_step` under `jax.jit`; evaluation scores
the test images with `train.eval_step` and `metrics.lt_map`.

The check passes when the total loss falls after the FLA warm-up (mean of the
last 20 steps below the mean of the first 20 after warm-up) and the test mAP
beats chance (the mean mAP of random scores) by `--min_gain` points.

    # once, where the project's data dependencies are installed (writes ~30 MiB):
    python benchmarks/gpu_train_check.py --make_data benchmarks/cache/gpu_check/synthetic_lt_224.npz
    # on the GPU (what benchmarks/gpu_check.sh runs):
    python benchmarks/gpu_train_check.py --data benchmarks/cache/gpu_check/synthetic_lt_224.npz
    # the same code path on CPU in seconds: resnet_small, 32 px, a few steps
    python benchmarks/gpu_train_check.py --smoke [--data FILE]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_DATA = "benchmarks/cache/gpu_check/synthetic_lt_224.npz"


# ----------------------------------------------------------------------------- data file


def make_data(path: str, image_size: int = 224, num_test: int = 800, quality: int = 90) -> None:
    """Renders synthetic_lt ('target', seed 0) and writes it as JPEG bytes in an .npz.

    The whole long-tailed train split is kept (its class counts define head /
    medium / tail); the test split is cut to its first `num_test` images (the
    test anchors are in random order, so every class keeps about the same share).

    Args:
      path: output .npz file.
      image_size: image side in pixels.
      num_test: test images kept.
      quality: JPEG quality.
    """
    from PIL import Image

    from mlcnc_jax.data import dataset as dataset_lib
    from mlcnc_jax.data import synthetic  # imports TensorFlow: only here, never on the GPU

    arrays = {}
    for split, limit in (("train", None), ("test", num_test)):
        blobs, labels = [], []
        for i, (_, png, row) in enumerate(synthetic.generate("target", image_size, 0, split)):
            if limit is not None and i >= limit:
                break
            buf = io.BytesIO()
            Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=quality)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
            labels.append(row)
        arrays[f"{split}_bytes"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.stack(labels).astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(
        path,
        **arrays,
        class_names=np.array(synthetic.CLASS_SETS["target"]),
        image_size=np.int64(image_size),
        head_min=np.int64(dataset_lib.HEAD_MIN),
        tail_max=np.int64(dataset_lib.TAIL_MAX),
    )
    size = os.path.getsize(path) / 2**20
    print(
        f"Wrote {path}: {len(arrays['train_labels'])} train + {len(arrays['test_labels'])} test "
        f"images at {image_size} px, {size:.1f} MiB"
    )


def _decode(data, split: str, size: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    blob, offsets, labels = (
        data[f"{split}_bytes"],
        data[f"{split}_offsets"],
        data[f"{split}_labels"],
    )
    n = len(labels) if limit is None else min(limit, len(labels))
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        images[i] = np.asarray(img)
    return images, labels[:n].astype(np.float32)


def load_data(path: str, image_size: int, limit: int | None = None) -> dict:
    """Decodes the .npz written by `make_data` into uint8 arrays (resized if asked).

    Returns:
      dict with train_images [N,S,S,3] uint8, train_labels [N,K] float32, the same
      for test, class_names, and class_split (head/medium/tail from all train labels).
    """
    from mlcnc_jax.data import dataset as dataset_lib  # numpy only

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: render it first with `python benchmarks/gpu_train_check.py "
            f"--make_data {path}` on a machine with the project's data dependencies."
        )
    with np.load(path) as data:
        train_images, train_labels = _decode(data, "train", image_size, limit)
        test_images, test_labels = _decode(data, "test", image_size, limit)
        freq = data["train_labels"].sum(0)
        split = dataset_lib.class_groups(freq, int(data["head_min"]), int(data["tail_max"]))
        names = [str(n) for n in data["class_names"]]
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "class_names": names,
        "class_split": split,
        "class_freq": freq,
    }


def random_data(image_size: int, num_classes: int = 6, n: int = 64) -> dict:
    """A tiny random dataset (for --smoke without a data file)."""
    rng = np.random.default_rng(0)
    labels = (rng.random((2 * n, num_classes)) < 0.3).astype(np.float32)
    labels[np.arange(2 * n), rng.integers(0, num_classes, 2 * n)] = 1.0
    images = rng.integers(0, 256, (2 * n, image_size, image_size, 3), dtype=np.uint8)
    freq = labels[:n].sum(0)
    return {
        "train_images": images[:n],
        "train_labels": labels[:n],
        "test_images": images[n:],
        "test_labels": labels[n:],
        "class_names": [f"class_{i}" for i in range(num_classes)],
        "class_split": {
            "head": [0, 1],
            "medium": [2, 3],
            "tail": list(range(4, num_classes)),
        },
        "class_freq": freq,
    }


def class_aware_indices(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` image indices: a class drawn uniformly, then one of its images uniformly."""
    by_class = [np.flatnonzero(labels[:, c] > 0.5) for c in range(labels.shape[1])]
    present = [c for c, idx in enumerate(by_class) if len(idx)]
    classes = rng.choice(present, size=count)
    return np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes])


def augment(images: np.ndarray, rng: np.random.Generator, pad_fraction: float = 0.125):
    """Random crop after reflect padding (1/8 of the side) and horizontal flip, in numpy."""
    n, s = images.shape[:2]
    pad = max(1, int(round(s * pad_fraction)))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.empty_like(images)
    ys, xs = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    flips = rng.random(n) < 0.5
    for i in range(n):
        crop = padded[i, ys[i] : ys[i] + s, xs[i] : xs[i] + s]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


# ----------------------------------------------------------------------------- training


def chance_map(labels: np.ndarray, class_split: dict, draws: int = 20) -> float:
    """Mean total mAP of uniformly random scores (what a model that learnt nothing gets)."""
    from mlcnc_jax import metrics

    rng = np.random.default_rng(0)
    return float(
        np.mean(
            [
                metrics.lt_map(rng.random(labels.shape), labels, class_split)["total"]
                for _ in range(draws)
            ]
        )
    )


def run_check(
    data: dict,
    *,
    backbone: str,
    image_size: int,
    batch_size: int,
    dtype: str,
    steps: int,
    warmup_steps: int,
    learning_rate: float,
    logit_scale_init: float,
    eval_batch_size: int,
    model_name: str = "mlcnc",
    min_gain: float,
    seed: int = 0,
) -> dict:
    """Trains with the project's train step and evaluates; returns the numbers and the verdict."""
    import jax
    import jax.numpy as jnp

    from configs.default import get_config
    from mlcnc_jax import metrics, train
    from mlcnc_jax.models import create_model

    num_classes = data["train_labels"].shape[1]
    config = get_config()
    config.seed = seed
    config.dtype = dtype
    config.model.backbone = backbone
    if backbone != "resnet_small":
        config.model.embed_dim = 768  # the paper's head for ResNet backbones
    config.data.image_size = image_size
    config.train.batch_size = batch_size
    config.train.learning_rate = learning_rate
    config.model.logit_scale_init = logit_scale_init
    if model_name == "baseline":
        # The sanity reference: pooled features, linear classifier, plain BCE.
        config.model.name = "baseline"
        config.loss.two_way, config.loss.fla, config.loss.fpc = 0.0, 0.0, 0.0
        config.loss.bce, config.loss.warmup_epochs = 1.0, 0
        warmup_steps = 0
    num_train = len(data["train_labels"])
    schedule = train.Schedule(
        steps_per_epoch=max(1, math.ceil(num_train / batch_size)),
        total_steps=steps,
        warmup_steps=warmup_steps,
    )
    model = create_model(config, num_classes)
    tx, lr_schedule = train.create_optimizer(config, schedule.total_steps)
    t0 = time.perf_counter()
    state = train.create_train_state(config, model, tx, num_classes)
    init_s = time.perf_counter() - t0
    step_fn = train.compile_train_step(
        model,
        tx,
        config,
        schedule,
        lr_schedule,
        np.asarray(data["class_freq"], np.float64),
        num_train,
    )
    eval_fn = jax.jit(functools.partial(train.eval_step, model=model))
    mean = jnp.asarray(config.data.mean, jnp.float32) * 255.0
    std = jnp.asarray(config.data.std, jnp.float32) * 255.0

    @jax.jit
    def normalize(images_u8):
        # On the device: the host ships uint8, a quarter of float32's bytes.
        return (images_u8.astype(jnp.float32) - mean) / std

    rng = np.random.default_rng(seed)
    losses, fla, scale, times = [], [], [], []
    t_start = time.perf_counter()
    compile_s = None
    for step in range(steps):
        idx = class_aware_indices(data["train_labels"], batch_size, rng)
        images = augment(data["train_images"][idx], rng)
        batch = {
            "image": normalize(jax.device_put(images)),
            "labels": jax.device_put(data["train_labels"][idx]),
        }
        t0 = time.perf_counter()
        state, step_metrics = step_fn(state, batch)
        step_metrics = jax.device_get(step_metrics)
        elapsed = time.perf_counter() - t0
        if compile_s is None:
            compile_s = elapsed
        else:
            times.append(elapsed)
        loss = float(step_metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss {loss} at step {step + 1}: {step_metrics}")
        losses.append(loss)
        fla.append(float(step_metrics.get("loss_fla", np.nan)))
        scale.append(float(step_metrics.get("logit_scale", np.nan)))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(
                f"step {step + 1}/{steps} loss {loss:.4f} fla {fla[-1]:.4f} "
                f"logit scale {scale[-1]:.3f} lr {float(step_metrics['learning_rate']):.2e}",
                flush=True,
            )
    train_s = time.perf_counter() - t_start

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if state.etf:
        variables["etf"] = state.etf
    test_images, test_labels = data["test_images"], data["test_labels"]
    scores = []
    t0 = time.perf_counter()
    for lo in range(0, len(test_images), eval_batch_size):
        chunk = test_images[lo : lo + eval_batch_size]
        n = len(chunk)
        if n < eval_batch_size:  # pad to one shape: one compilation
            chunk = np.concatenate(
                [chunk, np.zeros((eval_batch_size - n, *chunk.shape[1:]), chunk.dtype)]
            )
        out = eval_fn(variables, normalize(jax.device_put(chunk)))
        scores.append(np.asarray(out["scores"])[:n])
    eval_s = time.perf_counter() - t0
    scores = np.concatenate(scores)
    result_map = metrics.lt_map(scores, test_labels, data["class_split"])
    chance = chance_map(test_labels, data["class_split"])

    window = max(1, min(20, (steps - warmup_steps) // 3))
    after = losses[warmup_steps:]
    first, last = float(np.mean(after[:window])), float(np.mean(after[-window:]))
    checks = {
        "loss_falls": last < first,
        "map_beats_chance": result_map["total"] > chance + min_gain,
    }
    return {
        "device": f"{jax.devices()[0].platform} / {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "model": model_name,
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "dtype": dtype,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "learning_rate": learning_rate,
        "logit_scale_init": logit_scale_init,
        "logit_scale_last": scale[-1],
        "num_train": num_train,
        "num_test": len(test_labels),
        "init_s": init_s,
        "first_step_s (compile)": compile_s,
        "step_median_s": float(np.median(times)) if times else None,
        "train_s": train_s,
        "eval_s": eval_s,
        "loss_first_after_warmup": first,
        "loss_last": last,
        "fla_first": float(np.mean(fla[:window])),
        "fla_last": float(np.mean(fla[-window:])),
        "test_map": result_map,
        "chance_map": chance,
        "min_gain": min_gain,
        "checks": checks,
        "passed": all(checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--make_data", metavar="FILE", help="render synthetic_lt into FILE and exit"
    )
    parser.add_argument("--num_test", type=int, default=800, help="--make_data: test images kept")
    parser.add_argument("--data", default=DEFAULT_DATA, help="the .npz written by --make_data")
    parser.add_argument("--smoke", action="store_true", help="resnet_small, 32 px, a few steps")
    parser.add_argument(
        "--model",
        default="mlcnc",
        choices=["mlcnc", "baseline"],
        help="mlcnc (default config's losses) or baseline (pooled features, linear, BCE)",
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument(
        "--warmup_steps", type=int, default=90, help="FLA-only warm-up steps (5 epochs of 18)"
    )
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument(
        "--logit_scale_init",
        type=float,
        default=1.0,
        help="initial logit scale gamma (config.model.logit_scale_init)",
    )
    parser.add_argument("--eval_batch_size", type=int, default=100)
    parser.add_argument("--min_gain", type=float, default=5.0, help="mAP points above chance")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()

    if args.make_data:
        make_data(args.make_data, args.image_size, args.num_test)
        return 0
    if args.smoke:
        args.backbone, args.image_size, args.batch_size = "resnet_small", 32, 8
        args.steps, args.warmup_steps, args.eval_batch_size = 6, 2, 16
        if os.path.exists(args.data):
            data = load_data(args.data, args.image_size, limit=32)
        else:
            print(f"{args.data} not found: smoke run on random images", flush=True)
            data = random_data(args.image_size)
    else:
        t0 = time.perf_counter()
        data = load_data(args.data, args.image_size)
        print(
            f"Decoded {len(data['train_labels'])} train + {len(data['test_labels'])} test images "
            f"in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    result = run_check(
        data,
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        learning_rate=args.learning_rate,
        logit_scale_init=args.logit_scale_init,
        eval_batch_size=args.eval_batch_size,
        model_name=args.model,
        min_gain=args.min_gain,
    )
    result["tensorflow_imported"] = (
        "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.smoke:
        return 0  # a few steps prove the code path, not learning
    print("PASSED" if result["passed"] else f"FAILED: {result['checks']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
