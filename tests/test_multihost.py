"""Multi-host training on one machine: 2 and 4 JAX processes against a single-process run.

Each process is a subprocess running tests/multihost_worker.py (gloo CPU
collectives, loopback coordinator). The single-process reference runs here with
the 8 devices of conftest.py; the multi-process runs use 2 processes x 4 devices
and 4 processes x 2 devices (the same 8 devices, so the same XLA partitioning). The global batch (16) and the eval batch (256) are
the same everywhere, so every run must see the same batches, losses, weights and
test-set scores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from multihost_worker import instrument
from test_train import tiny_config

from mlcnc_jax import checkpoint, cli, experiment, parallel, processes

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
# 4 steps: an epoch of FLA warm-up, then an epoch of the full loss; checkpoints at steps 2
# and 4, one evaluation at the end.
OVERRIDES = {"train.steps_per_epoch": 2, "train.log_every_steps": 1, "train.learning_rate": 1e-5}
STEPS = 4
LAUNCH_TIMEOUT_S = 420
# The processes sum gradients across hosts over gloo, in another order than XLA sums them
# over the devices of one process, and Adam's normalisation magnifies the float32 rounding
# of near-zero gradient entries into steps of up to the learning rate: at lr 1e-3 the
# losses agree to about 3e-5 and a few parameter entries to 4e-4. At lr 1e-5 (still
# enough for a wrong gradient to change the later losses far beyond TOL) everything agrees
# to TOL, except the prototype sums: sums of L2-normalised projections, where a projection
# of small norm turns rounding into a larger change of direction.
TOL = 1e-5
# The attention's key bias has an exactly zero gradient (softmax ignores a shift shared by
# all keys): Adam turns the rounding noise in it into full-size steps, so it is not compared.
ZERO_GRADIENT = re.compile(r"\['key'\]\['bias'\]$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    num_processes: int,
    local_devices: int,
    data_root,
    workdir,
    record,
    *,
    from_env: bool = False,
    extra_args: tuple[str, ...] = (),
    overrides: dict | None = None,
    expect_failure: bool = False,
) -> list[dict] | tuple[list[int | None], list[str]]:
    """Runs the worker in `num_processes` processes; returns their records.

    A failed process makes the others wait forever at the next collective, so
    the first failure (or the deadline) kills them all; they are killed on any
    way out of this function.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    }
    # One process per host: `local_devices` CPU devices each (not conftest.py's 8).
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    port = free_port()
    logs = [os.path.join(str(record), f"log_{i}.txt") for i in range(num_processes)]
    os.makedirs(record, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for i in range(num_processes):
            cmd = (
                [
                    sys.executable,
                    WORKER,
                    f"--port={port}",
                    f"--num_processes={num_processes}",
                    f"--process_id={i}",
                    f"--data_root={data_root}",
                    f"--workdir={workdir}",
                    f"--record={record}",
                    f"--overrides={json.dumps({**OVERRIDES, **(overrides or {})})}",
                ]
                + (["--from_env"] if from_env else [])
                + list(extra_args)
            )
            with open(logs[i], "w") as log:
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if (failed and not expect_failure) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    codes = [p.returncode for p in procs]
    if expect_failure:  # every process must have ended by itself (None: it had to be killed)
        return [None if c == -signal.SIGKILL else c for c in codes], [
            open(log).read() for log in logs
        ]
    if any(codes):

        def tail(path):
            with open(path) as f:
                return "".join(f.readlines()[-25:])

        details = "\n".join(
            f"--- process {i} (exit {c}):\n{tail(logs[i])}" for i, c in enumerate(codes)
        )
        pytest.fail(
            f"{num_processes}-process run failed or timed out (exit codes {codes}):\n{details}"
        )
    records = []
    for i in range(num_processes):
        with open(os.path.join(str(record), f"process_{i}.json")) as f:
            records.append(json.load(f))
    return records


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The single-process run: what it fed, its losses, results, final state and workdir."""
    workdir = str(tmp_path_factory.mktemp("single"))
    config = tiny_config(data_root, **OVERRIDES)
    seen, run_kwargs = instrument()
    results = cli.run(config, workdir, "train", **run_kwargs)
    run = experiment.build(config, workdir)
    state = run.initial_state()  # the last checkpoint: step 4
    assert int(state.step) == STEPS
    return {
        "config": config,
        "workdir": workdir,
        "seen": seen,
        "results": results,
        "state": state,
        "fingerprint": run.checkpointer.fingerprint,
    }


def flat(tree) -> dict:
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_same_state(restored, expected) -> None:
    """Params, BatchNorm statistics, EMA, prototypes and step of two states agree.

    Every entry within TOL (prototype sums within 10 * TOL; see TOL), except the
    attention's key bias, whose gradient is exactly zero.
    """
    assert int(restored.step) == int(expected.step)
    for part in ("params", "batch_stats", "ema", "prototypes"):
        got, want = flat(getattr(restored, part)), flat(getattr(expected, part))
        assert got.keys() == want.keys()
        for key in want:
            if ZERO_GRADIENT.search(key):
                continue
            g, w = got[key].astype(np.float64), want[key].astype(np.float64)
            tol = 10 * TOL if part == "prototypes" else TOL
            np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=f"{part}{key}")


def workdir_names(workdir) -> set[str]:
    """Top-level names of a workdir, with TensorBoard event files reduced to their prefix."""
    return {
        "events.out.tfevents" if n.startswith("events.out.tfevents") else n
        for n in os.listdir(workdir)
    }


def check_run(records, reference, workdir, *, num_processes, local_devices, first_step) -> None:
    """What every multi-process run must show against the single-process reference."""
    seen = reference["seen"]
    steps = range(first_step, STEPS)
    for i, r in enumerate(records):
        assert (r["process_index"], r["process_count"]) == (i, num_processes)
        assert (r["local_device_count"], r["device_count"]) == (
            local_devices,
            local_devices * num_processes,
        )
        assert r["final_step"] == STEPS
        # Every process computes the global batch's loss: that of the single-process run.
        np.testing.assert_allclose(r["losses"], seen["losses"][first_step:], rtol=TOL, atol=TOL)
        # Test-set scores (the tiny config's 256 evaluation images, over all hosts) give the same
        # per-class AP. (A 4-step model's scores are nearly tied, so rounding reorders a few.)
        np.testing.assert_allclose(r["ap_raw"], reference["results"].final.raw.ap, atol=1e-3)

    # Each host read only its own contiguous slice of the single-process global batch.
    host_rows = 16 // num_processes
    for n, step in enumerate(steps):
        full = seen["batches"][step]
        parts = [r["batches"][n] for r in records]
        assert [p["rows"] for p in parts] == [host_rows] * num_processes
        assert sum((p["image_sha"] for p in parts), []) == full["image_sha"]
        assert sum((p["labels"] for p in parts), []) == full["labels"]

    # Only process 0 writes logs and reports; in checkpoints the others write their own
    # share of the array data (orbax saves replicated arrays replica-parallel) and nothing else.
    writes0 = {w.split(" ", 1)[1] for w in records[0]["writes"]}
    assert {f"eval_{STEPS}.json", f"ap_vs_freq_{STEPS}.png"} <= writes0
    assert any(w.startswith(f"checkpoints/{STEPS}.orbax-checkpoint-tmp/") for w in writes0)
    tmp = r"(\.orbax-checkpoint-tmp)?"
    for i, r in enumerate(records[1:], start=1):
        # Its workdir lock (run.<i>.lock; and the workdir itself if it came first) too.
        own = re.compile(
            rf"checkpoints/\d+{tmp}/state{tmp}/(array_metadatas/process_{i}|ocdbt\.process_{i}(/.*)?)$"
            rf"|run\.{i}\.lock|\.$"
        )
        stray = [w for w in r["writes"] if not own.match(w.split(" ", 1)[1])]
        assert not stray, f"process {i} wrote outside its checkpoint shard: {stray}"
    # TensorBoard files are written in C++, out of the audit hook's sight: their name has the pid.
    events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
    assert len(events) == 1 and f".{records[0]['pid']}." in events[0], events
    assert workdir_names(workdir) == workdir_names(reference["workdir"])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(
    reference, data_root, tmp_path
):
    workdir = tmp_path / "workdir"
    records = launch(2, 4, data_root, workdir, tmp_path / "record")
    check_run(records, reference, workdir, num_processes=2, local_devices=4, first_step=0)
    # The 2-process checkpoint restores in this single process, to the reference's state.
    restored = checkpoint.Checkpointer(str(workdir), reference["fingerprint"]).restore(
        reference["state"]
    )
    assert_same_state(restored, reference["state"])


def test_four_processes_resume_a_single_process_checkpoint(reference, data_root, tmp_path):
    # Start from the single-process run's step-2 checkpoint; the coordinator comes from
    # the JAX_* environment variables this time.
    workdir = tmp_path / "workdir"
    shutil.copytree(
        os.path.join(reference["workdir"], "checkpoints", "2"), workdir / "checkpoints" / "2"
    )
    records = launch(4, 2, data_root, workdir, tmp_path / "record", from_env=True)
    check_run(records, reference, workdir, num_processes=4, local_devices=2, first_step=2)
    restored = checkpoint.Checkpointer(str(workdir), reference["fingerprint"]).restore(
        reference["state"]
    )
    assert_same_state(restored, reference["state"])


def test_a_failure_on_one_process_ends_them_all(reference, data_root, tmp_path):
    # The backbone comes from the single-process run's workdir (a pre-training run, as in the
    # quick start): every process reads it. Then process 1 fails at step 3 while process 0
    # waits for it in the step's collectives: both must end on their own, with the error,
    # well before the heartbeat timeout (100 s).
    start = time.monotonic()
    codes, logs = launch(
        2,
        4,
        data_root,
        tmp_path / "workdir",
        tmp_path / "record",
        extra_args=("--fail_at_step=3",),
        overrides={"model.pretrained": reference["workdir"]},
        expect_failure=True,
    )
    # Each ended by itself with an error code (none had to be killed by this test).
    assert all(c not in (None, 0) for c in codes), (codes, [log[-3000:] for log in logs])
    assert time.monotonic() - start < LAUNCH_TIMEOUT_S
    assert "RuntimeError: injected failure at step 3" in logs[1]
    assert "process 1 failed: RuntimeError: injected failure at step 3" in logs[0]
    assert "stopping process 0 too" in logs[0]
    # Nothing of step 3 was saved; the step-2 checkpoint is kept and the locks are gone.
    assert sorted(os.listdir(tmp_path / "workdir" / "checkpoints")) == ["2"]
    assert not [n for n in os.listdir(tmp_path / "workdir") if n.endswith(".lock")]


def test_global_batch_not_divisible_by_devices_is_a_clear_error(data_root, tmp_path):
    assert jax.device_count() == 8
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by the 8 devices"):
        parallel.check_batch_size(12)
    config = tiny_config(data_root, **{"train.batch_size": 20})
    with pytest.raises(ValueError, match=r"train.batch_size = 20: must be a multiple of the 8"):
        cli.run(config, str(tmp_path), "train")
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({}, (None, None, None), {}),  # nothing given: JAX auto-detects (TPU VM, SLURM, ...)
        (
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3",
            },
            (None, None, None),
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3",
            },
            ("host:99", 2, 1),  # flags win over the environment
            {"coordinator_address": "host:99", "num_processes": 2, "process_id": 1},
        ),
    ],
)
def test_initialize_distributed_arguments(monkeypatch, env, args, expected):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    processes.initialize_distributed(*args)
    assert calls == [expected]
