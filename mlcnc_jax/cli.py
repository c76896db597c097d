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

import contextlib
import errno
import logging as std_logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import ml_collections
from absl import app, flags, logging

from mlcnc_jax import configuration, storage
from mlcnc_jax.configuration import DEFAULT_RESUME, ResumeOptions, resolve_config_argv
from mlcnc_jax.errors import UserError
from mlcnc_jax.results import RunResult

MODES = ["train", "eval", "predict", "data_stats", "plan"]
FLAGS = flags.FLAGS


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
    flags.DEFINE_list(
        "allow_config_change",
        [],
        "Resume although these config fields (comma-separated; a section ends in '.') differ "
        "from the workdir's config.json, e.g. train.num_epochs to extend a run. Recorded in "
        "config_changes.jsonl.",
    )
    flags.DEFINE_integer(
        "restore_step",
        None,
        "Train on from (or, with --mode=eval, score) this checkpoint step instead of the latest "
        "(training sets newer checkpoints aside as <step>.set_aside), e.g. after a divergence.",
    )
    flags.DEFINE_bool(
        "force_unlock",
        False,
        "Take the workdir's run.lock even if another run seems to hold it (only when that run "
        "is known to be gone, e.g. on another host).",
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
    with _quiet_stderr():
        # TensorFlow's C++ start-up lines (oneDNN, "All log messages before
        # absl::InitializeLog()") are written before any log level applies.
        import tensorflow  # noqa: F401 - imported here for its start-up lines only
        import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # nested bars per split, between our lines
    logging.get_absl_handler().addFilter(_is_shown)


# Warnings that say nothing to a user: tfds warns on every load of the built-in data that
# its config is "custom"; orbax that a checkpoint of an older layout lacks a metadata file.
_NOISE = ("Metadata file does not exist",)


def _is_shown(record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.ERROR:
        return True
    if "tensorflow_datasets" in record.pathname:
        return False
    return not any(text in str(record.msg) for text in _NOISE)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Sends what native code writes to the stderr file descriptor to /dev/null meanwhile."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured in a notebook)
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    configure_logging(FLAGS.verbosity)
    program = os.path.basename(sys.argv[0])
    try:
        run(
            FLAGS.config,
            FLAGS.workdir,
            FLAGS.mode,
            multihost=FLAGS.multihost,
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            resume=ResumeOptions(
                allow_config_change=tuple(FLAGS.allow_config_change),
                restore_step=FLAGS.restore_step,
                force_unlock=FLAGS.force_unlock,
            ),
            overrides=configuration.command_line_overrides(sys.argv),
        )
    except KeyboardInterrupt:
        # Ctrl-C ends a run as SIGTERM does: the lock is released on the way out, saved
        # checkpoints are whole (orbax renames a checkpoint into place when it is complete).
        sys.exit(f"{program}: interrupted: {INTERRUPTED}")
    except Exception as e:
        if FLAGS.verbosity >= 1 or not is_user_error(e):
            raise
        # A bad input or a refused action: its message says what to do; no traceback.
        sys.exit(f"{program}: error: {describe_user_error(e)}")


INTERRUPTED = (
    "the run stopped; the same command resumes it from its last checkpoint "
    "(nothing saved is half-written)"
)

# Functions that read what the user gave (weights, text embeddings): a ValueError, TypeError
# or KeyError raised inside them is about that input, so it counts as a user error even
# though its type is a built-in one.
INPUT_READERS = {
    ("mlcnc_jax.models.text_classifier", "load_text_embeddings"),
    ("mlcnc_jax.models.pretrained", "load_state_dict"),
    ("mlcnc_jax.models.pretrained", "load_pretrained_backbone"),
    ("mlcnc_jax.models.clip", "load_clip_state_dict"),
    ("mlcnc_jax.models.clip", "load_clip_backbone"),
    ("mlcnc_jax.backbone_weights", "load_pretrained"),
    ("mlcnc_jax.models.vit_weights", "read_vit_state"),
    ("mlcnc_jax.models.vit_weights", "load_vit_params"),
    ("mlcnc_jax.models.clip_text", "load_clip_text"),
    ("mlcnc_jax.models.text_classifier", "check_text_weights"),
}


def user_errors() -> tuple[type[Exception], ...]:
    """The error types that a bad input or a refused action raise, with the fix in the message.

    `errors.UserError` is the project's own type (config, data, splits, saved config,
    checkpoints, workdir lock, predict inputs derive from it); OSError covers what the
    machine refuses (a read-only or full disk, a missing file, a workdir that is a file);
    UnicodeError a text file in another encoding.
    """
    from mlcnc_jax import checkpoint

    return (
        UserError,
        OSError,
        UnicodeError,
        FloatingPointError,
        checkpoint.CheckpointMismatchError,
    )


def is_user_error(e: BaseException) -> bool:
    """Whether the command line shows `e` as one message (see `user_errors`, `INPUT_READERS`).

    Any other exception is a bug and keeps its traceback.
    """
    if isinstance(e, user_errors()):
        return True
    if isinstance(e, (ValueError, TypeError, KeyError)):
        frame = e.__traceback__
        while frame is not None:
            code = frame.tb_frame.f_code
            if (frame.tb_frame.f_globals.get("__name__"), code.co_name) in INPUT_READERS:
                return True
            frame = frame.tb_next
    return False


def describe_user_error(e: BaseException) -> str:
    """The message of a user error, with the file named where the exception only holds it."""
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e.strerror or ""):
        what = e.strerror or str(e)
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        hint = {
            errno.EACCES: "check its permissions (or choose another --workdir)",
            errno.EROFS: "the file system is read-only: choose another --workdir",
            errno.ENOSPC: "free some space, or choose another --workdir; the run resumes "
            "from its last checkpoint",
            errno.EEXIST: "a file is in the way of a folder: move it, or choose another path",
            errno.ENOTDIR: "a file is in the way of a folder: move it, or choose another path",
        }.get(e.errno, "")
        return f"{where}: {what}" + (f" ({hint})" if hint else "")
    return str(e)


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
    try:
        app.run(_main, argv=argv)
    except (KeyError, AttributeError) as e:
        # What config_flags raises for a misspelt --config.KEY while parsing: one line with
        # the closest declared key instead of a traceback.
        message = configuration.format_config_error(e, argv=argv)
        if message is None:
            raise
        sys.exit(f"{os.path.basename(argv[0])}: {message}")


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
    resume: ResumeOptions = DEFAULT_RESUME,
    overrides: Sequence[str] | None = None,
) -> RunResult | dict | str:
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
      wrap_batches: wraps the training iterator (train mode; see `experiment.Experiment.train`).
      resume: how a run in a workdir with checkpoints resumes (train mode).
      overrides: the config fields set on the command line; eval and predict start from
        the workdir's saved config and take only these (see `configuration.config_for_eval`;
        None: every field where `config` differs from the saved one).

    Returns:
      The `results.RunResult` (train, eval), the predictions path (predict),
      the split statistics (data_stats) or the run's budget (plan).

    In a multi-process run an error on any process ends every process (exit code 1),
    each printing which process failed and why.
    """
    from mlcnc_jax import processes

    if not str(workdir).strip():
        # '' would resolve to the current directory (often the repository itself).
        raise UserError(
            "--workdir is empty: name the run's directory, e.g. --workdir=workdir/default"
        )
    if multihost:
        try:
            processes.initialize_distributed(coordinator_address, num_processes, process_id)
        except Exception as e:  # noqa: BLE001 - any failure to start means the same here
            raise UserError(
                f"--multihost: multi-host JAX could not start ({_first_line(e)}). Pass "
                "--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or set "
                "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) unless the cluster "
                "is auto-detected (TPU VMs, SLURM); drop --multihost on one machine"
            ) from e
        import jax

        if jax.process_count() > 1:
            stop_watching = processes.watch_for_failures()
            try:
                results = _run(config, workdir, mode, hooks, wrap_batches, resume, overrides)
            except BaseException as e:  # noqa: BLE001 - every failure must end all processes
                processes.end_all_processes(e)
            stop_watching()  # before any distributed shutdown
            return results
    return _run(config, workdir, mode, hooks, wrap_batches, resume, overrides)


def _run(config, workdir, mode, hooks, wrap_batches, resume, overrides):
    import jax

    from mlcnc_jax import workdir_lock

    workdir = storage.resolve(workdir)  # bucket URLs (gs://...) stay as they are
    num_devices = _start_backend()
    if mode in ("eval", "predict"):
        config = configuration.config_for_eval(workdir, config, overrides)
    configuration.validate(config, num_devices)  # before any data is read
    if mode in ("train", "eval", "predict"):
        check_model_inputs(config, training=mode == "train")
    if mode == "data_stats":
        from mlcnc_jax.data import sources, stats

        if jax.process_index() != 0:  # a report, written once
            return {}
        os.makedirs(workdir, exist_ok=True)
        return stats.data_stats(sources.load_dataset(config), workdir)
    if mode == "plan":
        from mlcnc_jax import plan

        return plan.plan(config) if jax.process_index() == 0 else {}
    if config.model.get("zero_shot", False) and mode in ("train", "predict"):
        raise ValueError(
            f"config.model.zero_shot=True scores CLIP without training: use it with "
            f"--mode=eval, not --mode={mode}."
        )
    if mode == "predict":
        from mlcnc_jax import predict

        return predict.predict(config, workdir)

    from mlcnc_jax import experiment

    if mode not in ("train", "eval"):
        raise UserError(f"Unknown mode {mode!r}: use one of {MODES}.")
    # One run per workdir: a second one stops here, naming the holder.
    with workdir_lock.hold(workdir, process_index=jax.process_index(), force=resume.force_unlock):
        _prepare_data_on_process_0_first(config)
        if config.model.get("zero_shot", False):
            from mlcnc_jax import zero_shot

            result = zero_shot.evaluate(config, workdir)
        else:
            run_ = experiment.build(config, workdir, hooks=hooks, resume=resume)
            result = run_.train(wrap_batches) if mode == "train" else run_.evaluate()
    if jax.process_index() == 0:
        from mlcnc_jax import console, reports

        best = result.best_raw_on_test
        if best is not None:
            console.say(
                f"final step {result.final.step}: raw mAP {result.final.raw.map.total:.2f} | "
                f"best of {result.num_evaluations} evaluations: step {best.step}, "
                f"raw mAP {best.map_raw.total:.2f} ({reports.SELECTED_ON_TEST})"
            )
        print(result.summary_line(), flush=True)
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:300] if text else "") or type(e).__name__


def _start_backend() -> int:
    """Starts JAX's backend; returns the device count. A platform that is not there (e.g.
    JAX_PLATFORMS=gpu on a machine without one) is a user error naming the setting."""
    import jax

    try:
        backend, count = jax.default_backend(), jax.device_count()
    except RuntimeError as e:
        platforms = os.environ.get("JAX_PLATFORMS", "")
        setting = f"JAX_PLATFORMS={platforms}" if platforms else "the JAX installation"
        # JAX's own message names the plug-ins it tried (e.g. 'rocm' for 'gpu'), not the
        # setting; it is shown with --verbosity=1.
        raise UserError(
            f"{setting}: JAX finds no such platform on this machine (no such device, or no "
            "JAX plug-in for it). Unset JAX_PLATFORMS (JAX then uses the best device it "
            "finds), set JAX_PLATFORMS=cpu, or install the accelerator's JAX package (for "
            "NVIDIA GPUs: pip install 'jax[cuda12]')"
        ) from e
    logging.info("JAX %s on %s: %d device(s).", jax.__version__, backend, count)
    return count


def check_model_inputs(config: ml_collections.ConfigDict, training: bool = True) -> None:
    """Checks what the model is built from before any data is read: the backbone's name, and
    that a weights file (read when `training` starts) and a text-embeddings file are what
    they claim to be.

    Raises:
      UserError: naming the field, the file and the fix.
    """
    from mlcnc_jax.models import make_backbone

    try:
        make_backbone(config.model.backbone)  # a module, no weights: cheap
    except ValueError as e:
        raise UserError(f"config.model.backbone: {e}") from None
    weights = os.path.expanduser(str(config.model.pretrained))
    if training and weights.endswith(".safetensors") and os.path.isfile(weights):
        from safetensors import safe_open

        try:
            with safe_open(weights, framework="numpy") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any failure to read means the same here
            raise UserError(
                f"{weights} (config.model.pretrained) is not a readable .safetensors file "
                f"({_first_line(e)}): download it again, or train from scratch with "
                "--config.model.pretrained=none"
            ) from None
    text = os.path.expanduser(str(config.model.text_embeddings))
    if config.model.classifier == "text" and text and os.path.isfile(text):
        with open(text, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise UserError(
                f"{text} (config.model.text_embeddings) is not a .npy file (it starts with "
                f"{magic!r}): save the class text embeddings, a float array [K, d], with "
                "numpy.save"
            )


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
