"""The step loop's overhead: the real Trainer against a bare loop of the same compiled step.

A model small enough that dispatch dominates (MLC-NC on the CPU ResNet at 8 px, batch 8,
4 classes, one device unless more are present) trains the same N steps twice per round:
once through `trainer.Trainer.train` (hooks: the console's bar and a metrics hook; metric
fetches every `--log_every` steps; device prefetch where the Trainer has it; no
checkpoints, no evaluation) and once as a bare Python loop that calls the Trainer's own
compiled step over batches already on the device and waits only at the end. Prints a
markdown table of the median time per step of each and their ratio (1.00 = no overhead).

  python -m benchmarks.loop_overhead [--steps 300] [--rounds 5] [--log_every 20]

The run is built by `experiment.build` (an in-memory dataset, no reports); its Trainer
evaluates through a stand-in and saves nothing, so that only the loop is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--log_every", type=int, default=20)
    parser.add_argument("--image_size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    import tempfile

    import jax
    import numpy as np

    from benchmarks import common
    from benchmarks.gpu_data import random_data
    from configs import default
    from mlcnc_jax import console, experiment, results
    from mlcnc_jax.state import StepCounts

    k, size = 4, args.image_size
    config = default.get_config()
    config.model.update(pretrained="none", embed_dim=16, proj_dim=4, num_heads=2)
    config.data.image_size, config.loss.warmup_epochs = size, 0
    config.train.update(batch_size=args.batch, steps_per_epoch=args.steps, num_epochs=1)
    config.train.update(log_every_steps=args.log_every, prefetch_batches=2, ema_decay=0.99)
    config.train.update(eval_every_epochs=10**6, checkpoint_every_steps=10**9)
    config.eval.batch_size = args.batch
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(8):
        pixels = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        labels = (rng.random((args.batch, k)) < 0.5).astype(np.float32)
        labels[:, 0] = 1.0
        batches.append({"image": pixels, "labels": labels})
    dataset = random_data(size, k, n=args.batch)  # the class statistics of the objective

    def stream(start_step=0):
        i = 0
        while True:
            yield batches[i % len(batches)]
            i += 1

    class Means:  # what the run's reports do with the metrics: running means
        def __init__(self):
            self.sums: dict[str, float] = {}

        def on_step(self, step, metrics):
            for key, value in metrics.items():
                self.sums[key] = self.sums.get(key, 0.0) + float(value)

    bar = console.Console(StepCounts(args.steps, args.steps, 0), args.batch)
    workdir = tempfile.TemporaryDirectory()
    run = experiment.build(
        config, workdir.name, dataset=dataset, train_batches=stream, hooks=[bar, Means()],
        reports=False,
    )  # fmt: skip
    loop, placement = run.trainer, run.placement
    # The last step is evaluated and saved: a stand-in evaluation and no checkpointer, so
    # that only the loop is timed.
    zero = results.Scores(results.GroupMAP(0.0, 0.0, 0.0, 0.0), np.zeros(k), {})
    loop.evaluate = lambda state: results.Evaluation(int(state.step), zero, zero, 0, 0)
    loop.checkpointer = None
    fresh = run.initial_state()
    on_device = [placement.shard(b) for b in batches]
    step_fn = loop.train_step

    def run_trainer() -> float:
        state = jax.tree.map(np.asarray, fresh)
        start = time.perf_counter()
        loop.train(state, run.batches(0))
        return time.perf_counter() - start

    def run_bare() -> float:
        placed = placement.place(jax.tree.map(np.asarray, fresh))
        start = time.perf_counter()
        for i in range(args.steps):
            placed, _ = step_fn(placed, on_device[i % len(on_device)])
        jax.block_until_ready(placed)
        return time.perf_counter() - start

    load_before = os.getloadavg()
    # The console's bar and lines: keep the table clean.
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        run_trainer()  # compiles the step (the bare loop reuses it)
        run_bare()
        trainer_s, bare_s = [], []
        for _ in range(args.rounds):
            trainer_s.append(run_trainer() / args.steps)
            bare_s.append(run_bare() / args.steps)
    load_after = os.getloadavg()
    workdir.cleanup()
    t, b = statistics.median(trainer_s), statistics.median(bare_s)
    print(f"\nMachine: {common.machine()}")
    print(
        f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{args.rounds} rounds of {args.steps} steps, medians; batch {args.batch}, "
        f"{size} px, {k} classes; images as uint8; "
        f"metrics fetched every {args.log_every} step(s).\n"
    )
    print(
        common.markdown_table(
            ["loop", "ms per step", "ratio to the bare loop"],
            [
                ["bare loop over device-resident batches", f"{b * 1e3:.3f}", "1.00"],
                ["Trainer (hooks, metrics, input placement)", f"{t * 1e3:.3f}", f"{t / b:.2f}"],
            ],
        )
    )


if __name__ == "__main__":
    main()
