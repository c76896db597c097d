"""The speed benchmark's device probes and report: peak FLOP/s and memory, XLA's costs,
the tables and this device's section of the results file.

`probe`, `common.peak_memory` and `compiled_costs` run in a case's own process (the driver
never initialises a backend); the rest formats the cases' results.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

from benchmarks.common import cpu_model, fmt, row, xla_flops

# Dense peak TFLOP/s per chip (vendors' data sheets) by dtype; float32 on Ampere and later
# runs as TF32 on the tensor cores (XLA's default precision), so TF32's peak is the one.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}, "H100 PCIe dense; float32 as TF32"),
    ("H100", {"bfloat16": 989.0, "float32": 495.0}, "H100 SXM dense; float32 as TF32"),
    ("H200", {"bfloat16": 989.0, "float32": 495.0}, "H200 (H100 SXM compute) dense; float32 as TF32"),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}, "A100 dense; float32 as TF32"),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}, "TPU v4 (float32 via bf16 passes)"),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}, "TPU v5e"),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}, "TPU v5p"),
)  # fmt: skip

# Seconds per head + loss training step of the authors' PyTorch release, batch 8,
# measured on a 2-core CPU like the one the CPU defaults target.
AUTHORS_HEAD_STEP_S = {20: 0.087, 80: 0.549}


def probe(dtypes: list[str], cpu_peak_gflops: float | None) -> dict:
    """The backend, device and peak FLOP/s per dtype (on CPU: given, or a measured matmul).

    Returns:
      platform, device_kind, device_count, jax, peak_flops {dtype: FLOP/s}, peak_note
      (and cpu_model on CPU).
    """
    import jax
    import jax.numpy as jnp

    dev = jax.local_devices()[0]
    info = {"platform": dev.platform, "device_kind": dev.device_kind, "jax": jax.__version__,
            "device_count": jax.local_device_count(), "peak_flops": {}, "peak_note": ""}  # fmt: skip
    if dev.platform != "cpu":
        for key, table, note in PEAK_TFLOPS:
            if key.lower() in dev.device_kind.lower():
                # The step runs on every device: their peaks add up.
                n = info["device_count"]
                info["peak_flops"] = {d: n * tflops * 1e12 for d, tflops in table.items()}
                info["peak_note"] = f"peak from the data sheet: {note}" + (
                    f", x {n}" if n > 1 else ""
                )
                return info
        return {**info, "peak_note": f"no peak FLOP/s known for {dev.device_kind!r}"}
    info["cpu_model"] = cpu_model()
    if cpu_peak_gflops:
        info["peak_flops"] = {d: cpu_peak_gflops * 1e9 for d in dtypes}
        info["peak_note"] = f"CPU peak given by --cpu_peak_gflops={cpu_peak_gflops}"
        return info
    n, matmul = 2048, jax.jit(lambda x: x @ x)
    for d in dtypes:
        a = jax.block_until_ready(jnp.ones((n, n), d))
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


def compiled_costs(compiled) -> tuple[float | None, int | None]:
    """XLA's FLOPs of a compiled step over all the devices, and one device's buffer bytes
    (arguments + outputs + temporaries, less the donated); None where not counted."""
    import jax

    # The run's step is data-parallel over every device; XLA counts one device's share.
    flops = xla_flops(compiled)
    flops = flops * jax.device_count() if flops is not None else None
    try:
        m = compiled.memory_analysis()
        size = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
        return flops, int(size - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it; the column is then empty
        return flops, None


def full_table(rows: list[dict], peaks: dict) -> str:
    """Markdown table of the full-model cases (`speed.run_case` results or skipped cases).

    Args:
      rows: the cases' results (a skipped one has a 'skipped' reason).
      peaks: peak FLOP/s by dtype.
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
            fmt(flops and flops / r["batch_size"], ".1f", 1e-9),
            fmt(achieved, ".3f", 1e-12),
            fmt(achieved / peak if achieved and peak else None, ".1f", 100.0),
            fmt(r["peak_memory_bytes"], ".2f", 2.0**-30),
            fmt(r["xla_buffer_bytes"], ".2f", 2.0**-30),
        ]
        out.append(row(cells))
    return "\n".join(out)


