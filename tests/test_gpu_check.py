"""The GPU check's input verdict: host input and device-resident rates, the summary table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import gpu_train_check as check


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
