"""What run.py does in each --mode, kept importable for tests and the `mlcnc` command."""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

MODES = ["train", "eval", "predict", "data_stats"]


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    mode: str,
    *,
    multihost: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
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

    Returns:
      The evaluation results (train, eval), the predictions path (predict) or
      the split statistics (data_stats).
    """
    from mlcnc_jax import parallel

    if multihost:
        parallel.initialize_distributed(coordinator_address, num_processes, process_id)
    import jax

    workdir = os.path.abspath(os.path.expanduser(workdir))
    logging.info(
        "JAX %s on %s: %d device(s).", jax.__version__, jax.default_backend(), jax.device_count()
    )
    if mode == "data_stats":
        from mlcnc_jax.data import sources, stats

        os.makedirs(workdir, exist_ok=True)
        return stats.data_stats(sources.load_dataset(config), workdir)
    if mode == "predict":
        from mlcnc_jax import predict

        return predict.predict(config, workdir)

    from mlcnc_jax import train

    if mode == "train":
        results = train.train_and_evaluate(config, workdir)
    elif mode == "eval":
        results = train.evaluate_checkpoint(config, workdir)
    else:
        raise ValueError(f"Unknown mode {mode!r}: use one of {MODES}.")
    if jax.process_index() == 0 and results:
        summary = {
            "step": results["step"],
            "map_raw": results["raw"]["map"],
            "map_ema": results["ema"]["map"],
            "neural_collapse": results["raw"]["neural_collapse"],
        }
        print(json.dumps(summary, default=float))
    return results