def head_table(rows: list[dict]) -> str:
    """Markdown table of the head + losses cases, beside the authors' release."""
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
            fmt(r["flops_per_step"], ".3f", 1e-9),
            fmt(ref, ".0f", 1e3),
            fmt(ref and r["step_s"] / ref, ".3f"),
            "n/a" if ref is None else f"{ref / r['step_s']:.1f}x",
        ]
        out.append(row(cells))
    return "\n".join(out)


def section(info: dict, results: list[dict], args, steps, command, seconds, loads) -> str:
    """This device's section of the results file: how it was measured, then the tables.

    Args:
      info: the probe's device facts.
      results: every case's result (or the case with a 'skipped' reason).
      args: the command line (backbone, image_size, head_steps).
      steps: timed steps of the full-model cases.
      command: the command that ran.
      seconds: how long it took.
      loads: the 1-minute load average before and after.
    """
    on_cpu = info["platform"] == "cpu"
    done = [r for r in results if "skipped" not in r]
    memory = done[0]["memory_source"] if done else "n/a"
    device = info["device_kind"] + (f" ({info['cpu_model']})" if on_cpu else "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    peaks = ", ".join(f"{d} {v / 1e12:.3g} TFLOP/s" for d, v in sorted(info["peak_flops"].items()))
    shared = on_cpu and max(loads) > 0.5
    lines = [
        f"## {info['platform'].upper()}: {device}",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"jax {info['jax']}, {info['device_count']} device(s) visible, "
        f"{cores} CPU core(s) for this process, Python {platform.python_version()}.",
        f"- Command: `{command}` (total {seconds:.0f} s).",
        f"- Load average (1 min) before / after: {loads[0]:.2f} / {loads[1]:.2f}"
        + (" (other processes shared these cores: times are upper bounds)" if shared else "")
        + ".",
        f"- Peak FLOP/s: {peaks or 'unknown'} ({info['peak_note']}).",
        f"- Peak memory: {memory}, each case in its own process"
        + (" (includes the Python and XLA runtime)" if on_cpu else "")
        + "; XLA buffers: the compiled step's arguments + outputs + temporaries.",
        "- Every step is the run's compiled step (`experiment.build(...).trainer.train_step`: "
        "two-way + FLA + FPC with every class's prototype valid, Adam with L2 decay, EMA, "
        "prototype statistics; the state donated); the median is over the timed steps after "
        "one warm-up step; compile time is lowering + XLA compilation. FLOPs: XLA's cost "
        "analysis of the compiled step (forward + backward + update) divided by the batch.",
        "",
    ]
    heads = [r for r in results if r["kind"] == "head"]
    fulls = sorted(
        (r for r in results if r["kind"] == "full"),
        key=lambda r: (r["batch_size"], r["dtype"] != "float32", r["num_classes"]),
    )
    if fulls:
        title = f"### {args.backbone} + MLC-NC head, {args.image_size} px, {steps} timed steps"
        lines += [title, "", full_table(fulls, info["peak_flops"]), ""]
    if heads:
        where = "a CPU-to-CPU comparison" if on_cpu else "ours on this device, theirs on CPU"
        lines += [
            "### MLC-NC head + losses alone, on a fixed random 2048 x 7 x 7 feature map",
            "",
            f"{args.head_steps} timed steps. The authors' PyTorch release takes 0.087 s (20 "
            "classes) and 0.549 s (80 classes) per head + loss step at batch 8 on a 2-core "
            'CPU (Python loops over images x classes); "ours / authors" is our step time '
            f"over theirs ({where}).",
            "",
            head_table(heads),
            "",
        ]
    return "\n".join(lines)


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
