"""Training speed of MLC-NC: the full model, and the head plus its losses alone.

Every case runs the project's real training step (`mlcnc_jax.step.train_step`:
forward, the configured losses two-way + FLA + FPC, backward, Adam with L2 decay,
EMA, prototype statistics) on a `TrainState` from `state.initial_train_state`,
jit-compiled with the state donated, exactly as training does.

* Full model: ResNet-50 + MLC-NC head at 224 px, for 20 and 80 classes. On CPU
  at batch 8 in float32; on a GPU at batch 64 and 128 in float32 and bfloat16.
* Head only: the MLC-NC head and its losses on a fixed random ResNet-50 feature
  map (2048 x 7 x 7 = 49 tokens of 2048 channels, fed through an identity
  backbone), batch 8, 20 and 80 classes, beside the authors' PyTorch release on
  a 2-core CPU (0.087 s and 0.549 s per head + loss step).

Reported per case: compile time (lowering + XLA compilation), the median step
time after one warm-up step, images/s, model FLOPs per image from XLA's cost
analysis of the compiled step, the achieved FLOP/s and its fraction of the
device's peak, and peak memory (device `peak_bytes_in_use` on accelerators, the
process's max RSS on CPU). Each case runs in its own process so peak memory is
per case. The markdown table is printed and written into the results file,
replacing only this backend's section.

    python -m benchmarks.speed                          # defaults chosen by the backend
    python -m benchmarks.speed --batch_sizes 64,128 --dtypes float32,bfloat16 --steps 20
    python -m benchmarks.speed --no-full                # head + losses only (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

from benchmarks import common
from benchmarks.common import ROOT, cpu_model, row

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "speed.md")

# Seconds per head + loss training step of the authors' PyTorch release, batch 8,
# measured on a 2-core CPU like the one these defaults target.
AUTHORS_HEAD_STEP_S = {20: 0.087, 80: 0.549}

# Dense peak FLOP/s per chip, from the vendors' data sheets, by compute dtype.
# float32 on NVIDIA Ampere and later: XLA's default precision runs float32 dots and
# convolutions on the TF32 tensor cores, so the TF32 peak is the reference
# (plain float32 CUDA cores: 67 TFLOP/s on an H100 SXM).
PEAK_TFLOPS = (
    # (substring of device_kind, {dtype: TFLOP/s}, note)
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}, "H100 PCIe dense; float32 as TF32"),
    ("H100", {"bfloat16": 989.0, "float32": 495.0}, "H100 SXM dense; float32 as TF32"),
    (
        "H200",
        {"bfloat16": 989.0, "float32": 495.0},
        "H200 (H100 SXM compute) dense; float32 as TF32",
    ),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}, "A100 dense; float32 as TF32"),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}, "TPU v4 (float32 via bf16 passes)"),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}, "TPU v5e"),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}, "TPU v5p"),
)

HEAD_TOKENS, HEAD_CHANNELS = 49, 2048  # ResNet-50 at 224 px: 7 x 7 x 2048


# ----------------------------------------------------------------------------- one case
# Everything below up to `run_case` runs inside a case's own process.


def _config(backbone: str, dtype: str, image_size: int):
    from configs.voc_lt import get_config  # the paper's head: D = 768, gamma starts at 1

    config = get_config()
    config.model.pretrained = ""
    config.model.backbone = backbone
    config.dtype = dtype
    config.data.image_size = image_size
    return config


def _jitted_step(config, model, tx, lr_schedule, num_classes: int):
    """The project's train step with the state donated, as the trainer builds it."""
    import numpy as np

    from mlcnc_jax import objective, step
    from mlcnc_jax.models import get_family

    # No FLA-only warm-up and no end of epoch while timing: the full loss every step.
    # (Under jit both branches are computed anyway; this keeps the logged loss meaningful.)
    loss_fn = objective.make_objective(
        config.loss, objective.ClassStats(np.ones(num_classes), num_train=1000)
    )
    return step.compile_train_step(
        model,
        tx,
        loss_fn,
        lr_schedule,
        family=get_family(config.model.name),
        steps_per_epoch=10**6,
        ema_decay=config.train.ema_decay,
    )


