"""Which checkpoint of a directory can be restored, and why the others cannot.

A checkpoint whose data file was truncated or whose metadata file was deleted restores with
an orbax traceback that names neither the step nor the file ("OUT_OF_RANGE: Error reading
...", a pytree-structure error). `find_restorable` checks the checkpoints of an orbax
`CheckpointManager` directory (the item 'state' and the step's record, as
`mlcnc_jax.checkpoint` writes them), newest first, and returns the newest one that restores, with every broken newer one
named by step, path and reason. It only reads: nothing is deleted or rewritten.

`choose_restore_step` turns that into the decision a run makes before restoring: the latest
step when it is sound; otherwise an error naming the broken checkpoint, or, when the caller
allows the fall-back, the previous sound step with a warning. `set_aside` renames a broken
checkpoint so that a run continuing from an earlier step can save that step number again
(orbax refuses to save a step that exists, and skips every step below the latest); the
files are kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from absl import logging

from mlcnc_jax.errors import UserError

ITEMS = ("state",)
# The step's record (model fingerprint, step): orbax's step metadata file; checkpoints of
# earlier versions kept it in a JSON item 'meta' instead.
STEP_METADATA = "_CHECKPOINT_METADATA"
LEGACY_META = "meta"
# Suffix of a checkpoint set aside; orbax ignores directories whose name is not a step.
BROKEN_SUFFIX = ".broken"


@dataclasses.dataclass(frozen=True)
class BrokenCheckpoint:
    """A checkpoint that cannot be restored."""

    step: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"step {self.step} at {self.path}: {self.reason}"


class BrokenCheckpointError(UserError, RuntimeError):
    """The checkpoint to restore is broken; the message names it and the ways on."""


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}"


def list_steps(directory: str) -> list[int]:
    """The steps of the finished checkpoints in `directory`, ascending.

    Args:
      directory: a CheckpointManager directory (e.g. `<workdir>/checkpoints`).

    Returns:
      The steps; [] when the directory does not exist. Unfinished saves (orbax's temporary
      directories) and checkpoints set aside are not steps.
    """
    from etils import epath  # local paths and bucket URLs alike

    path = epath.Path(directory)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())


def _record_problem(path) -> str | None:
    """Why the checkpoint at `path` has no readable model record, or None."""
    import json

    import orbax.checkpoint as ocp

    if (path / LEGACY_META).is_dir():
        try:
            ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / LEGACY_META)
        except Exception as e:  # any failure means: not restorable
            return f"its 'meta' item cannot be read ({_short(e)})"
        return None
    try:
        record = json.loads((path / STEP_METADATA).read_text())
    except Exception as e:
        return f"its record {STEP_METADATA} cannot be read ({_short(e)})"
    if not isinstance((record or {}).get("custom_metadata", {}).get("model"), dict):
        return f"its record {STEP_METADATA} names no model"
    return None


def check_step(directory: str, step: int, deep: bool = True) -> str | None:
    """Why checkpoint `step` of `directory` cannot be restored, or None when it can.

    Args:
      directory: a CheckpointManager directory.
      step: the checkpoint's step.
      deep: also read every array of the 'state' item (to host memory, then dropped), which
        finds truncated or damaged data files; without it only the files' presence and the
        metadata are checked.

    Returns:
      None, or the reason in one line.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    path = epath.Path(directory) / str(step)
    for item in ITEMS:
        if not (path / item).is_dir():
            return f"its item directory {item}/ is missing"
    problem = _record_problem(path)
    if problem:
        return problem
    if not (path / "state" / "_METADATA").exists():
        return "its array metadata file state/_METADATA is missing"
    try:
        tree = ocp.PyTreeCheckpointer().metadata(path / "state")
        tree = getattr(tree, "item_metadata", tree)
        tree = getattr(tree, "tree", tree)
    except Exception as e:
        return f"its array metadata cannot be read ({_short(e)})"
    if tree is None:
        return "its array metadata cannot be read (state/_METADATA is unreadable)"
    if not deep:
        return None
    from mlcnc_jax import checkpoint

    try:
        checkpoint.read_numpy_tree(str(path / "state"))  # host arrays: works on any topology
    except Exception as e:
        return f"its arrays cannot be read ({_short(e)})"
    return None


def find_restorable(directory: str, deep: bool = True) -> tuple[int | None, list[BrokenCheckpoint]]:
    """The newest restorable checkpoint of `directory`, and the broken ones newer than it.

    Reads only; nothing is deleted.

    Args:
      directory: a CheckpointManager directory (e.g. `<workdir>/checkpoints`).
      deep: read every array (see `check_step`).

    Returns:
      (step, broken): the newest step that restores (None if none does or there are no
      checkpoints) and the broken checkpoints newer than it, newest first, as
      `BrokenCheckpoint(step, path, reason)`.
    """
    from etils import epath

    broken = []
    for step in reversed(list_steps(directory)):
        reason = check_step(directory, step, deep)
        if reason is None:
            return step, broken
        broken.append(BrokenCheckpoint(step, str(epath.Path(directory) / str(step)), reason))
    return None, broken


