"""Training speed of MLC-NC: the full model, and the head plus its losses alone.

Each case, in its own process, builds its run with `experiment.build` (random pixels in
memory) and times `run.trainer.train_step` on `run.initial_state()`. Full model: ResNet-50
+ MLC-NC at 224 px, 20 and 80 classes (CPU: batch 8, float32; GPU: 64 and 128, float32 and
bfloat16). Head only: the head and its losses on a fixed random 2048 x 7 x 7 feature map,
batch 8, beside the authors' PyTorch release on a 2-core CPU.

    python -m benchmarks.speed                          # defaults chosen by the backend
    python -m benchmarks.speed --batch_sizes 64,128 --dtypes float32,bfloat16 --steps 20
    python -m benchmarks.speed --no-full                # head + losses only (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import numpy as np

from benchmarks import speed_report
from benchmarks.common import ROOT, peak_memory
from benchmarks.gpu_data import random_data

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "speed.md")
HEAD_SIDE, HEAD_CHANNELS = 7, 2048  # ResNet-50's last feature map at 224 px
# The head cases' run initialises on a zero 64 px image: 6 tokens of 2048 channels (the head's
# weights do not depend on the number of tokens); the timed batch is the 7 x 7 x 2048 map.
HEAD_INIT_SIZE = 64


class FeatureMap(nn.Module):
    """The head cases' backbone: the input, read as tokens of HEAD_CHANNELS channels."""

    dtype: Any = np.float32

    @nn.compact
    def __call__(self, x, train: bool):
        return x.reshape(x.shape[0], -1, HEAD_CHANNELS).astype(self.dtype)


def _run(case: dict, workdir: str):
    """The case's run: the paper's VOC-LT head (D = 768), the full loss from step 0."""
    from configs.voc_lt import get_config
    from mlcnc_jax import experiment, models

    k, b, head = case["num_classes"], case["batch_size"], case["kind"] == "head"
    config = get_config()
    config.model.pretrained, config.dtype = "", case["dtype"]
    config.model.backbone = "speed_feature_map" if head else case["backbone"]
    config.data.image_size = HEAD_INIT_SIZE if head else case["image_size"]
    config.train.batch_size = config.eval.batch_size = b
    # No warm-up and no epoch end while timing: the full loss every step.
    config.train.steps_per_epoch, config.train.num_epochs, config.loss.warmup_epochs = 10**6, 1, 0
    models.register_backbone("speed_feature_map", lambda dtype, _: FeatureMap(dtype))
    dataset = random_data(config.data.image_size, k, n=max(b, k), positive_rate=0.15)
    return experiment.build(config, workdir, dataset=dataset, reports=False)


def run_case(case: dict) -> dict:
    """Times one case ({'kind': 'full' | 'head', 'num_classes', 'batch_size', 'dtype', 'steps',
    for 'full' also 'backbone', 'image_size'}): the case plus compile_s, step_s (median),
    step_min_s, step_max_s, images_per_s, flops_per_step, peak_memory_bytes, memory_source,
    xla_buffer_bytes, platform, device_kind, final_loss."""
    import jax

    with tempfile.TemporaryDirectory() as workdir:
        run = _run(case, workdir)
        state, k = run.initial_state(), case["num_classes"]
        # Every class's prototype valid, so that FPC computes what it does mid-training.
        protos = np.random.default_rng(7).standard_normal((k, run.config.model.proj_dim))
        protos = (protos / np.linalg.norm(protos, axis=-1, keepdims=True)).astype(np.float32)
        valid = np.ones(k, bool)
        state = state.replace(prototypes=state.prototypes.replace(prototypes=protos, valid=valid))
        n, rng = case["batch_size"], np.random.default_rng(0)
        images = run.dataset.train.images[:n]
        if case["kind"] == "head":  # a feature map with ResNet-50's post-ReLU statistics
            images = rng.standard_normal((n, HEAD_SIDE, HEAD_SIDE, HEAD_CHANNELS))
            images = np.maximum(images, 0.0).astype(np.float32)
        batch = {"image": images, "labels": run.dataset.train.labels[:n].astype(np.float32)}
        state, batch = run.placement.place(state), run.placement.shard(batch)
        t0 = time.perf_counter()
        compiled = run.trainer.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        flops, xla_bytes = speed_report.compiled_costs(compiled)
        times = []
        for i in range(case["steps"] + 1):  # the first call is a warm-up
            t0 = time.perf_counter()
            state, metrics = jax.block_until_ready(compiled(state, batch))
            times += [time.perf_counter() - t0] if i else []
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} in case {case}")
    peak, source = peak_memory()
    dev, step_s = jax.local_devices()[0], statistics.median(times)
    return {
        **case, "compile_s": compile_s, "step_s": step_s, "step_min_s": min(times),
        "step_max_s": max(times), "images_per_s": case["batch_size"] / step_s, "flops_per_step": flops,
        "peak_memory_bytes": peak, "memory_source": source, "xla_buffer_bytes": xla_bytes,
        "platform": dev.platform, "device_kind": dev.device_kind, "final_loss": loss,
    }  # fmt: skip


