"""What the benchmark drivers share: the machine they ran on, JSON, markdown tables."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence

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
