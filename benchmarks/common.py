"""What the benchmark drivers share: the machine they ran on, device probes, JSON, tables."""

from __future__ import annotations

import os
import platform
import re
import resource
from collections.abc import Sequence
from typing import Any

from mlcnc_jax.reports import to_json  # noqa: F401 (numpy values and NaN -> strict JSON)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, cores, JAX version, backend and devices, Python."""
    import jax

    return (
        f"{cpu_model()}, {os.cpu_count()} cores visible to Python; JAX {jax.__version__} on "
        f"{jax.default_backend()} ({jax.device_count()} device(s)); Python {platform.python_version()}"
    )


def device_peak_memory_bytes() -> int | None:
    """The first local device's `peak_bytes_in_use` (None where the backend keeps no count)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def peak_memory() -> tuple[int, str]:
    """(bytes, where from): the device's peak on an accelerator, else this process's max RSS."""
    import jax

    on_cpu = jax.local_devices()[0].platform == "cpu"
    peak = None if on_cpu else device_peak_memory_bytes()
    if peak is not None:
        return peak, "device peak_bytes_in_use"
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def xla_flops(stage: Any) -> float | None:
    """XLA's FLOP count of a lowered or compiled jitted function, or None where none is given.

    Args:
      stage: `jitted.lower(...)` (counts without compiling a second time) or its `.compile()`,
        or a function without arguments that makes one (where making it fails, None too).
    """
    try:
        if not hasattr(stage, "cost_analysis"):  # (a compiled stage is callable too)
            stage = stage()
        cost = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend counts; the column is then empty
        return None
    # A dict (a list of one dict in older jax), or None.
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    """`value * scale` formatted with `spec`, or 'n/a' for None."""
    return "n/a" if value is None else format(value * scale, spec)


def row(cells: Sequence[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None
) -> str:
    """A markdown table; `align` holds '---' (left) or '---:' (right) per column."""
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([row(header), row(align), *(row(r) for r in rows)])