def choose_restore_step(
    directory: str, allow_fallback: bool = False, fallback_flag: str = "--restore_step"
) -> int | None:
    """The step a run should restore: the latest, if sound.

    Args:
      directory: a CheckpointManager directory.
      allow_fallback: when the latest is broken, use the newest sound one (with a warning)
        instead of stopping.
      fallback_flag: the command-line flag named in the message.

    Returns:
      The step to restore, or None when there are no checkpoints.

    Raises:
      BrokenCheckpointError: the latest checkpoint is broken and `allow_fallback` is False,
        or no checkpoint restores; the message names each broken one and the previous sound
        step.
    """
    step, broken = find_restorable(directory)
    if not broken:
        return step
    listing = "\n".join(f"  {b}" for b in broken)
    if step is None:
        raise BrokenCheckpointError(
            f"no checkpoint in {directory} can be restored:\n{listing}\n"
            "They are kept as they are. Start the run in another --workdir, or move them away."
        )
    if not allow_fallback:
        raise BrokenCheckpointError(
            f"the latest checkpoint in {directory} is broken:\n{listing}\n"
            f"The newest sound checkpoint is step {step}: resume from it with "
            f"{fallback_flag}={step} (the broken ones are kept, renamed *{BROKEN_SUFFIX})."
        )
    logging.warning(
        "the latest checkpoint in %s is broken; resuming from step %d, the newest sound one. "
        "Broken (kept):\n%s",
        directory,
        step,
        listing,
    )
    return step


def set_aside(broken: Sequence[BrokenCheckpoint]) -> list[str]:
    """Renames broken checkpoints to `<step>.broken` so that their steps can be saved again.

    Orbax skips saving any step below the latest and refuses to save an existing one, so a
    run that continues from an earlier step must move the newer, broken ones out of its way.
    Their files are kept.

    Args:
      broken: the checkpoints, e.g. the second value of `find_restorable`.

    Returns:
      The new paths.
    """
    from etils import epath

    moved = []
    for b in broken:
        target, n = b.path + BROKEN_SUFFIX, 1
        while epath.Path(target).exists():
            n += 1
            target = f"{b.path}{BROKEN_SUFFIX}{n}"
        epath.Path(b.path).rename(target)
        logging.warning("set aside the broken checkpoint %s as %s", b, target)
        moved.append(target)
    return moved


def set_aside_after(directory: str, step: int, suffix: str = ".set_aside") -> list[str]:
    """Renames every checkpoint newer than `step` to `<its step><suffix>`; nothing is deleted.

    For a run resumed on purpose from an earlier step (e.g. `--restore_step=N` after a
    divergence): orbax would skip saving every step up to the newest existing one and refuse
    to save that one, so the newer checkpoints, sound or not, must make way. Call it on one
    process, before the CheckpointManager is created (or call its `reload()` afterwards).

    Args:
      directory: a CheckpointManager directory.
      step: the step being restored.
      suffix: appended to the renamed directories (orbax ignores names that are not steps).

    Returns:
      The new paths.
    """
    from etils import epath

    moved = []
    for later in list_steps(directory):
        if later <= step:
            continue
        source = epath.Path(directory) / str(later)
        target, n = epath.Path(f"{source}{suffix}"), 1
        while target.exists():
            n += 1
            target = epath.Path(f"{source}{suffix}{n}")
        source.rename(target)
        logging.warning(
            "set aside checkpoint step %d (newer than step %d) as %s", later, step, target
        )
        moved.append(str(target))
    return moved


def choose_start_step(
    checkpointer, workdir: str, wanted: int | None, *, training: bool
) -> int | None:
    """The checkpoint a run starts from: `wanted` (--restore_step), else the latest sound one.

    A broken latest checkpoint stops the run, naming it and the newest sound step to pass
    as --restore_step. Training from an earlier step sets the newer checkpoints and their
    reports aside (renamed `<step>.set_aside`, never deleted) so that those steps can be
    saved again; evaluating one leaves them as they are.

    Args:
      checkpointer: the run's `checkpoint.Checkpointer`.
      workdir: the run's directory (its reports).
      wanted: the step asked for, or None.
      training: whether the run trains from the step.
    """
    import jax

    from mlcnc_jax import processes, reports

    directory = checkpointer.directory
    if wanted is None:
        return choose_restore_step(directory)
    steps = list_steps(directory)
    if wanted not in steps:
        raise FileNotFoundError(
            f"--restore_step={wanted}: {directory} has no checkpoint of that step; it has "
            f"{', '.join(map(str, steps)) or 'none'}."
        )
    problem = check_step(directory, wanted)
    if problem:
        raise BrokenCheckpointError(
            f"--restore_step={wanted}: that checkpoint ({directory}/{wanted}) is broken: "
            f"{problem}. Choose another of {', '.join(map(str, steps))}."
        )
    if training:
        if jax.process_index() == 0:
            set_aside_after(directory, wanted)
            reports.set_aside_reports_after(workdir, wanted)
        processes.sync("mlcnc_jax checkpoints set aside")
        checkpointer.manager.reload()
    return wanted
