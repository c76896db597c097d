"""Device mesh, sharding and pmap helpers, and multi-host start-up.

Two ways to run the one pure train step data-parallel:

- 'jit' (default): `jax.jit` over a 1-D device mesh with axis 'data'. Batches
  are global arrays sharded on 'data' (each host contributes its own rows);
  the state is replicated. XLA inserts the collectives.
- 'pmap': `jax.pmap` over the local devices with axis name 'data'. Batches get
  a leading device axis; the step all-gathers its outputs so every loss sees
  the global batch, and averages gradients and BatchNorm statistics with
  `lax.pmean`, which gives the same numbers as 'jit'.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


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
    import sys
    import threading
    import time

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
    import sys
    import time
    import traceback

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
    import sys

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


def make_mesh() -> Mesh:
    """A 1-D mesh over all global devices with the axis 'data'.

    Built directly (not with `jax.make_mesh`, whose Explicit axis types reject
    gradients that contract over the batch-sharded axis).
    """
    return Mesh(np.array(jax.devices()), (AXIS,))


def check_batch_size(global_batch: int) -> None:
    """Raises if the global batch cannot be split evenly over devices and hosts."""
    n = jax.device_count()
    if global_batch % n:
        raise ValueError(
            f"The global batch size {global_batch} is not divisible by the {n} devices "
            f"({jax.process_count()} host(s) x {jax.local_device_count()} local devices). "
            f"Set --config.train.batch_size (and --config.eval.batch_size) to a multiple of {n}."
        )


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Makes global arrays sharded on 'data' from this host's rows of the batch."""
    sharding = NamedSharding(mesh, P(AXIS))
    if jax.process_count() == 1:  # this host's rows are the global batch: one transfer call
        return jax.device_put(dict(batch), sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree on every device of the mesh (replicated)."""
    if jax.process_count() > 1:
        # JAX cannot move an array committed to one local device (e.g. restored from a
        # checkpoint) to other hosts; every host places its identical host copy instead.
        tree = jax.tree.map(
            lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x,
            tree,
        )
    return jax.device_put(tree, NamedSharding(mesh, P()))


def to_pmap(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reshapes a host batch [b, ...] to [local_devices, b / local_devices, ...]."""
    n = jax.local_device_count()
    return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}


def pmap_replicate(tree: Any) -> Any:
    """Copies a pytree onto every local device with a leading device axis."""
    n = jax.local_device_count()
    stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), tree)
    return jax.pmap(lambda x: x)(stacked)


def unreplicate(tree: Any) -> Any:
    """Takes the first device's copy of a pmap-replicated pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def to_host(x: jax.Array) -> np.ndarray:
    """Fetches a (possibly multi-host sharded) global array as one numpy array."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Placement:
    """Where the state and the batches live for one parallel mode ('jit' or 'pmap').

    Args:
      mode: 'jit' (state replicated on a 1-D mesh, batches sharded on 'data') or
        'pmap' (a leading local-device axis on both).
      mesh: the mesh ('jit'; default: all devices).
    """

    def __init__(self, mode: str = "jit", mesh: Mesh | None = None):
        if mode not in ("jit", "pmap"):
            raise ValueError(f"Unknown config.parallel {mode!r}: use 'jit' or 'pmap'.")
        self.mode = mode
        self.mesh = make_mesh() if mesh is None else mesh
        self.axis_name = AXIS if mode == "pmap" else None
        self._local_sharding = None

    def place(self, state: Any) -> Any:
        """A host state, placed for the train step."""
        return pmap_replicate(state) if self.axis_name else replicate(state, self.mesh)

    def unplace(self, state: Any) -> Any:
        """A placed state as one copy (what checkpoints and evaluation take)."""
        return unreplicate(state) if self.axis_name else state

    def shard(self, batch: dict[str, np.ndarray]) -> dict:
        """This host's rows of a batch, placed on the devices as the train step takes them.

        The copies are dispatched, not waited for: they overlap with running steps.
        """
        if self.axis_name:
            if self._local_sharding is None:
                local = Mesh(np.array(jax.local_devices()), (AXIS,))
                self._local_sharding = NamedSharding(local, P(AXIS))
            return jax.device_put(to_pmap(batch), self._local_sharding)
        return to_global(batch, self.mesh)

    def prefetch(self, batches: Iterator[dict], size: int = 2) -> Iterator[dict]:
        """`batches` placed on the devices `size` batches ahead of the one consumed.

        While the step of batch i runs, batch i + size is read on the host and copied to
        the devices (`shard` dispatches the copy without waiting for it).

        Args:
          batches: this host's batches (numpy).
          size: how many placed batches wait ahead of the consumer (>= 1).
        """
        queue: collections.deque = collections.deque()

        def fill(n: int) -> None:
            for batch in itertools.islice(batches, n):
                queue.append(self.shard(batch))

        fill(max(1, size))
        while queue:
            yield queue.popleft()
            fill(1)