def _with_valid_prototypes(state, num_classes: int, dim: int):
    """Gives every class a random prototype so FPC computes what it does mid-training."""
    import jax
    import jax.numpy as jnp

    if state.prototypes is None:
        return state
    protos = jax.random.normal(jax.random.key(7), (num_classes, dim), jnp.float32)
    protos = protos / jnp.linalg.norm(protos, axis=-1, keepdims=True)
    return state.replace(
        prototypes=state.prototypes.replace(prototypes=protos, valid=jnp.ones((num_classes,), bool))
    )


def _head_state(config, model, tx, num_classes: int, tokens):
    """A TrainState for the identity-backbone model (its input is a token map, not an image)."""
    from mlcnc_jax.state import initial_train_state

    return initial_train_state(config, model, tx, num_classes, example_input=tokens[:1])


def run_case(case: dict) -> dict:
    """Builds, compiles and times one case; returns its measurements.

    Args:
      case: {'kind': 'full' | 'head', 'num_classes', 'batch_size', 'dtype', 'steps',
        and for 'full': 'backbone', 'image_size'}.

    Returns:
      The case plus compile_s, step_s (median), step_min_s, step_max_s,
      images_per_s, flops_per_step (None when XLA gives none), peak_memory_bytes,
      memory_source, xla_buffer_bytes, device_kind, platform, final_loss.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mlcnc_jax import optim
    from mlcnc_jax.models import DTYPES, create_model
    from mlcnc_jax.state import initial_train_state

    k, b, dtype = case["num_classes"], case["batch_size"], case["dtype"]
    rng = np.random.default_rng(0)
    labels = rng.random((b, k)) < 0.15
    labels[np.arange(b), rng.integers(0, k, b)] = True  # every image has a positive
    labels = jnp.asarray(labels, jnp.float32)

    if case["kind"] == "full":
        config = _config(case["backbone"], dtype, case["image_size"])
        model = create_model(config, k)
        tx, lr_schedule = optim.create_optimizer(config, total_steps=10**6)
        state = initial_train_state(config, model, tx, k)
        size = case["image_size"]
        inputs = jnp.asarray(rng.standard_normal((b, size, size, 3)), jnp.float32)
    else:

        class TokenInput(nn.Module):
            """Identity backbone: a [B, 7, 7, 2048] feature map becomes 49 tokens."""

            @nn.compact
            def __call__(self, x, train: bool):
                del train
                return x.reshape(x.shape[0], -1, x.shape[-1]).astype(DTYPES[dtype])

        config = _config("resnet50", dtype, 224)
        model = create_model(config, k, backbone=TokenInput())
        tx, lr_schedule = optim.create_optimizer(config, total_steps=10**6)
        # A fixed feature map with ResNet-50's post-ReLU statistics (non-negative).
        side = int(round(HEAD_TOKENS**0.5))
        inputs = jnp.asarray(
            np.maximum(rng.standard_normal((b, side, side, HEAD_CHANNELS)), 0.0), jnp.float32
        )
        state = _head_state(config, model, tx, k, inputs)
    state = _with_valid_prototypes(state, k, config.model.proj_dim)
    batch = {"image": inputs, "labels": labels}
    step = _jitted_step(config, model, tx, lr_schedule, k)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = common.xla_flops(compiled)
    xla_bytes = None
    try:
        mem = compiled.memory_analysis()
        xla_bytes = int(
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
    except Exception:  # not every backend reports it; the column is then empty
        pass

    times = []
    for i in range(case["steps"] + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i:
            times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} in case {case}")
    peak, source = common.peak_memory()
    step_s = statistics.median(times)
    dev = jax.local_devices()[0]
    return {
        **case,
        "compile_s": compile_s,
        "step_s": step_s,
        "step_min_s": min(times),
        "step_max_s": max(times),
        "images_per_s": b / step_s,
        "flops_per_step": flops,
        "peak_memory_bytes": peak,
        "memory_source": source,
        "xla_buffer_bytes": xla_bytes,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "final_loss": loss,
    }


def probe(dtypes: list[str], cpu_peak_gflops: float | None) -> dict:
    """The backend, device and peak FLOP/s per dtype.

    Args:
      dtypes: the dtypes to measure on CPU (accelerators: every dtype of the table).
      cpu_peak_gflops: the CPU peak to use instead of measuring one.

    Returns:
      platform, device_kind, device_count, jax, peak_flops {dtype: FLOP/s}, peak_note
      (and cpu_model on CPU).
    """
    import jax
    import jax.numpy as jnp

    dev = jax.local_devices()[0]
    info = {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.local_device_count(),
        "jax": jax.__version__,
        "peak_flops": {},
        "peak_note": "",
    }
    if dev.platform == "cpu":
        info["cpu_model"] = cpu_model()
        if cpu_peak_gflops:
            info["peak_flops"] = {d: cpu_peak_gflops * 1e9 for d in dtypes}
            info["peak_note"] = f"CPU peak given by --cpu_peak_gflops={cpu_peak_gflops}"
        else:
            n = 2048
            matmul = jax.jit(lambda x: x @ x)
            for d in dtypes:
                a = jnp.ones((n, n), d)
                jax.block_until_ready(matmul(a))
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    jax.block_until_ready(matmul(a))
                    times.append(time.perf_counter() - t0)
                info["peak_flops"][d] = 2 * n**3 / min(times)
            info["peak_note"] = (
                f"CPU peak measured: best of 5 {n}x{n} matmuls through XLA at the time of the run "
                "(an achievable, not a theoretical, peak; it shares the load noted below)"
            )
        return info
    for key, table, note in PEAK_TFLOPS:
        if key.lower() in dev.device_kind.lower():
            info["peak_flops"] = {d: tflops * 1e12 for d, tflops in table.items()}
            info["peak_note"] = f"peak from the data sheet: {note}"
            break
    else:
        info["peak_note"] = f"no peak FLOP/s known for {dev.device_kind!r}"
    return info


# ----------------------------------------------------------------------------- driver


def _child(payload: dict, timeout: float) -> dict:
    """Runs `payload` in a fresh process (so its peak memory is its own)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--_child", json.dumps(payload)],
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"case {payload} failed (exit {proc.returncode}); see stderr above")
    return json.loads(lines[-1][len("RESULT ") :])


