"""MLC-NC training, evaluation, prediction and data inspection.

python run.py --config=configs/default.py --workdir=workdir/default
python run.py --config=configs/coco_lt.py --config.data.root=/data/coco --workdir=...
python run.py --config=configs/default.py --workdir=... --mode=predict --config.predict.inputs=img.jpg
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mlcnc_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (e.g. configs/default.py).", lock_config=True
)
flags.DEFINE_string("workdir", "workdir", "Where checkpoints, summaries and reports go.")
flags.DEFINE_enum("mode", "train", cli.MODES, "train | eval | predict | data_stats")
flags.DEFINE_bool(
    "multihost", False, "Start multi-host JAX (jax.distributed.initialize) before anything else."
)
flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: 'host:port' of process 0 (default: auto-detect)."
)
flags.DEFINE_integer(
    "num_processes", None, "Multi-host: number of processes (default: auto-detect)."
)
flags.DEFINE_integer(
    "process_id", None, "Multi-host: index of this process (default: auto-detect)."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.run(
        FLAGS.config,
        FLAGS.workdir,
        FLAGS.mode,
        multihost=FLAGS.multihost,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
