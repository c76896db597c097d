"""benchmarks.speed: one real head + loss case (tiny), the tables and the results file."""

import numpy as np
import pytest

from benchmarks import speed, speed_report


def _cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in line[2:-2].split(" | ")]


def test_head_case_runs_the_real_step_and_counts_its_flops():
    k, b = 3, 8  # b: a multiple of the tests' 8 devices
    r = speed.run_case(
        {"kind": "head", "num_classes": k, "batch_size": b, "dtype": "float32", "steps": 2}
    )
    assert r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
    assert r["images_per_s"] == pytest.approx(b / r["step_s"])
    assert np.isfinite(r["final_loss"]) and r["final_loss"] > 0
    # Independent bounds on XLA's count: the token embedding (49 x 2048 -> 768) alone costs
    # 2*B*49*2048*768 FLOPs forward and as much again for its weight gradient; all the
    # head's matmuls (embedding, key/value/query/out projections, per-class projection)
    # forward, times 3 for forward + backward, bound it from above with room to spare.
    n, c, d, p = 49, 2048, 768, 20
    embed = 2 * b * n * c * d
    forward = embed + 2 * (2 * b * n * d * d) + 2 * k * d * d + 2 * (2 * b * k * d * d)
    forward += 2 * (2 * b * k * n * d) + 2 * b * k * d * p
    assert 2 * embed <= r["flops_per_step"] <= 3 * forward * 1.5
    assert r["peak_memory_bytes"] > 0 and r["memory_source"] == "process max RSS"


def _result(**kw):
    base = {
        "kind": "full",
        "backbone": "resnet50",
        "image_size": 224,
        "num_classes": 20,
        "batch_size": 8,
        "dtype": "float32",
        "compile_s": 30.0,
        "step_s": 2.0,
        "step_min_s": 1.9,
        "step_max_s": 2.5,
        "images_per_s": 4.0,
        "flops_per_step": 8 * 25e9,
        "peak_memory_bytes": 3 * 2**30,
        "xla_buffer_bytes": 2**30,
    }
    return {**base, **kw}


def test_full_table_columns_and_derived_numbers():
    rows = [
        _result(),
        _result(num_classes=80, flops_per_step=None),
        {**_result(batch_size=128), "skipped": "time budget 100 s spent"},
    ]
    lines = speed_report.full_table(rows, {"float32": 1e12}).splitlines()
    assert len(lines) == 2 + len(rows)
    header = _cells(lines[0])
    assert all(len(_cells(line)) == len(header) for line in lines)
    first = dict(zip(header, _cells(lines[2]), strict=True))
    assert first["train GFLOP/image"] == "25.0"  # 200 GFLOP / 8 images
    assert first["achieved TFLOP/s"] == "0.100"  # 200 GFLOP in 2 s
    assert first["% of peak"] == "10.0"  # of 1 TFLOP/s
    assert first["peak memory (GiB)"] == "3.00"
    no_flops = dict(zip(header, _cells(lines[3]), strict=True))
    assert no_flops["train GFLOP/image"] == no_flops["% of peak"] == "n/a"
    assert "skipped: time budget" in lines[4]


def test_head_table_compares_with_the_authors_numbers():
    rows = [
        _result(kind="head", num_classes=20, step_s=0.0435, flops_per_step=6e9),
        _result(kind="head", num_classes=80, step_s=0.0549, flops_per_step=8e9),
        _result(kind="head", num_classes=7, step_s=0.01, flops_per_step=1e9),
    ]
    lines = speed_report.head_table(rows).splitlines()
    header = _cells(lines[0])
    r20, r80, r7 = (dict(zip(header, _cells(line), strict=True)) for line in lines[2:])
    assert r20["ours / authors"] == "0.500" and r20["speed-up"] == "2.0x"  # 43.5 / 87 ms
    assert r80["ours / authors"] == "0.100" and r80["speed-up"] == "10.0x"  # 54.9 / 549 ms
    assert r20["step median (ms)"] == "43.5"
    assert r7["authors, 2-core CPU (ms)"] == r7["speed-up"] == "n/a"  # no reference for K=7


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = str(tmp_path / "speed.md")
    speed_report.write_section(path, "cpu-cpu", "CPU table v1")
    speed_report.write_section(path, "gpu-H100", "GPU table")
    speed_report.write_section(path, "cpu-cpu", "CPU table v2")
    text = open(path).read()
    assert text.startswith("# Training speed")
    assert "CPU table v2" in text and "CPU table v1" not in text and "GPU table" in text
    assert text.count("<!-- speed.py:cpu-cpu begin -->") == 1
    assert text.index("CPU table v2") < text.index("GPU table")  # order kept