from benchmarks.common import fmt as _cell  # noqa: E402


def full_table(rows: list[dict], peaks: dict) -> str:
    """Markdown table of the full-model cases.

    Args:
      rows: `run_case` results (or cases with a 'skipped' reason).
      peaks: peak FLOP/s by dtype.

    Returns:
      The table.
    """
    head = [
        "backbone", "px", "classes", "batch", "dtype", "compile (s)", "step median (s)",
        "step min-max (s)", "images/s", "train GFLOP/image", "achieved TFLOP/s", "% of peak",
        "peak memory (GiB)", "XLA buffers (GiB)",
    ]  # fmt: skip
    out = [row(head), row(["---", "---:", "---:", "---:", "---"] + ["---:"] * 9)]
    for r in rows:
        cells = [r["backbone"], str(r["image_size"]), str(r["num_classes"]), str(r["batch_size"])]
        cells.append(r["dtype"])
        if "skipped" in r:
            out.append(row(cells + [f"skipped: {r['skipped']}"] + [""] * 8))
            continue
        flops = r["flops_per_step"]
        achieved = flops / r["step_s"] if flops else None
        peak = peaks.get(r["dtype"])
        cells += [
            f"{r['compile_s']:.1f}",
            f"{r['step_s']:.3f}",
            f"{r['step_min_s']:.3f}-{r['step_max_s']:.3f}",
            f"{r['images_per_s']:.1f}",
            _cell(flops and flops / r["batch_size"], ".1f", 1e-9),
            _cell(achieved, ".3f", 1e-12),
            _cell(achieved / peak if achieved and peak else None, ".1f", 100.0),
            _cell(r["peak_memory_bytes"], ".2f", 2.0**-30),
            _cell(r["xla_buffer_bytes"], ".2f", 2.0**-30),
        ]
        out.append(row(cells))
    return "\n".join(out)


