"""Checkpoint save time: orbax's default replica-parallel writing against the project's.

The training state of the default run (configs/default.py, 20 classes: params, batch
statistics, Adam's two moments, the EMA, the prototypes), built by `experiment.build` and
placed by its placement (replicated over N devices: fake CPU devices unless a GPU/TPU is
present), is saved by `checkpoint.Checkpointer`, alternately with orbax's
default jax.Array handler (every replica writes a slice of every array) and with the
project's (`checkpoint.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL`: small arrays from one
replica). Prints a markdown table of the median save time of each and their ratio.

  python -m benchmarks.checkpoint_save [--devices 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU only)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"

    import jax
    import orbax.checkpoint as ocp

    from benchmarks import common
    from benchmarks.gpu_data import random_data
    from configs import default
    from mlcnc_jax import checkpoint, experiment

    config = default.get_config()
    config.model.pretrained = "none"
    config.train.batch_size = config.eval.batch_size = jax.device_count()  # nothing is trained
    dataset = random_data(config.data.image_size, 20, n=20)
    with tempfile.TemporaryDirectory() as tmp:
        run = experiment.build(config, tmp, dataset=dataset, reports=False)
        state = run.placement.place(run.initial_state())
    leaves = jax.tree.leaves(state)
    megabytes = sum(a.nbytes for a in leaves) / 2**20

    project = ocp.type_handlers.get_type_handler(jax.Array)
    handlers = {
        "orbax default (every replica writes a slice)": ocp.type_handlers.ArrayHandler(
            array_metadata_store=getattr(project, "_array_metadata_store", None)
        ),
        f"project (replica-parallel from {checkpoint.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL // 2**20} MiB per slice)": project,
    }
    times: dict[str, list[float]] = {name: [] for name in handlers}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        saver = checkpoint.Checkpointer(tmp, {"model": "benchmark"}, keep=1, asynchronous=False)
        step = 0
        for _ in range(args.repeats + 1):  # the first round warms up; not counted
            for name, handler in handlers.items():
                ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
                step += 1
                start = time.perf_counter()
                saver.save(step, state)
                if step > len(handlers):
                    times[name].append(time.perf_counter() - start)
    ocp.type_handlers.register_type_handler(jax.Array, project, override=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = next(iter(medians.values()))
    rows = [
        [name, f"{m:.2f}", f"{min(times[name]):.2f}", f"{base / m:.1f}x"]
        for name, m in medians.items()
    ]
    print(f"- Machine: {common.machine()}; load average (1 min) {load_before:.2f} before.")
    print(
        f"- State: the default run's training state, {len(leaves)} arrays, {megabytes:.1f} MiB, replicated over "
        f"{jax.device_count()} devices; {args.repeats} saves each, alternating, after a warm-up."
    )
    print()
    print(
        common.markdown_table(
            ["handler", "median save (s)", "fastest (s)", "speed-up"],
            rows,
            ["---", "---:", "---:", "---:"],
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
