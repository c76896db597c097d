"""Device mesh, sharding and pmap helpers: where the state and the batches live.

Two ways to run the one pure train step data-parallel:

- 'jit' (default): `jax.jit` over a 1-D device mesh with axis 'data'. Batches
  are global arrays sharded on 'data' (each host contributes its own rows);
  the state is replicated. XLA inserts the collectives.
- 'pmap': `jax.pmap` over the local devices with axis name 'data'. Batches get
  a leading device axis; the step all-gathers its outputs so every loss sees
  the global batch, and averages gradients and BatchNorm statistics with
  `lax.pmean`, which gives the same numbers as 'jit'.

Starting the processes of a multi-host run, and ending them all on a failure, is
processes.py's job.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


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