def head_table(rows: list[dict]) -> str:
    """Markdown table of the head + losses cases, beside the authors' release.

    Args:
      rows: `run_case` results of kind 'head' (or cases with a 'skipped' reason).

    Returns:
      The table.
    """
    head = [
        "classes", "batch", "dtype", "compile (s)", "step median (ms)", "step min-max (ms)",
        "GFLOP/step", "authors, 2-core CPU (ms)", "ours / authors", "speed-up",
    ]  # fmt: skip
    out = [row(head), row(["---:", "---:", "---"] + ["---:"] * 7)]
    for r in rows:
        cells = [str(r["num_classes"]), str(r["batch_size"]), r["dtype"]]
        if "skipped" in r:
            out.append(row(cells + [f"skipped: {r['skipped']}"] + [""] * 6))
            continue
        ref = AUTHORS_HEAD_STEP_S.get(r["num_classes"])
        cells += [
            f"{r['compile_s']:.1f}",
            f"{r['step_s'] * 1e3:.1f}",
            f"{r['step_min_s'] * 1e3:.1f}-{r['step_max_s'] * 1e3:.1f}",
            _cell(r["flops_per_step"], ".3f", 1e-9),
            _cell(ref, ".0f", 1e3),
            _cell(ref and r["step_s"] / ref, ".3f"),
            "n/a" if ref is None else f"{ref / r['step_s']:.1f}x",
        ]
        out.append(row(cells))
    return "\n".join(out)


