"""The processes of a multi-host run: start-up, barriers, and one failure ending them all.

Every host runs the same command; `initialize_distributed` connects the processes through
JAX's coordination service. `sync` and `broadcast_flag` keep them in step where each process
decides something for itself (a barrier; process 0's answer for all). A process that fails
reports it with `end_all_processes`, and the `watch_for_failures` thread of every other
process ends that one too, so that none is left waiting in a collective. Device meshes,
sharding and placement are in parallel.py.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import jax
import numpy as np
from absl import logging


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts multi-host JAX.

    With no arguments JAX auto-detects the cluster (TPU VMs, SLURM, ...). The
    arguments, when given, come from flags or the environment variables
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.

    Args:
      coordinator_address: 'host:port' of process 0.
      num_processes: total number of processes.
      process_id: this process's index.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if jax.distributed.is_initialized():
        return
    # CPU processes exchange gradients through gloo. Set unconditionally: asking
    # for the backend here would initialise it, and JAX refuses to start
    # multi-host after that; the setting does nothing on TPUs and GPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        kwargs = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    jax.distributed.initialize(**kwargs)
    logging.info(
        "Process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


FAILURE_KEY = "mlcnc_jax/failure"
_WATCH_INTERVAL_S = 0.5
_SERVICE_GRACE_S = 3.0


def _client():
    from jax._src import distributed  # the coordination service's key-value store

    return distributed.global_state.client


def watch_for_failures(interval_s: float = _WATCH_INTERVAL_S) -> Callable[[], None]:
    """Ends this process as soon as another process of the run reports a failure.

    A process that fails while the others wait in a collective (a barrier, an
    all-reduce of the next step) would leave them waiting until the coordination
    service's heartbeat timeout, or forever. `end_all_processes` writes the
    failure to the coordination service's key-value store; this daemon thread
    polls it and, when it appears, prints which process failed and why, then
    exits with code 1.

    Returns:
      A function that stops the watch (call it before JAX's distributed shutdown:
      the store must not be polled while it is torn down).
    """
    client = _client()
    if client is None:
        return lambda: None
    me = jax.process_index()
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.wait(interval_s):
            message = _reported_failure(client)
            if message is None or message.startswith(f"process {me} failed"):
                continue  # nothing yet, or this process's own report (it is exiting)
            print(f"mlcnc_jax: {message}; stopping process {me} too.", file=sys.stderr, flush=True)
            if me == 0:
                # Process 0 hosts the coordination service: the others abort when it goes,
                # so it leaves last.
                time.sleep(_SERVICE_GRACE_S)
            _exit_now()

    thread = threading.Thread(target=watch, name="mlcnc_jax-failure-watch", daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join()

    return stop


def end_all_processes(error: BaseException) -> None:
    """Reports `error` to every process of the run, prints it and ends this process (code 1).

    Called where a multi-process run fails; the other processes' `watch_for_failures`
    threads end them with the same message. Never returns.
    """
    me = jax.process_index()
    if isinstance(error, SystemExit) and not error.code:
        raise error  # a normal exit is not a failure
    message = f"process {me} failed: {type(error).__name__}: {error}"
    client = _client()
    first = _reported_failure(client)
    if first is not None:  # this error follows another process's (e.g. a broken connection)
        print(
            f"mlcnc_jax: {first}; stopping process {me} too (here: {type(error).__name__}).",
            file=sys.stderr,
            flush=True,
        )
        _exit_now()
    try:
        if client is not None:
            client.key_value_set(FAILURE_KEY, message[:4000])
    except Exception:  # noqa: BLE001 - another process reported at the same moment
        pass
    traceback.print_exception(error, file=sys.stderr)
    print(f"mlcnc_jax: {message}; ending all processes.", file=sys.stderr, flush=True)
    # Stay until the others have read the message: exiting at once could break their
    # collectives first, and they would report that instead of the cause. (Process 0, which
    # hosts the coordination service, waits longer: the others abort when it is gone.)
    time.sleep(_SERVICE_GRACE_S if me == 0 else 2 * _WATCH_INTERVAL_S)
    _exit_now()


def _reported_failure(client) -> str | None:
    if client is None:
        return None
    try:
        return client.key_value_try_get(FAILURE_KEY)
    except Exception:  # noqa: BLE001 - no failure reported
        return None


def _exit_now() -> None:
    # os._exit skips the atexit hooks, which could wait on the other processes (JAX's
    # distributed shutdown); the workdir locks are released first, by hand.
    from mlcnc_jax import workdir_lock

    workdir_lock.release_all()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def sync(name: str) -> None:
    """A barrier of all processes (nothing to wait for in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_flag(flag: bool) -> bool:
    """Process 0's value of `flag`, on every process (so all take the same branch)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))
