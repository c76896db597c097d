"""The GPU check's input verdict: host input and device-resident rates, the summary table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import gpu_measure as check


def test_device_resident_rate_times_steps_after_one_untimed_call(monkeypatch):
    calls = []

    def step(state, batch):
        calls.append(state)
        return state + 1, {"loss": np.float32(0.0)}

    clock = iter([10.0, 12.0])  # start, end: 2 s for the timed steps
    monkeypatch.setattr(check.time, "perf_counter", lambda: next(clock))
    rate = check.device_resident_rate(step, 0, {"image": None}, batch_size=8, steps=5)
    assert calls == [0, 1, 2, 3, 4, 5]  # one warm-up call, then 5 timed ones, state threaded
    assert rate == pytest.approx(5 * 8 / 2.0)


def test_host_input_rate_skips_the_first_batch(monkeypatch):
    pulled = []
    batches = iter(range(100))
    clock = iter([1.0, 5.0])

    def take():
        pulled.append(next(batches))
        return pulled[-1]

    monkeypatch.setattr(check.time, "perf_counter", lambda: next(clock))
    rate = check.host_input_rate(iter(take, None), batch_size=4, steps=10)
    assert len(pulled) == 11 and rate == pytest.approx(10 * 4 / 4.0)


@pytest.mark.parametrize(
    "trainer,device,verdict",
    [(950.0, 1000.0, "host keeps up"), (900.0, 1000.0, "host keeps up"),
     (600.0, 1000.0, "device idles 40 % of the time (input or loop overhead)")],
)  # fmt: skip
def test_input_verdict(trainer, device, verdict):
    assert check.input_verdict(trainer, device) == verdict


def test_summary_sets_the_trainer_beside_the_device_resident_step(tmp_path):
    result = {
        "batch_size": 64, "dtype": "bfloat16", "device": "gpu / H100", "images_per_s": 1500.0,
        "step_median_s": 64 / 1500.0, "compile_s": 50.0, "peak_memory_bytes": 2**33,
        "mfu": 0.05, "host_input_images_per_s": 40000.0, "device_resident_images_per_s": 2000.0,
    }  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    text = check.summarize([str(path)])
    row = [line for line in text.splitlines() if line.startswith("| 64 | bfloat16")]
    assert row == [
        "| 64 | bfloat16 | 40000 | 1500 | 2000 | 0.75 | device idles 25 % of the time "
        "(input or loop overhead) |"
    ]
    assert "no TensorFlow on this host" in text
    # A result without the input check gets the throughput table only.
    path.write_text(json.dumps({**result, "device_resident_images_per_s": None}))
    assert "Does the host keep up" not in check.summarize([str(path)])


def _report(times, monkeypatch, calls):
    """Feeds StepTimes `calls` [(step, time)] after on_start at time 0."""
    clock = iter([0.0] + [t for _, t in calls])
    monkeypatch.setattr(check.time, "perf_counter", lambda: next(clock))
    times.on_start(None, 0)
    metrics = {"loss": 1.0, "learning_rate": 1e-3}
    for step, _ in calls:
        times.on_step(step, metrics)
    return times


def test_step_times_reported_one_step_at_a_time(monkeypatch):
    t = _report(check.StepTimes(), monkeypatch, [(1, 5.0), (2, 5.1), (3, 5.3), (4, 5.4)])
    assert t.times == pytest.approx([0.1, 0.2, 0.1])
    assert t.compile_s == pytest.approx(5.0)  # placing, compiling and step 1
    assert len(t.losses) == 4


def test_step_times_reported_a_log_interval_at_a_time(monkeypatch):
    # Steps 1-4 fetched together at 10 s, 5-8 at 10.4 s, 9-12 at 10.8 s (one fetch's
    # reports are microseconds apart): 0.1 s a step, and the first fetch's 4 steps hold
    # the compilation and 3 steps.
    calls = [(s, 10.0 + 1e-6 * s) for s in range(1, 5)]
    calls += [(s, 10.4 + 1e-6 * s) for s in range(5, 9)]
    calls += [(s, 10.8 + 1e-6 * s) for s in range(9, 13)]
    t = _report(check.StepTimes(), monkeypatch, calls)
    assert t.fetches == [(4, pytest.approx(10.0, abs=1e-5)), (8, pytest.approx(10.4, abs=1e-5)),
                         (12, pytest.approx(10.8, abs=1e-5))]  # fmt: skip
    assert t.times == pytest.approx([0.1, 0.1], abs=1e-5)
    assert t.compile_s == pytest.approx(10.0 - 3 * 0.1, abs=1e-4)
    assert len(t.losses) == 12


@pytest.mark.parametrize(
    "model,steps,warmup,epoch,warmup_steps",
    [("mlcnc", 500, 90, 10, 90), ("mlcnc", 6, 2, 2, 2), ("mlcnc", 36, 0, 18, 0),
     ("baseline", 500, 90, 10, 0), ("mlcnc", 7, 3, 1, 3)],
)  # fmt: skip
def test_the_run_takes_exactly_the_asked_steps_and_warm_up(
    model, steps, warmup, epoch, warmup_steps
):
    # 1,104 images at batch 64: one pass is 18 steps; the epoch is the longest one up to
    # that which both counts fill whole (500 and 90: 10; 36 and 0: 18; 7 and 3: 1).
    from benchmarks import gpu_train_check
    from mlcnc_jax.state import step_counts

    args = gpu_train_check.parser().parse_args(
        ["--model", model, "--steps", str(steps), "--warmup_steps", str(warmup)]
    )
    config = gpu_train_check.experiment_config(args, num_train=1104)
    counts = step_counts(config, np.zeros((1104, 3), np.uint8))
    assert counts.steps_per_epoch == epoch
    assert counts.total_steps == steps and counts.warmup_steps == warmup_steps
    # One evaluation and one save, at the last step.
    assert config.train.eval_every_epochs * epoch == steps
    assert config.train.checkpoint_every_steps == steps