def write_section(path: str, key: str, text: str) -> None:
    """Puts `text` between this key's markers in `path`, keeping every other section."""
    begin, end = f"<!-- speed.py:{key} begin -->", f"<!-- speed.py:{key} end -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) + 1 :]
    else:
        title = (
            "# Training speed\n\nWritten by `benchmarks/speed.py`; one section per device kind, "
            "each replaced when the script runs again on that kind.\n\n"
        )
        new = (old or title).rstrip("\n") + "\n\n" + block
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(new)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _strs(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--classes", default="20,80", help="comma-separated numbers of classes")
    parser.add_argument("--batch_sizes", help="full model; default 8 on CPU, 64,128 otherwise")
    parser.add_argument(
        "--dtypes", help="full model; default float32 on CPU, bfloat16,float32 otherwise"
    )
    parser.add_argument("--steps", type=int, help="timed steps; default 5 on CPU, 20 otherwise")
    parser.add_argument("--head_batch", type=int, default=8)
    parser.add_argument("--head_dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--head_steps", type=int, default=20)
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--head", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--cpu_peak_gflops", type=float, help="CPU peak GFLOP/s (default: measure a matmul)"
    )
    parser.add_argument(
        "--time_budget_s",
        type=float,
        default=0,
        help="start no new case after this many seconds (0: no limit); the rest are listed as skipped",
    )
    parser.add_argument("--case_timeout_s", type=float, default=900)
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown file to update ('' for none)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        payload = json.loads(args._child)
        if payload.pop("probe", False):
            result = probe(payload["dtypes"], payload["cpu_peak_gflops"])
        else:
            result = run_case(payload)
        print("RESULT " + json.dumps(result), flush=True)
        return

    start = time.perf_counter()
    load_before = os.getloadavg()
    # The driver never initialises a backend (a GPU client would hold the memory the
    # cases need); a probe process reports the device.
    # On CPU the probe times a matmul per dtype: only those this run uses.
    dtypes_probe = sorted(set(_strs(args.dtypes or "float32")) | {args.head_dtype})
    info = _child(
        {"probe": True, "dtypes": dtypes_probe, "cpu_peak_gflops": args.cpu_peak_gflops}, 600
    )
    on_cpu = info["platform"] == "cpu"
    batch_sizes = _ints(args.batch_sizes) if args.batch_sizes else ([8] if on_cpu else [64, 128])
    dtypes = (
        _strs(args.dtypes) if args.dtypes else (["float32"] if on_cpu else ["bfloat16", "float32"])
    )
    steps = args.steps or (5 if on_cpu else 20)
    classes = _ints(args.classes)

    cases = []
    if args.head:
        cases += [
            {"kind": "head", "num_classes": k, "batch_size": args.head_batch,
             "dtype": args.head_dtype, "steps": args.head_steps}
            for k in classes
        ]  # fmt: skip
    if args.full:
        cases += [
            {"kind": "full", "backbone": args.backbone, "image_size": args.image_size,
             "num_classes": k, "batch_size": b, "dtype": d, "steps": steps}
            for b in sorted(batch_sizes, reverse=True) for d in dtypes for k in classes
        ]  # fmt: skip
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
    load_after = os.getloadavg()

    heads = [r for r in results if r["kind"] == "head"]
    fulls = sorted(
        (r for r in results if r["kind"] == "full"),
        key=lambda r: (r["batch_size"], r["dtype"] != "float32", r["num_classes"]),
    )
    done = [r for r in results if "skipped" not in r]
    memory = done[0]["memory_source"] if done else "n/a"
    device = info["device_kind"] + (f" ({info['cpu_model']})" if on_cpu else "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    peaks = info["peak_flops"]
    peak_text = ", ".join(f"{d} {v / 1e12:.3g} TFLOP/s" for d, v in sorted(peaks.items()))
    command = "python " + " ".join(
        [os.path.relpath(os.path.abspath(__file__), ROOT)] + sys.argv[1:]
    )
    lines = [
        f"## {info['platform'].upper()}: {device}",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"jax {info['jax']}, {info['device_count']} device(s) visible, "
        f"{cores} CPU core(s) for this process, Python {platform.python_version()}.",
        f"- Command: `{command}` (total {time.perf_counter() - start:.0f} s).",
        f"- Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}"
        + (
            " (other processes shared these cores: times are upper bounds)"
            if on_cpu and max(load_before[0], load_after[0]) > 0.5
            else ""
        )
        + ".",
        f"- Peak FLOP/s: {peak_text or 'unknown'} ({info['peak_note']}).",
        f"- Peak memory: {memory}, each case in its own process"
        + (" (includes the Python and XLA runtime)" if on_cpu else "")
        + "; XLA buffers: the compiled step's arguments + outputs + temporaries.",
        "- Every step is `mlcnc_jax.step.train_step` (two-way + FLA + FPC with every class's "
        "prototype valid, Adam with L2 decay, EMA, prototype statistics), jit-compiled with the "
        "state donated; the median is over the timed steps after one warm-up step; compile "
        "time is lowering + XLA compilation. FLOPs: XLA's cost analysis of the compiled step "
        "(forward + backward + update) divided by the batch.",
        "",
    ]
    if fulls:
        lines += [
            f"### {args.backbone} + MLC-NC head, {args.image_size} px, {steps} timed steps",
            "",
            full_table(fulls, peaks),
            "",
        ]
    if heads:
        lines += [
            "### MLC-NC head + losses alone, on a fixed random 2048 x 7 x 7 feature map",
            "",
            f"{args.head_steps} timed steps. The authors' PyTorch release takes 0.087 s (20 "
            "classes) and 0.549 s (80 classes) per head + loss step at batch 8 on a 2-core "
            'CPU (Python loops over images x classes); "ours / authors" is our step time '
            "over theirs"
            + (
                " (a CPU-to-CPU comparison)."
                if on_cpu
                else " (ours on this device, theirs on CPU)."
            ),
            "",
            head_table(heads),
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(
            args.out, info["platform"] + "-" + re.sub(r"\W+", "_", info["device_kind"]), text
        )
        print(f"\nWrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
