"""Exports the latest checkpoint of a configs/pretrain.py run as a trunk file.

    python -m mlcnc_jax.trunks --workdir=workdir/pretrain --output=trunk.safetensors

The file holds the weights (backbone and classifier) and batch statistics, with the
backbone name, image size, class names, the run's test mAP on its own classes and the
file's provenance in its metadata; `config.model.pretrained=<file>` loads its backbone.
"""

import argparse
import hashlib
import json
import os
import sys


def export(workdir: str, output: str) -> dict:
    """Writes the trunk file of `workdir`'s latest checkpoint; returns its metadata."""
    import orbax.checkpoint as ocp

    from mlcnc_jax.models import pretrained

    workdir = os.path.abspath(os.path.expanduser(workdir))
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=("state", "meta")
    )
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint under {workdir}/checkpoints: run configs/pretrain.py there first."
        )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    state, meta = restored["state"], restored["meta"]
    report_path = os.path.join(workdir, f"eval_{step}.json")
    if not os.path.isfile(report_path):
        raise FileNotFoundError(f"{report_path} is missing: the run must end with an evaluation.")
    with open(report_path) as f:
        report = json.load(f)
    metadata = {
        "backbone": meta["model"]["model"]["backbone"],
        "model": meta["model"]["model"]["name"],
        "class_names": json.dumps(meta["model"]["class_names"]),
        "weights": "raw",
        "step": str(step),
        "test_map_ema": f"{report['map_ema']['total']:.2f}",
        "test_map_raw": f"{report['map_raw']['total']:.2f}",
        "dataset": report["dataset"],
        "made_by": "python run.py --config=configs/pretrain.py; python -m mlcnc_jax.trunks",
    }
    pretrained.save_trunk(
        output, {"params": state["params"], "batch_stats": state["batch_stats"]}, metadata
    )
    with open(output, "rb") as f:
        metadata["sha256"] = hashlib.sha256(f.read()).hexdigest()
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="workdir of a configs/pretrain.py run")
    parser.add_argument("--output", required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    print(json.dumps(export(args.workdir, args.output)))


if __name__ == "__main__":
    sys.exit(main())
