"""The command line of run.py and the `mlcnc` command, and what each --mode does.

mlcnc --config=default --workdir=workdir/default
mlcnc --config=coco_lt --config.data.root=/data/coco --workdir=...
mlcnc --config=ablations.py:bce_uniform --workdir=...
python run.py --config=configs/default.py --workdir=...   # the same, from a checkout

--config takes a config file, or the name of a built-in config (a file of the
installed `configs` package: default, coco_lt, voc_lt, ablations, ...), with an
optional ':argument' for configs whose get_config takes one.
"""

from __future__ import annotations

import importlib.util
import json
import logging as std_logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import ml_collections
from absl import app, flags, logging

from mlcnc_jax import storage

MODES = ["train", "eval", "predict", "data_stats", "plan"]
FLAGS = flags.FLAGS


def builtin_config_dir() -> str | None:
    """The directory of the `configs` package (the checkout's, or the installed one)."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(location, "default.py")):
            return location
    return None


def builtin_configs() -> list[str]:
    """Names of the built-in configs (files of the `configs` package)."""
    directory = builtin_config_dir()
    if directory is None:
        return []
    return sorted(
        name[:-3]
        for name in os.listdir(directory)
        if name.endswith(".py") and not name.startswith("_")
    )


def resolve_config(value: str) -> str:
    """Turns a --config value into the config file path that config_flags loads.

    An existing file is used as given. Otherwise 'NAME', 'NAME.py' or
    'configs/NAME.py' (each optionally followed by ':ARGUMENT') name the
    built-in config NAME, so the installed `mlcnc` command finds the configs
    from any directory.

    Args:
      value: the --config value, e.g. 'configs/default.py', 'coco_lt' or
        'ablations.py:bce_uniform'.

    Returns:
      A config file path, with the ':ARGUMENT' suffix kept.

    Raises:
      FileNotFoundError: no such file and no built-in config of that name.
    """
    if os.path.isfile(value):
        return value
    path, sep, argument = value.partition(":")
    if os.path.isfile(path):
        return value
    head, name = os.path.split(path)
    if name.endswith(".py"):
        name = name[:-3]
    directory = builtin_config_dir()
    if head in ("", "configs") and directory and name in builtin_configs():
        return os.path.join(directory, name + ".py") + sep + argument
    raise FileNotFoundError(
        f"--config={value}: there is no file {path!r}"
        + (f" and no built-in config named {name!r}" if head in ("", "configs") else "")
        + f". Pass a config file, or one of the built-in configs: {', '.join(builtin_configs())}."
    )


def resolve_config_argv(argv: list[str]) -> list[str]:
    """`argv` with the value of --config (either '--config=X' or '--config X') resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        for prefix in ("--config=", "-config="):
            if arg.startswith(prefix):
                out[i] = prefix + resolve_config(arg[len(prefix) :])
        if arg in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


def define_flags() -> None:
    """Defines the command-line flags (once; importing this module defines none)."""
    from ml_collections import config_flags

    if "config" in FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config: a file (configs/default.py) or a built-in config name (default, "
        "coco_lt, voc_lt, ...), optionally with ':argument'.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", "workdir", "Where checkpoints, summaries and reports go.")
    flags.DEFINE_enum(
        "mode", "train", MODES, "train | eval | predict | data_stats | plan (the run's budget)"
    )
    flags.DEFINE_bool(
        "multihost",
        False,
        "Start multi-host JAX (jax.distributed.initialize) before anything else.",
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-host: 'host:port' of process 0 (default: $JAX_COORDINATOR_ADDRESS or auto-detect).",
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Multi-host: number of processes (default: $JAX_NUM_PROCESSES or auto-detect).",
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        "Multi-host: index of this process (default: $JAX_PROCESS_ID or auto-detect).",
    )
    flags.mark_flags_as_required(["config"])


