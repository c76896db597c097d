"""Checkpoint stall: the training time a save costs, with a ResNet-50-sized training state.

The state: ResNet-50's parameter count (25.6 M) four times over (params, Adam's two
moments, the EMA: about 400 MB in float32), as device arrays. Each round times K steps
of a stand-in device computation (a chain of matrix products of a fixed cost) with one
save dispatched before the first, and the same K steps without a save; the difference is
the wall time the save took from training. Also printed: how long `save` blocks its
caller. Writes go to a temporary directory on the local disk.

  python -m benchmarks.checkpoint_stall [--rounds 3] [--steps 20] [--megabytes 400]

Runs against any version of `checkpoint.Checkpointer`: one whose saves are synchronous
(and whose best checkpoint is a second full write through `save_best`) is timed as it
was; one that takes `asynchronous` is timed both ways.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="stand-in steps per round")
    parser.add_argument("--megabytes", type=float, default=400.0, help="state size")
    parser.add_argument("--step_ms", type=float, default=50.0, help="stand-in step time")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import common
    from mlcnc_jax import checkpoint

    # The state: four copies of a 'parameter' tree of 161 arrays (ResNet-50's count).
    floats = int(args.megabytes * 2**20 / 4 / 4)
    sizes = np.full(161, floats // 161)
    rng = np.random.default_rng(0)
    tree = {f"p{i}": rng.standard_normal(int(n), dtype=np.float32) for i, n in enumerate(sizes)}
    state = jax.device_put({"params": tree, "mu": tree, "nu": tree, "ema": tree})
    state = jax.block_until_ready(jax.tree.map(lambda x: x + 0, state))  # distinct buffers
    megabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20

    # A stand-in training step of about step_ms on this device.
    n = 256
    matmul = jax.jit(lambda x: jnp.tanh(x @ x) * 0.5)
    x = jnp.ones((n, n), jnp.float32) * 0.01
    jax.block_until_ready(matmul(x))
    t0 = time.perf_counter()
    for _ in range(20):
        x = matmul(x)
    jax.block_until_ready(x)
    per_call = (time.perf_counter() - t0) / 20
    calls = max(1, round(args.step_ms / 1e3 / per_call))

    def train(steps: int, before=None) -> float:
        y = jnp.ones((n, n), jnp.float32) * 0.01
        start = time.perf_counter()
        if before is not None:
            before()
        for _ in range(steps):
            for _ in range(calls):
                y = matmul(y)
            jax.block_until_ready(y)  # a step's end, as a log point
        return time.perf_counter() - start

    takes_async = "asynchronous" in inspect.signature(checkpoint.Checkpointer).parameters
    modes = (
        [("asynchronous", True), ("synchronous", False)]
        if takes_async
        else [("synchronous (this version)", None)]
    )
    legacy_best = hasattr(checkpoint.Checkpointer, "save_best")
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        step_time = statistics.median(train(args.steps) for _ in range(2)) / args.steps
        for name, flag in modes:
            kwargs = {} if flag is None else {"asynchronous": flag}
            for best in (False, True):
                saver = checkpoint.Checkpointer(
                    os.path.join(tmp, f"{name}-{best}"),
                    {"model": "x"},
                    keep=2,
                    keep_best=best,
                    **kwargs,
                )
                counter = [0]
                blocked = []

                def save(saver=saver, counter=counter, blocked=blocked, best=best):
                    counter[0] += 1
                    t = time.perf_counter()
                    if legacy_best:
                        saver.save(counter[0], state)
                        if best:  # a new best: the second full write of that version
                            saver.save_best(counter[0], state, float(counter[0]))
                    else:
                        saver.save(counter[0], state, score=float(counter[0]) if best else None)
                    blocked.append(time.perf_counter() - t)

                lost = []
                for _ in range(args.rounds):
                    with_save = train(args.steps, save)
                    if hasattr(saver, "wait_until_finished"):
                        saver.wait_until_finished()
                    lost.append(with_save - train(args.steps))
                if hasattr(saver, "close"):
                    saver.close()
                rows.append(
                    [
                        name + (", a new best (keep_best)" if best else ""),
                        f"{statistics.median(blocked):.2f}",
                        f"{statistics.median(lost):.2f}",
                        f"{statistics.median(lost) / step_time:.1f}",
                    ]
                )
    load_after = os.getloadavg()
    print(f"\nMachine: {common.machine()}")
    print(
        f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; state "
        f"{megabytes:.0f} MB float32 in {len(jax.tree.leaves(state))} arrays; stand-in step "
        f"{step_time * 1e3:.0f} ms; {args.rounds} rounds of {args.steps} steps, medians.\n"
    )
    print(
        common.markdown_table(
            ["save", "save() blocks (s)", "training time lost (s)", "in steps"], rows
        )
    )


if __name__ == "__main__":
    main()
