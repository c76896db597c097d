"""The step loop's overhead: the real Trainer against a bare loop of the same compiled step.

A model small enough that dispatch dominates (MLC-NC on the CPU ResNet at 8 px, batch 8,
4 classes, one device unless more are present) trains the same N steps twice per round:
once through `trainer.Trainer.train` (hooks: the console's bar and a metrics hook; metric
fetches every `--log_every` steps; device prefetch where the Trainer has it; no
checkpoints, no evaluation) and once as a bare Python loop that calls the Trainer's own
compiled step over batches already on the device and waits only at the end. Prints a
markdown table of the median time per step of each and their ratio (1.00 = no overhead).

  python -m benchmarks.loop_overhead [--steps 300] [--rounds 5] [--log_every 20]

Runs against any version of the library whose Trainer takes the arguments below (older
ones without `log_every_steps`/`prefetch`/`image_norm` get float32 images, as their
pipeline gave).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
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

    import jax
    import numpy as np

    from benchmarks import common
    from configs import default
    from mlcnc_jax import console, models, objective, optim, parallel, trainer
    from mlcnc_jax.state import Schedule, initial_train_state

    k, size = 4, args.image_size
    config = default.get_config()
    config.model.pretrained = "none"
    config.model.embed_dim = 16
    config.model.proj_dim = 4
    config.model.num_heads = 2
    config.data.image_size = size
    config.loss.warmup_epochs = 0
    plan = Schedule(steps_per_epoch=args.steps, total_steps=args.steps, warmup_steps=0)
    placement = parallel.Placement("jit")
    model = models.create_model(config, k)
    tx, lr_schedule = optim.create_optimizer(config, plan.total_steps)
    loss_fn = objective.make_objective(
        config.loss, objective.ClassStats(np.full(k, 10.0), 40), warmup_steps=0
    )
    takes = inspect.signature(trainer.Trainer).parameters
    uint8 = "image_norm" in takes
    extra = {}
    if uint8:
        extra = {
            "log_every_steps": args.log_every,
            "prefetch": 2,
            "image_norm": (tuple(config.data.mean), tuple(config.data.std)),
        }

    class Means:  # what the run's reports do with the metrics: running means
        def __init__(self):
            self.sums: dict[str, float] = {}

        def on_step(self, step, metrics):
            for key, value in metrics.items():
                self.sums[key] = self.sums.get(key, 0.0) + float(value)

    bar = console.Console(plan, args.batch)
    loop = trainer.Trainer(
        model=model,
        tx=tx,
        loss_fn=loss_fn,
        lr_schedule=lr_schedule,
        plan=plan,
        # The plan's last step is evaluated: a stand-in, so that no evaluation is timed.
        evaluate=lambda state: {name: {"map": {"total": 0.0}} for name in ("raw", "ema")},
        placement=placement,
        ema_decay=0.99,
        checkpointer=None,
        hooks=[bar, Means()],
        eval_every_steps=10**9,
        checkpoint_every_steps=10**9,
        **extra,
    )
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(8):
        pixels = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        labels = (rng.random((args.batch, k)) < 0.5).astype(np.float32)
        labels[:, 0] = 1.0
        image = pixels if uint8 else (pixels / 255.0 - 0.45).astype(np.float32) / 0.225
        batches.append({"image": image, "labels": labels})

    def stream():
        i = 0
        while True:
            yield batches[i % len(batches)]
            i += 1

    fresh = initial_train_state(config, model, tx, k)
    on_device = [placement.shard(b) for b in batches]
    step_fn = loop.train_step

    def run_trainer() -> float:
        state = jax.tree.map(np.asarray, fresh)
        start = time.perf_counter()
        loop.train(state, stream())
        return time.perf_counter() - start

    def run_bare() -> float:
        placed = placement.place(jax.tree.map(np.asarray, fresh))
        start = time.perf_counter()
        for i in range(args.steps):
            placed, _ = step_fn(placed, on_device[i % len(on_device)])
        jax.block_until_ready(placed)
        return time.perf_counter() - start

    load_before = os.getloadavg()
    with contextlib.redirect_stderr(io.StringIO()):  # the console's bar: keep the table clean
        run_trainer()  # compiles the step (the bare loop reuses it)
        run_bare()
        trainer_s, bare_s = [], []
        for _ in range(args.rounds):
            trainer_s.append(run_trainer() / args.steps)
            bare_s.append(run_bare() / args.steps)
    load_after = os.getloadavg()
    t, b = statistics.median(trainer_s), statistics.median(bare_s)
    print(f"\nMachine: {common.machine()}")
    print(
        f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{args.rounds} rounds of {args.steps} steps, medians; batch {args.batch}, "
        f"{size} px, {k} classes; images as {'uint8' if uint8 else 'float32'}; "
        f"metrics fetched every {args.log_every if uint8 else 1} step(s).\n"
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
