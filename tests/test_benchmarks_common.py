"""benchmarks.common: the device probes every benchmark driver reads."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common


def test_xla_flops_of_a_matmul():
    matmul = jax.jit(lambda a, b: a @ b)
    a, b = jnp.ones((4, 8)), jnp.ones((8, 16))
    # A (4, 8) x (8, 16) product: 4 * 16 outputs, each 8 multiplies and 8 adds.
    assert common.xla_flops(matmul.lower(a, b)) == 2 * 4 * 8 * 16
    assert common.xla_flops(matmul.lower(a, b).compile()) == 2 * 4 * 8 * 16
    assert common.xla_flops(lambda: matmul.lower(a, b)) == 2 * 4 * 8 * 16


class _Stage:
    def __init__(self, cost):
        self.cost = cost

    def cost_analysis(self):
        if isinstance(self.cost, Exception):
            raise self.cost
        return self.cost


@pytest.mark.parametrize(
    "cost, flops",
    [
        ({"flops": 3.0, "bytes accessed": 9.0}, 3.0),
        ([{"flops": 5}], 5.0),  # older jax: a list of one dict
        ([], None),
        (None, None),
        ({"bytes accessed": 9.0}, None),
        (NotImplementedError("no cost analysis on this backend"), None),
    ],
)
def test_xla_flops_where_the_backend_counts_or_not(cost, flops):
    assert common.xla_flops(_Stage(cost)) == flops


def test_xla_flops_of_a_stage_that_cannot_be_made():
    def fails():
        raise RuntimeError("lowering failed")

    assert common.xla_flops(fails) is None


def test_peak_memory_on_cpu_is_the_process_max_rss():
    assert jax.local_devices()[0].platform == "cpu"
    assert common.device_peak_memory_bytes() is None  # XLA's CPU client keeps no count
    peak, source = common.peak_memory()
    held = jnp.ones((1024, 1024), jnp.float32).block_until_ready()  # 4 MiB in this process
    assert source == "process max RSS" and peak > held.nbytes