def configure_logging(verbosity: int) -> None:
    """Third-party log records (orbax, tfds, TensorFlow, JAX) only from --verbosity=1 on.

    The console (console.py) prints what a person needs without logging, so at
    the default verbosity 0 only warnings and errors are logged. Call before
    TensorFlow is imported (its C++ log level is read at import).
    """
    if verbosity >= 1:
        logging.set_verbosity(logging.INFO)
        return
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # nested bars per split, between our lines
    # tfds warns on every load of the built-in data that its config is "custom": noise here.
    logging.get_absl_handler().addFilter(
        lambda record: (
            record.levelno >= std_logging.ERROR or "tensorflow_datasets" not in record.pathname
        )
    )


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    configure_logging(FLAGS.verbosity)
    run(
        FLAGS.config,
        FLAGS.workdir,
        FLAGS.mode,
        multihost=FLAGS.multihost,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mlcnc` command and of run.py.

    Args:
      argv: the command line, program name first (default: sys.argv).
    """
    argv = list(sys.argv if argv is None else argv)
    define_flags()
    try:
        argv = resolve_config_argv(argv)
    except FileNotFoundError as e:
        sys.exit(f"{os.path.basename(argv[0])}: {e}")
    # config_flags reads the --config.* overrides from sys.argv itself.
    sys.argv = argv
    logging.set_verbosity(logging.INFO)
    app.run(_main, argv=argv)


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    mode: str,
    *,
    multihost: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    hooks: Sequence = (),
    wrap_batches: Callable[[Iterator[dict]], Iterator[dict]] | None = None,
) -> dict | str:
    """Runs one mode of the program.

    Args:
      config: the experiment config.
      workdir: the run's directory.
      mode: one of MODES.
      multihost: start multi-host JAX first.
      coordinator_address: multi-host coordinator ('host:port'); None to auto-detect.
      num_processes: multi-host process count; None to auto-detect.
      process_id: this process's index; None to auto-detect.
      hooks: more trainer hooks (train mode; see `trainer.Hook`).
      wrap_batches: wraps the training iterator (train mode; see `build.Experiment.train`).

    Returns:
      The evaluation results (train, eval), the predictions path (predict),
      the split statistics (data_stats) or the run's budget (plan).
    """
    from mlcnc_jax import parallel

    if multihost:
        parallel.initialize_distributed(coordinator_address, num_processes, process_id)
    import jax

    workdir = storage.resolve(workdir)  # bucket URLs (gs://...) stay as they are
    logging.info(
        "JAX %s on %s: %d device(s).", jax.__version__, jax.default_backend(), jax.device_count()
    )
    if mode == "data_stats":
        from mlcnc_jax.data import sources, stats

        if jax.process_index() != 0:  # a report, written once
            return {}
        os.makedirs(workdir, exist_ok=True)
        return stats.data_stats(sources.load_dataset(config), workdir)
    if mode == "plan":
        from mlcnc_jax import plan

        return plan.plan(config) if jax.process_index() == 0 else {}
    if mode == "predict":
        from mlcnc_jax import predict

        return predict.predict(config, workdir)

    from mlcnc_jax import build

    _prepare_data_on_process_0_first(config)
    if mode == "train":
        results = build.train_and_evaluate(config, workdir, hooks=hooks, wrap_batches=wrap_batches)
    elif mode == "eval":
        results = build.evaluate_checkpoint(config, workdir)
    else:
        raise ValueError(f"Unknown mode {mode!r}: use one of {MODES}.")
    if jax.process_index() == 0 and results:
        summary = {
            "step": results["step"],
            "map_raw": results["raw"]["map"],
            "map_ema": results["ema"]["map"],
            "neural_collapse": results["raw"]["neural_collapse"],
        }
        from mlcnc_jax import console, reports

        run_summary = reports.read_summary(workdir)
        if (
            run_summary
            and run_summary["num_evaluations"] > 1
            and run_summary["best_raw_on_test"]["map_raw"]["total"] is not None
        ):
            best = run_summary["best_raw_on_test"]
            summary["best_raw_on_test"] = best
            console.say(
                f"final step {results['step']}: raw mAP {results['raw']['map']['total']:.2f} | "
                f"best of {run_summary['num_evaluations']} evaluations: step {best['step']}, "
                f"raw mAP {best['map_raw']['total']:.2f} ({reports.SELECTED_ON_TEST})"
            )
        # Strict JSON: an empty group's mAP is null, never NaN.
        print(json.dumps(reports.to_json(summary), allow_nan=False), flush=True)
    return results


def _prepare_data_on_process_0_first(config: ml_collections.ConfigDict) -> None:
    """Lets process 0 alone write what loading the data writes, before the others read it.

    Generating `synthetic_lt` and fetching split files write into the data
    directory; processes sharing that directory would race. Process 0 does it
    first, the others wait at a barrier and then find it done (or, on hosts
    with their own disks, do it on theirs).
    """
    import jax

    if jax.process_count() == 1:
        return
    if config.data.name != "synthetic_lt" and not config.data.download_splits:
        return
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        from mlcnc_jax.data import sources

        sources.load_dataset(config)
    multihost_utils.sync_global_devices("mlcnc_jax data prepared")
