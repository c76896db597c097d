"""What a run shows a person: a short summary, a live bar per phase, one line per evaluation.

Everything here goes to the terminal through tqdm (bars on stderr, lines on
stdout); nothing here is a log record, so third-party logging can stay off
(`--verbosity=0`, the default) without hiding any of it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import numpy as np

from mlcnc_jax.results import Evaluation, GroupMAP
from mlcnc_jax.trainer import Hook


def say(line: str) -> None:
    """Prints a line without breaking a live progress bar."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def bar(total: int, desc: str, initial: int = 0, unit: str = "step"):
    """A tqdm bar; in a log file (no terminal) it redraws at most every 30 s."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=interactive,
        mininterval=0.2 if interactive else 30.0,
        file=sys.stderr,
        leave=False,
    )


def progress(iterable, desc: str):
    """Iterates through `iterable` behind a live bar (for phases of unknown length)."""
    b = bar(None, desc, unit="batch")
    try:
        for item in iterable:
            yield item
            b.update(1)
    finally:
        b.close()


def format_map(m: GroupMAP) -> str:
    """'total 12.34 head 5.67 ...' (an empty group shows as 'n/a')."""
    return " ".join(
        f"{k} n/a" if not np.isfinite(v) else f"{k} {v:.2f}" for k, v in m.as_dict().items()
    )


def parameter_summary(params: Any) -> str:
    """'441,697 parameters (1.8 MB) in 62 arrays: backbone 400,000, ...' (top-level modules)."""
    leaves = jax.tree.leaves(params)
    count = sum(int(np.prod(x.shape)) for x in leaves)
    size = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    parts = []
    if isinstance(params, dict):
        for name, sub in params.items():
            parts.append(f"{name} {sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub)):,}")
    shown = ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")
    return f"{count:,} parameters ({size / 1e6:.1f} MB) in {len(leaves)} arrays: {shown}"


class Console(Hook):
    """The console of a run (process 0): summary, training bar, one line per evaluation.

    Args:
      steps: the run's step counts (`state.StepCounts`).
      global_batch: images per step.
      describe: what is trained, e.g. 'mlcnc (resnet_small) on synthetic_lt, 20 classes'.
      table_path: where the full parameter table is (named in the summary), or None.
    """

    def __init__(self, steps, global_batch: int, describe: str = "", table_path: str | None = None):
        self.steps = steps
        self.global_batch = global_batch
        self.describe = describe
        self.table_path = table_path
        self._bar = None
        self._t0 = None

    def on_start(self, state, start_step: int) -> None:
        p = self.steps
        if self.describe:
            say(f"Model: {self.describe}")
        say(
            "Parameters: "
            + parameter_summary(state.params)
            + (f" (full table: {self.table_path})" if self.table_path else "")
        )
        say(
            f"Training {p.total_steps} steps ({p.steps_per_epoch} per epoch, FLA warm-up "
            f"{p.warmup_steps}) on {jax.device_count()} {jax.default_backend()} device(s), "
            f"global batch {self.global_batch}"
            + (f", resuming at step {start_step}" if start_step else "")
        )
        self._bar = bar(p.total_steps, "train", initial=start_step)
        self._t0 = time.time()

    def on_step(self, step: int, metrics: dict) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(
            loss=f"{float(metrics['loss']):.4g}",
            lr=f"{float(metrics['learning_rate']):.2g}",
            refresh=False,
        )
        self._bar.update(step - self._bar.n)

    def on_eval(self, step: int, results: Evaluation) -> None:
        say(
            f"step {step:>6} eval ({results.seconds:.1f}s) | mAP raw "
            f"{format_map(results.raw.map)} | EMA {format_map(results.ema.map)}"
        )

    def on_end(self, step: int) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
