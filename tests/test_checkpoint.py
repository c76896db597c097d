"""Checkpointer: a replicated state saved on 8 devices restores exactly, and orbax writes
its small arrays from one replica (see checkpoint.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)."""

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from mlcnc_jax import checkpoint


def test_small_arrays_are_written_from_one_replica_large_ones_replica_parallel():
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    assert type(handler) is ocp.type_handlers.ArrayHandler
    assert handler._min_slice_bytes_for_replica_parallel == 1 << 20
    assert handler._use_replica_parallel  # still on for arrays above the threshold


def test_replicated_state_of_mixed_sizes_round_trips(tmp_path):
    assert jax.device_count() == 8
    replicated = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("d",)), PartitionSpec())
    rng = np.random.default_rng(0)
    host = {
        # 8 MiB: 1 MiB per replica, at the threshold, so written replica-parallel.
        "big": rng.normal(size=(2048, 1024)).astype(np.float32),
        "small": {f"w{i}": rng.normal(size=(16, 8)).astype(np.float32) for i in range(40)},
        "step": np.int32(7),
    }
    state = jax.tree.map(lambda a: jax.device_put(a, replicated), host)
    saver = checkpoint.Checkpointer(str(tmp_path), {"model": "m"})
    saver.save(7, state)  # in the background: the state may change meanwhile
    state = jax.tree.map(lambda a: a * 0, state)
    saver.wait_until_finished()
    restored = checkpoint.Checkpointer(str(tmp_path), {"model": "m"}).restore(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(host), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert jax.tree.leaves(restored)[0].sharding.is_equivalent_to(replicated, 2)
