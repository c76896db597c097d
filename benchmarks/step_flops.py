"""Measures XLA's FLOP counts of a config's compiled train and eval steps for `--mode=plan`.

Compiles the project's train step (`step.compile_train_step`) and eval step for the
config's model settings on an abstract state (nothing is initialised or trained) and
stores the FLOP counts and the train state's bytes in mlcnc_jax/step_flops.json, keyed by
`budget.model_key`, where `--mode=plan` reads them. Compiling ResNet-50 at 224 px takes a
few minutes on a 2-core CPU (much longer at 448 px).

    python -m benchmarks.step_flops                                  # the four reference ones
    python -m benchmarks.step_flops --config=coco_lt --config=voc_lt:paper
    python -m benchmarks.step_flops --config=coco_lt --set data.image_size=448
    python -m benchmarks.step_flops --config=my_config.py --num_classes=37
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import sys

# The built-in datasets' class counts (a config does not hold K: the dataset does).
DATASET_CLASSES = {"coco_lt": 80, "voc_lt": 20}
DEFAULT_CONFIGS = ("coco_lt", "coco_lt:paper", "voc_lt", "voc_lt:paper")


def load_config(value: str):
    """A config from a --config value: a built-in name or a file, with an optional ':ARG'."""
    from mlcnc_jax import configuration

    path, _, argument = configuration.resolve_config(value).partition(":")
    spec = importlib.util.spec_from_file_location("_step_flops_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def apply_settings(config, settings: list[str]):
    """Applies 'field.path=value' settings (as --config.field.path=value on the command line)."""
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep:
            raise ValueError(f"--set {setting!r}: write FIELD=VALUE, e.g. data.image_size=448")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string
        config.update_from_flattened_dict({key: value})
    return config


def main(argv: list[str] | None = None) -> int:
    from mlcnc_jax import budget

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", action="append", help=f"repeatable; default: {', '.join(DEFAULT_CONFIGS)}"
    )
    parser.add_argument(
        "--num_classes", type=int, help="K (default: 80 for coco_lt, 20 for voc_lt configs)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a config field of every config, e.g. data.image_size=448 (repeatable)",
    )
    parser.add_argument("--out", default=budget.STEP_FLOPS_FILE)
    args = parser.parse_args(argv)

    stored = budget.load_step_flops(args.out)
    for value in args.config or DEFAULT_CONFIGS:
        config = apply_settings(load_config(value), args.set)
        k = args.num_classes or DATASET_CLASSES.get(config.data.name)
        if k is None:
            parser.error(f"--config={value}: dataset {config.data.name!r}; pass --num_classes=K")
        print(f"{value}: compiling {budget.model_key(config, k)} ...", file=sys.stderr, flush=True)
        entry = budget.measure_step_flops(config, k)
        entry["config"] = " ".join([value] + [f"--set {x}" for x in args.set])
        entry["date"] = f"{datetime.date.today():%Y-%m-%d}"
        stored[entry.pop("key")] = entry
        print(
            f"  train step {entry['train_step_flops'] / 1e12:.3f} TFLOP "
            f"({entry['train_step_flops'] / entry['batch_size'] / 1e9:.1f} GFLOP/image), "
            f"eval step {entry['eval_step_flops'] / 1e12:.3f} TFLOP, state "
            f"{entry['state_bytes'] / 1e6:.0f} MB, compiled in {entry['compile_s']:.0f} s",
            flush=True,
        )
    text = {
        "about": (
            "XLA cost analysis of the compiled train step (step.compile_train_step) and eval "
            "step, by budget.model_key; read by --mode=plan. Regenerate: python -m "
            "benchmarks.step_flops [--config=NAME ...]"
        ),
        "entries": dict(sorted(stored.items())),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(text, f, indent=1)
        f.write("\n")
    print(f"Wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
