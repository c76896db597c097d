"""Trains MLC-NC on `synthetic_lt` from in-memory numpy batches: the GPU end-to-end check.

GPU hosts may lack TensorFlow, so this check never imports it: the images come
from an .npz file of JPEG bytes rendered beforehand (with `--make_data`, on a
machine that has the project's data dependencies) and are decoded once with
Pillow. Everything else is the project's own code: the class-aware sampler
(`data.sampling`, through `data.arrays`), the model, optimizer, objective and
the `Trainer` with its train step, NaN guard and `Evaluator` (padded batches
with a mask). It reports images/s, step and compile time, peak memory and the
MFU against the bf16 dense peak (--peak_tflops).

The check passes when the total loss falls after the FLA warm-up (mean of the
last 20 steps below the mean of the first 20 after warm-up) and the test mAP
beats chance (the mean mAP of random scores) by `--min_gain` points.

    # once, where the project's data dependencies are installed (writes ~30 MiB):
    python -m benchmarks.gpu_train_check --make_data benchmarks/cache/gpu_check/synthetic_lt_224.npz
    # on the GPU (what benchmarks/gpu_check.sh runs):
    python -m benchmarks.gpu_train_check --data benchmarks/cache/gpu_check/synthetic_lt_224.npz
    # the same code path on CPU in seconds: resnet_small, 32 px, a few steps
    python -m benchmarks.gpu_train_check --smoke [--data FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time

import numpy as np

from benchmarks import common
from mlcnc_jax.reports import to_json

DEFAULT_DATA = "benchmarks/cache/gpu_check/synthetic_lt_224.npz"
# bfloat16 dense peak of the GPU the check was written for (H200 / H100 SXM, ~790 TFLOP/s).
PEAK_BF16_FLOPS = 790e12


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
    from mlcnc_jax.data import synthetic_labels, synthetic_render  # numpy and PIL, no TensorFlow

    arrays = {}
    for split, limit in (("train", None), ("test", num_test)):
        blobs, labels = [], []
        for i, (_, png, row) in enumerate(
            synthetic_render.generate("target", image_size, 0, split)
        ):
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
        class_names=np.array(synthetic_labels.CLASS_SETS["target"]),
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
            f"{path} not found: render it first with `python -m benchmarks.gpu_train_check "
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


class StepTimes:
    """A trainer hook: the wall time per step (data, step, metrics fetch) and the losses.

    The Trainer may report the metrics of several steps at once (one fetch per log
    interval): reports less than `GROUP_GAP_S` apart belong to one fetch, whose time is
    when its last step finished. The time per step of a fetch is the time since the
    previous fetch over the steps between them; reported one step at a time, that is each
    step's time. The first fetch also holds the placement of the state and compilation.
    """

    GROUP_GAP_S = 2e-3  # a fetch reports its steps within microseconds; a step takes longer

    def __init__(self):
        self.times, self.losses, self.fla, self.scale = [], [], [], []
        self.compile_s = None
        self.fetches: list[tuple[int, float]] = []  # (last step, time) of each fetch
        self._start = self._last = None
        self._start_step = 0

    def on_start(self, state, start_step):
        self._start = self._last = time.perf_counter()
        self._start_step = int(start_step)

    def on_step(self, step, metrics):
        now = time.perf_counter()
        if self.fetches and now - self._last < self.GROUP_GAP_S:
            self.fetches[-1] = (step, self.fetches[-1][1])  # the same fetch
        else:
            self.fetches.append((step, now))
        self._last = now
        self._update_times()
        self.losses.append(float(metrics["loss"]))
        self.fla.append(float(metrics.get("loss_fla", np.nan)))
        self.scale.append(float(metrics.get("logit_scale", np.nan)))
        if step % 50 == 0:
            print(
                f"step {step} loss {self.losses[-1]:.4f} fla {self.fla[-1]:.4f} "
                f"logit scale {self.scale[-1]:.3f} lr {float(metrics['learning_rate']):.2e}",
                flush=True,
            )

    def _update_times(self):
        pairs = zip(self.fetches, self.fetches[1:])
        self.times = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in pairs]
        first_step, first_time = self.fetches[0]
        # The first fetch: placing the state, compiling, and its steps after the first.
        others = (first_step - self._start_step - 1) * (np.median(self.times) if self.times else 0)
        self.compile_s = first_time - self._start - others


def host_input_rate(batches, batch_size: int, steps: int) -> float:
    """Images/s of the host input alone: `steps` batches pulled, nothing sent to a device."""
    next(batches)  # the first batch pays for any set-up
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - t0)


def device_resident_rate(train_step, state, batch, batch_size: int, steps: int) -> float:
    """Images/s of `train_step` run back to back on one batch already on the device.

    No input and no host round trip between steps: the most the device gives with this
    step. The first call (compilation if the step is new, else a warm-up) is not timed.
    """
    import jax

    state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return steps * batch_size / (time.perf_counter() - t0)


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
    peak_flops: float = PEAK_BF16_FLOPS,
    input_check_steps: int = 0,
) -> dict:
    """Trains with the project's Trainer on numpy batches and evaluates; returns the numbers.

    With `input_check_steps` > 0 it also measures the host input alone and the Trainer's
    compiled step on a device-resident batch (`host_input_rate`, `device_resident_rate`).
    """
    import jax

    from configs.default import get_config
    from mlcnc_jax import objective, optim, parallel
    from mlcnc_jax.data import arrays
    from mlcnc_jax.evaluation import Evaluator
    from mlcnc_jax.models import create_model
    from mlcnc_jax.state import Schedule, initial_train_state
    from mlcnc_jax.trainer import Trainer

    num_classes = data["train_labels"].shape[1]
    config = get_config()
    config.seed = seed
    config.dtype = dtype
    config.model.backbone = backbone
    config.model.pretrained = "none"  # a throughput and learning check from random weights
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
    plan = Schedule(
        steps_per_epoch=max(1, math.ceil(num_train / batch_size)),
        total_steps=steps,
        warmup_steps=warmup_steps,
    )
    placement = parallel.Placement("jit")
    model = create_model(config, num_classes)
    tx, lr_schedule = optim.create_optimizer(config, plan.total_steps)
    loss_fn = objective.make_objective(
        config.loss,
        objective.ClassStats(np.asarray(data["class_freq"], np.float64), num_train),
        warmup_steps=plan.warmup_steps,
    )
    t0 = time.perf_counter()
    state = initial_train_state(config, model, tx, num_classes)
    init_s = time.perf_counter() - t0
    # uint8 pixels cross to the device, normalised there, as the tf.data pipeline's do.
    norm = {"mean": None, "std": None}
    image_norm = (tuple(config.data.mean), tuple(config.data.std))
    evaluator = Evaluator(
        model,
        lambda: arrays.eval_batches(
            data["test_images"], data["test_labels"], global_batch=eval_batch_size, **norm
        ),
        num_images=len(data["test_labels"]),
        class_split=data["class_split"],
        mesh=placement.mesh,
        image_norm=image_norm,
    )
    timing = StepTimes()
    trainer = Trainer(
        model=model,
        tx=tx,
        loss_fn=loss_fn,
        lr_schedule=lr_schedule,
        plan=plan,
        evaluate=evaluator,
        placement=placement,
        ema_decay=config.train.ema_decay,
        hooks=[timing],
        eval_every_steps=steps,
        checkpoint_every_steps=steps,
        # Step times come from the fetches (StepTimes): at least ten of them per run.
        log_every_steps=max(1, min(config.train.log_every_steps, steps // 10)),
        prefetch=config.train.prefetch_batches,
        image_norm=image_norm,
    )
    batches = arrays.train_batches(
        data["train_images"],
        data["train_labels"],
        global_batch=batch_size,
        sampling_name=config.data.sampling,
        seed=seed,
        **norm,
    )
    first_batch = next(batches)
    flops = common.xla_flops(  # from the lowered step: no second compile
        lambda: trainer.train_step.lower(
            trainer.placement.place(state), trainer.placement.shard(first_batch)
        )
    )
    t0 = time.perf_counter()
    results = trainer.train(state, arrays.prefetch(batches, size=3))
    train_eval_s = time.perf_counter() - t0
    result_map = results["raw"]["map"]
    chance = chance_map(data["test_labels"], data["class_split"])
    host_rate = device_rate = None
    if input_check_steps > 0:
        fresh = arrays.train_batches(
            data["train_images"],
            data["train_labels"],
            global_batch=batch_size,
            sampling_name=config.data.sampling,
            seed=seed + 1,
            **norm,
        )
        host_rate = host_input_rate(fresh, batch_size, input_check_steps)
        # The Trainer's own compiled step (no second compilation) on a fresh state.
        placed = trainer.placement.place(initial_train_state(config, model, tx, num_classes))
        device_rate = device_resident_rate(
            trainer.train_step,
            placed,
            trainer.placement.shard(next(fresh)),
            batch_size,
            input_check_steps,
        )

    losses, fla = timing.losses, timing.fla
    step_s = float(np.median(timing.times)) if timing.times else None
    window = max(1, min(20, (steps - warmup_steps) // 3))
    after = losses[warmup_steps:] or losses
    first, last = float(np.mean(after[:window])), float(np.mean(after[-window:]))
    checks = {
        "loss_falls": last < first,
        "map_beats_chance": result_map["total"] > chance + min_gain,
    }
    device = jax.devices()[0]
    mfu = flops / step_s / peak_flops if flops and step_s and device.platform == "gpu" else None
    return {
        "device": f"{device.platform} / {device.device_kind}",
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
        "logit_scale_last": timing.scale[-1],
        "num_train": num_train,
        "num_test": len(data["test_labels"]),
        "init_s": init_s,
        "compile_s": timing.compile_s,
        "step_median_s": step_s,
        "images_per_s": batch_size / step_s if step_s else None,
        "host_input_images_per_s": host_rate,
        "device_resident_images_per_s": device_rate,
        "flops_per_step": flops,
        "peak_flops": peak_flops,
        "mfu": mfu,
        "peak_memory_bytes": common.device_peak_memory_bytes(),
        "train_and_eval_s": train_eval_s,
        "eval_s": results.get("seconds"),
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


def summarize(paths: list[str]) -> str:
    """A table of the throughput numbers of result files written with --out.

    Where a file holds the input check, a second table sets the Trainer's images/s with
    the real input beside the host input alone and the step on a device-resident batch,
    and says whether the host keeps up.
    """
    from benchmarks import common

    rows, input_rows = [], []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        mem = r.get("peak_memory_bytes")
        rows.append(
            [
                str(r["batch_size"]),
                common.fmt(r.get("images_per_s"), ".0f"),
                common.fmt(r.get("step_median_s") and 1e3 * r["step_median_s"], ".1f"),
                common.fmt(r.get("compile_s"), ".1f"),
                common.fmt(mem and mem / 2**30, ".1f"),
                common.fmt(r.get("mfu") and 100 * r["mfu"], ".1f"),
                r["device"],
            ]
        )
        device, trainer = r.get("device_resident_images_per_s"), r.get("images_per_s")
        if device and trainer:
            input_rows.append(
                [
                    str(r["batch_size"]),
                    r["dtype"],
                    common.fmt(r.get("host_input_images_per_s"), ".0f"),
                    common.fmt(trainer, ".0f"),
                    common.fmt(device, ".0f"),
                    f"{trainer / device:.2f}",
                    input_verdict(trainer, device),
                ]
            )
    header = ["batch", "images/s", "step ms", "compile s", "peak GiB", "MFU %", "device"]
    text = common.markdown_table(header, rows)
    if input_rows:
        header = [
            "batch", "dtype", "host input alone (images/s)", "Trainer, real input (images/s)",
            "step on a device-resident batch (images/s)", "Trainer / device-resident", "verdict",
        ]  # fmt: skip
        text += (
            "\n\nDoes the host keep up? Real input here: numpy batches of the project's sampler "
            "over images decoded once up front (data.arrays; no TensorFlow on this host, so no "
            "tf.data JPEG decoding: see benchmarks.input_pipeline for its cost per host core).\n\n"
            + common.markdown_table(header, input_rows, ["---:", "---"] + ["---:"] * 4 + ["---"])
        )
    return text


def input_verdict(trainer_rate: float, device_rate: float, tolerance: float = 0.9) -> str:
    """'host keeps up' when the Trainer reaches `tolerance` of the device-resident rate."""
    if trainer_rate >= tolerance * device_rate:
        return "host keeps up"
    return (
        f"device idles {100 * (1 - trainer_rate / device_rate):.0f} % of the time "
        "(input or loop overhead)"
    )


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
    parser.add_argument(
        "--peak_tflops", type=float, default=PEAK_BF16_FLOPS / 1e12, help="for the MFU"
    )
    parser.add_argument("--no_verdict", action="store_true", help="report only (throughput)")
    parser.add_argument(
        "--input_check",
        type=int,
        default=0,
        metavar="N",
        help="also time N batches of the host input alone and N steps on a device-resident batch",
    )
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument(
        "--summarize", nargs="+", metavar="JSON", help="print a table of result files and exit"
    )
    args = parser.parse_args()

    if args.summarize:
        print(summarize(args.summarize))
        return 0
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
        peak_flops=args.peak_tflops * 1e12,
        input_check_steps=args.input_check,
    )
    result["tensorflow_imported"] = (
        "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None
    )
    text = json.dumps(to_json(result), indent=2, allow_nan=False)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.smoke or args.no_verdict:
        return 0  # a few steps prove the code path, not learning
    print("PASSED" if result["passed"] else f"FAILED: {result['checks']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
