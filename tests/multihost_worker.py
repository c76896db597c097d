"""One process of a multi-process training run on this machine (started by test_multihost.py).

python tests/multihost_worker.py --port=P --num_processes=N --process_id=I \
    --data_root=D --workdir=W --record=R [--overrides='{"train.num_epochs": 2}'] [--from_env]

Trains the tiny test config through `cli.run(..., multihost=True)` and writes
`R/process_<I>.json`: what this process saw (device counts, the rows of each
host batch, the loss of every step) and every file-system write it made under
the workdir, recorded with an audit hook (Python-level writes: reports, plots,
checkpoint metadata, directories). Writes made in C++ (TensorBoard event files,
array data) are checked by the test from the workdir itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_WRITE_EVENTS = {
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
    "shutil.copyfile",
    "shutil.rmtree",
    "shutil.move",
}


def record_writes(root: str, writes: list[str]) -> None:
    """Appends '<event> <path>' to `writes` for each write this process makes under `root`."""
    root = os.path.realpath(root)

    def under_root(path) -> str | None:
        if isinstance(path, int):
            return None
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            paths = [path] if writing else []
        elif event in _WRITE_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for p in paths:
            full = under_root(p)
            if full is not None:
                writes.append(f"{event} {os.path.relpath(full, root)}")

    sys.addaudithook(hook)


def instrument() -> tuple[dict, dict]:
    """Records what each host batch holds and every step's loss, through the public seams.

    Returns:
      (seen, run_kwargs): seen is {'batches': [{'rows', 'image_sha', 'labels'} per
      step], 'losses': [per step]}, filled in as training runs; run_kwargs are the
      `hooks` and `wrap_batches` arguments of `cli.run` that fill it.
    """
    from mlcnc_jax.trainer import Hook

    seen: dict = {"batches": [], "losses": []}

    def wrap_batches(batches):
        for batch in batches:
            seen["batches"].append(
                {
                    "rows": int(batch["image"].shape[0]),
                    "image_sha": [
                        hashlib.sha1(row.tobytes()).hexdigest() for row in batch["image"]
                    ],
                    "labels": batch["labels"].tolist(),
                }
            )
            yield batch

    class RecordLoss(Hook):
        def on_step(self, step, metrics):
            seen["losses"].append(float(metrics["loss"]))

    return seen, {"hooks": [RecordLoss()], "wrap_batches": wrap_batches}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--from_env", action="store_true")
    parser.add_argument(
        "--fail_at_step",
        type=int,
        default=0,
        help="process 1 raises right after the step before this one (0: never)",
    )
    args = parser.parse_args()

    from test_train import tiny_config

    from mlcnc_jax import cli

    config = tiny_config(args.data_root, **json.loads(args.overrides))
    seen, run_kwargs = instrument()
    if args.fail_at_step and args.process_id == 1:
        record_batches = run_kwargs["wrap_batches"]

        def failing(batches):
            # The Trainer reads two batches ahead (train.prefetch_batches): it asks for batch
            # s + 1 when step s - 1 is done, checkpoint included.
            for index, batch in enumerate(record_batches(batches), start=1):
                if index == args.fail_at_step + 1:
                    raise RuntimeError(f"injected failure at step {args.fail_at_step}")
                yield batch

        run_kwargs["wrap_batches"] = failing
    writes: list[str] = []
    record_writes(args.workdir, writes)
    if args.from_env:  # as a cluster would: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, ...
        os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{args.port}"
        os.environ["JAX_NUM_PROCESSES"] = str(args.num_processes)
        os.environ["JAX_PROCESS_ID"] = str(args.process_id)
        results = cli.run(config, args.workdir, "train", multihost=True, **run_kwargs)
    else:
        results = cli.run(
            config,
            args.workdir,
            "train",
            multihost=True,
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            **run_kwargs,
        )
    import jax

    record = {
        "pid": os.getpid(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "final_step": results.final.step,
        "ap_raw": [float(x) for x in results.final.raw.ap],
        "writes": writes,
        **seen,
    }
    os.makedirs(args.record, exist_ok=True)
    with open(os.path.join(args.record, f"process_{args.process_id}.json"), "w") as f:
        json.dump(record, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
