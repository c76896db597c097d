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

import os
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

    def place(self, state: Any) -> Any:
        """A host state, placed for the train step."""
        return pmap_replicate(state) if self.axis_name else replicate(state, self.mesh)

    def unplace(self, state: Any) -> Any:
        """A placed state as one copy (what checkpoints and evaluation take)."""
        return unreplicate(state) if self.axis_name else state

    def shard(self, batch: dict[str, np.ndarray]) -> dict:
        """This host's rows of a batch, laid out for the train step."""
        return to_pmap(batch) if self.axis_name else to_global(batch, self.mesh)
