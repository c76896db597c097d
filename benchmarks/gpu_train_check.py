"""Trains MLC-NC on `synthetic_lt` from in-memory pixels: the GPU end-to-end check.

GPU hosts may lack TensorFlow, so this check never imports it: the images come from an
.npz of JPEG bytes rendered beforehand (`--make_data`, numpy and Pillow) and decoded once
with Pillow (benchmarks/gpu_data.py). The
run is the library's own (`experiment.build` on that in-memory dataset: sampler, model,
objective, Trainer, Evaluator). It reports images/s, step and compile time, peak memory
and the MFU against the bf16 dense peak (--peak_tflops). It passes when the total loss
falls after the FLA warm-up (mean of the last 20 steps below that of the first 20 after
it) and the test mAP beats chance (random scores' mean mAP) by `--min_gain` points.

    python -m benchmarks.gpu_train_check --make_data benchmarks/cache/gpu_check/synthetic_lt_224.npz
    python -m benchmarks.gpu_train_check --data FILE     # on the GPU (benchmarks/gpu_check.sh)
    python -m benchmarks.gpu_train_check --smoke [--data FILE]   # CPU, seconds: the same path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks import gpu_measure as measure
from benchmarks.common import device_peak_memory_bytes
from benchmarks.gpu_data import load_data, make_data, random_data
from mlcnc_jax.reports import to_json

DEFAULT_DATA = "benchmarks/cache/gpu_check/synthetic_lt_224.npz"
PEAK_BF16_FLOPS = 790e12  # bfloat16 dense peak of an H200 / H100 SXM, ~790 TFLOP/s


def parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the GPU check's (`run_check` takes the same names)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--make_data", metavar="FILE", help="render synthetic_lt into FILE and exit")
    add("--num_test", type=int, default=800, help="--make_data: test images kept")
    add("--data", default=DEFAULT_DATA, help="the .npz written by --make_data")
    add("--smoke", action="store_true", help="resnet_small, 32 px, a few steps")
    add("--model", default="mlcnc", choices=["mlcnc", "baseline"], help="mlcnc (default "
        "config's losses) or baseline (pooled features, linear classifier, BCE)")  # fmt: skip
    add("--backbone", default="resnet50")
    add("--image_size", type=int, default=224)
    add("--batch_size", type=int, default=64)
    add("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    add("--steps", type=int, default=500)
    add("--warmup_steps", type=int, default=90, help="FLA-only warm-up steps (5 passes of 18)")
    add("--learning_rate", type=float, default=1e-3)
    add("--logit_scale_init", type=float, default=1.0, help="config.model.logit_scale_init")
    add("--eval_batch_size", type=int, default=100)
    add("--min_gain", type=float, default=5.0, help="mAP points above chance")
    add("--peak_tflops", type=float, default=PEAK_BF16_FLOPS / 1e12, help="for the MFU")
    add("--no_verdict", action="store_true", help="report only (throughput)")
    add("--input_check", type=int, default=0, metavar="N", help="also time N batches of the "
        "host input alone and N steps on a device-resident batch")  # fmt: skip
    add("--out", help="write the result as JSON here")
    add("--summarize", nargs="+", metavar="JSON", help="print a table of result files and exit")
    return p


def experiment_config(a: argparse.Namespace, num_train: int):
    """The default config with the check's settings, for a run of exactly `a.steps` steps."""
    from configs.default import get_config

    config = get_config()
    config.seed, config.dtype, config.data.image_size = 0, a.dtype, a.image_size
    config.model.backbone, config.model.logit_scale_init = a.backbone, a.logit_scale_init
    config.model.pretrained = "none"  # a throughput and learning check from random weights
    if a.backbone != "resnet_small":
        config.model.embed_dim = 768  # the paper's head for ResNet backbones
    config.train.batch_size, config.train.learning_rate = a.batch_size, a.learning_rate
    config.eval.batch_size, warmup = a.eval_batch_size, a.warmup_steps
    if a.model == "baseline":  # the sanity reference: pooled features, linear, plain BCE
        config.model.name, warmup = "baseline", 0
        config.loss.update(two_way=0.0, fla=0.0, fpc=0.0, bce=1.0)
    # The longest epoch, at most one pass over the images, that both step counts fill whole.
    one_pass = math.ceil(num_train / a.batch_size)
    epoch = max(d for d in range(1, one_pass + 1) if a.steps % d == 0 and warmup % d == 0)
    config.train.steps_per_epoch, config.train.num_epochs = epoch, a.steps // epoch
    config.loss.warmup_epochs = warmup // epoch
    config.train.eval_every_epochs = config.train.num_epochs  # one evaluation, at the end
    config.train.checkpoint_every_steps = a.steps
    # Step times come from the metric fetches (StepTimes): at least ten of them per run.
    config.train.log_every_steps = max(1, min(config.train.log_every_steps, a.steps // 10))
    return config


def run_check(dataset, **options) -> dict:
    """Trains `dataset` (in memory) through `experiment.build`, evaluates; returns the numbers.

    `options` are the command line's settings by name (e.g. steps=6); the rest keep its
    defaults. With input_check > 0 it also times the host input alone and the Trainer's
    compiled step on a device-resident batch (`host_input_rate`, `device_resident_rate`).
    """
    import jax

    from mlcnc_jax import experiment

    a = parser().parse_args([])
    if set(options) - set(vars(a)):
        raise TypeError(f"run_check: unknown settings {sorted(set(options) - set(vars(a)))}")
    vars(a).update(options)
    timing, host_rate, device_rate = measure.StepTimes(), None, None
    with tempfile.TemporaryDirectory() as workdir:
        config = experiment_config(a, len(dataset.train))
        run = experiment.build(config, workdir, dataset=dataset, hooks=[timing], reports=False)
        t0 = time.perf_counter()
        state = run.placement.place(run.initial_state())
        init_s = time.perf_counter() - t0
        with contextlib.closing(run.batches(0)) as batches:
            batch = run.placement.shard(next(batches))
        flops = measure.step_flops(run.trainer.train_step, state, batch)
        t0 = time.perf_counter()
        final = run.train().final
        train_eval_s = time.perf_counter() - t0
        if a.input_check > 0:  # a fresh iterator: no batch waits in its queue yet
            with contextlib.closing(run.batches(0)) as batches:
                host_rate = measure.host_input_rate(batches, a.batch_size, a.input_check)
            device_rate = measure.device_resident_rate(
                run.trainer.train_step, state, batch, a.batch_size, a.input_check
            )
    chance = measure.chance_map(dataset.test.labels, dataset.class_split)
    warmup, losses, fla = run.steps.warmup_steps, timing.losses, timing.fla
    step_s = float(np.median(timing.times)) if timing.times else None
    window = max(1, min(20, (a.steps - warmup) // 3))
    after = losses[warmup:] or losses
    first, last = float(np.mean(after[:window])), float(np.mean(after[-window:]))
    beats_chance = final.raw.map.total > chance + a.min_gain
    checks = {"loss_falls": last < first, "map_beats_chance": beats_chance}
    device, peak_flops = jax.devices()[0], a.peak_tflops * 1e12
    mfu = flops / step_s / peak_flops if flops and step_s and device.platform == "gpu" else None
    return {
        "device": f"{device.platform} / {device.device_kind}", "jax": jax.__version__,
        "model": a.model, "backbone": a.backbone, "image_size": a.image_size,
        "batch_size": a.batch_size, "dtype": a.dtype, "steps": a.steps, "warmup_steps": warmup,
        "learning_rate": a.learning_rate, "logit_scale_init": a.logit_scale_init,
        "logit_scale_last": timing.scale[-1], "num_train": len(dataset.train),
        "num_test": len(dataset.test), "init_s": init_s, "compile_s": timing.compile_s,
        "step_median_s": step_s, "images_per_s": a.batch_size / step_s if step_s else None,
        "host_input_images_per_s": host_rate, "device_resident_images_per_s": device_rate,
        "flops_per_step": flops, "peak_flops": peak_flops, "mfu": mfu,
        "peak_memory_bytes": device_peak_memory_bytes(),
        "train_and_eval_s": train_eval_s, "eval_s": final.seconds,
        "loss_first_after_warmup": first, "loss_last": last,
        "fla_first": float(np.mean(fla[:window])), "fla_last": float(np.mean(fla[-window:])),
        "test_map": final.raw.map.as_dict(), "chance_map": chance, "min_gain": a.min_gain,
        "checks": checks, "passed": all(checks.values()),
    }  # fmt: skip


def main() -> int:
    args = parser().parse_args()
    if args.summarize:
        print(measure.summarize(args.summarize))
        return 0
    if args.make_data:
        make_data(args.make_data, args.image_size, args.num_test)
        return 0
    if args.smoke:
        args.backbone, args.image_size, args.batch_size = "resnet_small", 32, 8
        args.steps, args.warmup_steps, args.eval_batch_size = 6, 2, 16
    t0 = time.perf_counter()
    if args.smoke and not os.path.exists(args.data):
        print(f"{args.data} not found: smoke run on random images", flush=True)
        data = random_data(args.image_size)
    else:
        data = load_data(args.data, args.image_size, limit=32 if args.smoke else None)
        took = time.perf_counter() - t0
        print(f"Decoded {len(data.train)} train + {len(data.test)} test images in {took:.1f} s")
    result = run_check(data, **vars(args))
    result["tensorflow_imported"] = sys.modules.get("tensorflow") is not None
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