def _child(payload: dict, timeout: float) -> dict:
    """Runs `payload` in a fresh process (so its peak memory is its own)."""
    command = [sys.executable, "-m", "benchmarks.speed", "--_child", json.dumps(payload)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"case {payload} failed (exit {proc.returncode}); see stderr above")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--backbone", default="resnet50")
    add("--image_size", type=int, default=224)
    add("--classes", default="20,80", help="comma-separated numbers of classes")
    add("--batch_sizes", help="full model; default 8 on CPU, 64,128 otherwise")
    add("--dtypes", help="full model; default float32 on CPU, bfloat16,float32 otherwise")
    add("--steps", type=int, help="timed steps; default 5 on CPU, 20 otherwise")
    add("--head_batch", type=int, default=8)
    add("--head_dtype", default="float32", choices=["float32", "bfloat16"])
    add("--head_steps", type=int, default=20)
    add("--full", action=argparse.BooleanOptionalAction, default=True)
    add("--head", action=argparse.BooleanOptionalAction, default=True)
    add("--cpu_peak_gflops", type=float, help="CPU peak GFLOP/s (default: measure a matmul)")
    add("--time_budget_s", type=float, default=0, help="start no new case after this many "
        "seconds (0: no limit); the rest are listed as skipped")  # fmt: skip
    add("--case_timeout_s", type=float, default=900)
    add("--out", default=DEFAULT_OUT, help="markdown file to update ('' for none)")
    add("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        payload = json.loads(args._child)
        if payload.pop("probe", False):
            result = speed_report.probe(payload["dtypes"], payload["cpu_peak_gflops"])
        else:
            result = run_case(payload)
        print("RESULT " + json.dumps(result), flush=True)
        return

    start, load_before = time.perf_counter(), os.getloadavg()
    # The driver never initialises a backend (a GPU client would hold the memory the cases
    # need): a probe process reports the device (on CPU it times the dtypes this run uses).
    probed = sorted({*(args.dtypes or "float32").split(","), args.head_dtype} - {""})
    info = _child({"probe": True, "dtypes": probed, "cpu_peak_gflops": args.cpu_peak_gflops}, 600)
    on_cpu = info["platform"] == "cpu"
    classes = [int(k) for k in args.classes.split(",") if k]
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8" if on_cpu else "64,128")).split(",")]
    dtypes = (args.dtypes or ("float32" if on_cpu else "bfloat16,float32")).split(",")
    steps = args.steps or (5 if on_cpu else 20)
    head = {"kind": "head", "batch_size": args.head_batch, "dtype": args.head_dtype}
    cases = [{**head, "num_classes": k, "steps": args.head_steps} for k in classes]
    full = {"kind": "full", "backbone": args.backbone, "image_size": args.image_size}
    cases = (cases if args.head else []) + [
        {**full, "num_classes": k, "batch_size": b, "dtype": d, "steps": steps}
        for b in (sorted(batch_sizes, reverse=True) if args.full else [])
        for d in dtypes
        for k in classes
    ]
    results = []
    for case in cases:
        elapsed = time.perf_counter() - start
        if args.time_budget_s and elapsed > args.time_budget_s:
            results.append({**case, "skipped": f"time budget {args.time_budget_s:.0f} s spent"})
            continue
        print(f"[{elapsed:6.0f} s] {case}", file=sys.stderr, flush=True)
        try:
            results.append(_child(case, args.case_timeout_s))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            results.append({**case, "skipped": type(e).__name__})
            print(f"  failed: {e}", file=sys.stderr, flush=True)
    loads, seconds = (load_before[0], os.getloadavg()[0]), time.perf_counter() - start
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]])
    text = speed_report.section(info, results, args, steps, command, seconds, loads)
    print(text)
    if args.out:
        key = info["platform"] + "-" + re.sub(r"\W+", "_", info["device_kind"])
        speed_report.write_section(args.out, key, text)
        print(f"\nWrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
