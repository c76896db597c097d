"""What the GPU check measures, and its result files as tables.

The step-time hook, XLA's FLOP count of the step, the host input alone and the step on
a device-resident batch (`benchmarks.gpu_train_check` runs them); `summarize` tables
the result files it writes (--out) and says whether the host keeps up.
"""

from __future__ import annotations

import json
import time

import numpy as np

from benchmarks.common import fmt, markdown_table, xla_flops


class StepTimes:
    """A trainer hook: the wall time per step and the losses.

    The Trainer reports the metrics of several steps at once (one fetch per log interval):
    reports less than `GROUP_GAP_S` apart are one fetch, timed when its last step ended.
    A step's time is the time since the previous fetch over the steps between them; the
    first fetch also holds the state's placement and compilation (`compile_s`).
    """

    GROUP_GAP_S = 2e-3  # a fetch reports its steps within microseconds; a step takes longer

    def __init__(self):
        self.times, self.losses, self.fla, self.scale = [], [], [], []
        self.compile_s, self.fetches = None, []  # fetches: (last step, time)
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
        pairs = zip(self.fetches, self.fetches[1:])
        self.times = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in pairs]
        first_step, first_time = self.fetches[0]
        others = (first_step - self._start_step - 1) * (np.median(self.times) if self.times else 0)
        self.compile_s = first_time - self._start - others
        self.losses.append(float(metrics["loss"]))
        self.fla.append(float(metrics.get("loss_fla", np.nan)))
        self.scale.append(float(metrics.get("logit_scale", np.nan)))
        if step % 50 == 0:
            print(
                f"step {step} loss {self.losses[-1]:.4f} fla {self.fla[-1]:.4f} logit scale "
                f"{self.scale[-1]:.3f} lr {float(metrics['learning_rate']):.2e}",
                flush=True,
            )


def chance_map(labels: np.ndarray, class_split: dict, draws: int = 20) -> float:
    """Mean total mAP of uniformly random scores (what a model that learnt nothing gets)."""
    from mlcnc_jax import metrics

    rng = np.random.default_rng(0)
    maps = [metrics.lt_map(rng.random(labels.shape), labels, class_split) for _ in range(draws)]
    return float(np.mean([m["total"] for m in maps]))


def step_flops(train_step, state, batch) -> float | None:
    """XLA's FLOP count of one train step (from the lowered program: no second compile).

    Sharded over several devices, XLA counts one device's share: the MFU is per chip.
    """
    return xla_flops(lambda: train_step.lower(state, batch))


def host_input_rate(batches, batch_size: int, steps: int) -> float:
    """Images/s of the host input alone: `steps` batches pulled, nothing sent to a device."""
    next(batches)  # the first batch pays for any set-up
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - t0)


def device_resident_rate(train_step, state, batch, batch_size: int, steps: int) -> float:
    """Images/s of `train_step` back to back on one device-resident batch (first call untimed)."""
    import jax

    state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return steps * batch_size / (time.perf_counter() - t0)


def input_verdict(trainer_rate: float, device_rate: float, tolerance: float = 0.9) -> str:
    """'host keeps up' when the Trainer reaches `tolerance` of the device-resident rate."""
    if trainer_rate >= tolerance * device_rate:
        return "host keeps up"
    idle = 100 * (1 - trainer_rate / device_rate)
    return f"device idles {idle:.0f} % of the time (input or loop overhead)"


def summarize(paths: list[str]) -> str:
    """A table of the throughput numbers of result files.

    Where a file holds the input check, a second table sets the Trainer's images/s with
    the real input beside the host input alone and the step on a device-resident batch,
    and says whether the host keeps up.
    """
    rows, input_rows = [], []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        mem, step_s, mfu = r.get("peak_memory_bytes"), r.get("step_median_s"), r.get("mfu")
        rows.append(
            [
                str(r["batch_size"]),
                fmt(r.get("images_per_s"), ".0f"),
                fmt(step_s and 1e3 * step_s, ".1f"),
                fmt(r.get("compile_s"), ".1f"),
                fmt(mem and mem / 2**30, ".1f"),
                fmt(mfu and 100 * mfu, ".1f"),
                r["device"],
            ]
        )
        device, trainer = r.get("device_resident_images_per_s"), r.get("images_per_s")
        if device and trainer:
            input_rows.append(
                [
                    str(r["batch_size"]),
                    r["dtype"],
                    fmt(r.get("host_input_images_per_s"), ".0f"),
                    fmt(trainer, ".0f"),
                    fmt(device, ".0f"),
                    f"{trainer / device:.2f}",
                    input_verdict(trainer, device),
                ]
            )
    header = ["batch", "images/s", "step ms", "compile s", "peak GiB", "MFU %", "device"]
    text = markdown_table(header, rows)
    if input_rows:
        header = [
            "batch", "dtype", "host input alone (images/s)", "Trainer, real input (images/s)",
            "step on a device-resident batch (images/s)", "Trainer / device-resident", "verdict",
        ]  # fmt: skip
        text += (
            "\n\nDoes the host keep up? Real input here: numpy batches of the project's sampler "
            "over images decoded once up front (data.arrays; no TensorFlow on this host, so no "
            "tf.data JPEG decoding: see benchmarks.input_pipeline for its cost per host core).\n\n"
            + markdown_table(header, input_rows, ["---:", "---"] + ["---:"] * 4 + ["---"])
        )
    return text
