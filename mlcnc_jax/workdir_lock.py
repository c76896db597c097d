"""One run per workdir: a lock file that names its holder.

Two runs writing checkpoints into one workdir delete each other's checkpoints and end in
orbax errors. A run therefore takes `<workdir>/run.lock` (process 0; process i of a
multi-process run takes `run.<i>.lock`, so every process of a second run is refused, not
only the first) before it writes anything, and a second run stops at once with a message
naming the holder: pid, host, start time and command line.

The lock file is created with O_CREAT | O_EXCL, which is atomic on local disks and NFS v3+,
and is removed when the holder exits normally, raises, or is ended by SIGTERM (through the
context manager and an atexit hook). A run killed with SIGKILL (or a crashed machine) leaves
the file behind; such a stale lock is detected:

- written on this host by a process that no longer exists: taken over, with a warning;
- written on another host (a shared disk), whose process cannot be checked from here:
  refused, unless the lock is older than `FOREIGN_STALE_AFTER_S` (a run rewrites nothing in
  the lock, so its age is the holder's running time) or the caller passes `force=True`
  (the command line's way to say "that run is gone").

Bucket workdirs (gs://...) offer no atomic create-if-absent through the file API used here:
they are not locked, with a warning.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator

from absl import logging

from mlcnc_jax import storage
from mlcnc_jax.errors import UserError

# A lock of another host older than this is taken to be left by a run that died (a run
# that really goes on longer needs force=True from its successor, or to be left alone).
FOREIGN_STALE_AFTER_S = 7 * 24 * 3600


class WorkdirLockedError(UserError, RuntimeError):
    """Another live run holds the workdir."""


@dataclasses.dataclass
class LockInfo:
    """What a lock file says about its holder."""

    pid: int
    host: str
    started: float  # time.time() when taken
    argv: list[str]
    token: str  # tells this holder's file from a later holder's

    def describe(self) -> str:
        when = datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds")
        return f"pid {self.pid} on host {self.host}, started {when} ({' '.join(self.argv)})"


def lock_path(workdir: str, process_index: int = 0) -> str:
    """The lock file of `workdir` for the process `process_index` of a run."""
    name = "run.lock" if process_index == 0 else f"run.{process_index}.lock"
    return os.path.join(workdir, name)


def read_lock(path: str) -> LockInfo | None:
    """The holder recorded in a lock file, or None when there is no (readable) lock file."""
    try:
        with open(path) as f:
            d = json.load(f)
        return LockInfo(
            pid=int(d["pid"]),
            host=str(d["host"]),
            started=float(d["started"]),
            argv=list(d.get("argv", [])),
            token=str(d["token"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Half written (the holder was killed between create and write) or garbage: its age
        # is the file's, its holder unknown.
        try:
            mtime = os.path.getmtime(path)
        except FileNotFoundError:
            return None
        return LockInfo(pid=-1, host="", started=mtime, argv=["<unreadable lock file>"], token="")


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _stale_reason(info: LockInfo, foreign_stale_after_s: float) -> str | None:
    # Why the lock may be taken over, or None when its holder may still run.
    age = time.time() - info.started
    if info.host == socket.gethostname() or info.pid < 0:
        if info.pid < 0 and age < 60:
            return None  # maybe being written right now
        if not pid_alive(info.pid):
            return f"its process {info.pid} no longer runs on this host"
        return None
    if age > foreign_stale_after_s:
        return f"it is {age / 3600:.1f} h old (more than {foreign_stale_after_s / 3600:.1f} h)"
    return None


@dataclasses.dataclass
class WorkdirLock:
    """A held workdir lock; `release()` (or leaving `hold`) removes its file."""

    path: str
    info: LockInfo | None  # None: not locked (a bucket workdir)
    _released: bool = False

    def release(self) -> None:
        """Removes the lock file if it is still this holder's (idempotent)."""
        if self._released or self.info is None:
            return
        self._released = True
        current = read_lock(self.path)
        if current is not None and current.token == self.info.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def _create(path: str) -> LockInfo | None:
    # The atomic step: exactly one process creates the file.
    info = LockInfo(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=time.time(),
        argv=list(sys.argv),
        token=uuid.uuid4().hex,
    )
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(info), f)
        f.flush()
        os.fsync(f.fileno())
    return info


def _take_over(path: str, stale: LockInfo) -> bool:
    # Moves the stale file aside; only one contender's rename succeeds. If the file moved is no
    # longer the stale one (another contender took over between our read and our rename), it is
    # put back with link(), which never overwrites.
    aside = f"{path}.stale.{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = read_lock(aside)
    if moved is not None and moved.token != stale.token:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        os.remove(aside)
        return False
    os.remove(aside)
    return True


_HELD: list[WorkdirLock] = []


def release_all() -> None:
    for lock in list(_HELD):
        lock.release()


atexit.register(release_all)


STOPPED = "the same command resumes the run from its last checkpoint"
# Modules whose work a stop waits for: a checkpoint being written, restored or rotated out
# is left whole (orbax deletes an old checkpoint file by file).
_FINISH_FIRST = ("orbax.", "mlcnc_jax.checkpoint")


def _in_checkpoint_io(frame) -> bool:
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith(_FINISH_FIRST):
            return True
        frame = frame.f_back
    return False


def _stop(signum: int, frame) -> None:
    """SIGTERM and SIGINT (Ctrl-C): a short message and SystemExit, once checkpoint I/O is done.

    SystemExit runs the `finally` blocks and atexit hooks (the lock is released); raised in
    the middle of a checkpoint save or rotation it could leave a half-written or
    half-deleted checkpoint, so the stop is then retried every 0.2 s until the main thread
    is out of it.
    """
    if _in_checkpoint_io(frame):
        threading.Timer(0.2, os.kill, (os.getpid(), signum)).start()
        return
    name = signal.Signals(signum).name
    print(f"{os.path.basename(sys.argv[0])}: stopped by {name}: {STOPPED}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(128 + signum)


def _release_on_sigterm() -> None:
    # SIGTERM (a scheduler's stop, `kill PID`) ends Python without atexit hooks unless it
    # raises; turn it into SystemExit where no one else handles it. Ctrl-C (SIGINT) ends the
    # same way instead of with a KeyboardInterrupt traceback from wherever it landed.
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _stop)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _stop)


def _restore_sigint() -> None:
    # Ctrl-C is Python's own again once no workdir is held (e.g. in a notebook or a test).
    with contextlib.suppress(ValueError):
        if not _HELD and signal.getsignal(signal.SIGINT) is _stop:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def acquire(
    workdir: str,
    *,
    process_index: int = 0,
    force: bool = False,
    foreign_stale_after_s: float = FOREIGN_STALE_AFTER_S,
) -> WorkdirLock:
    """Takes the lock of `workdir` for this process, or stops at once.

    Args:
      workdir: the run's directory (created if missing).
      process_index: this process's index in a multi-process run (jax.process_index()).
      force: take the lock whoever holds it (for a lock of another host whose run is known
        to be gone).
      foreign_stale_after_s: a lock of another host older than this is taken over.

    Returns:
      The held lock; it is released by `release()`, at interpreter exit or on SIGTERM or
      SIGINT (both end the run with a short message, after any checkpoint I/O under way).

    Raises:
      WorkdirLockedError: another run holds the workdir; the message names it and the fix.
    """
    if storage.is_url(workdir):
        logging.warning(
            "workdir %s is a bucket URL: it is not locked against a second run", workdir
        )
        return WorkdirLock(path="", info=None)
    workdir = storage.resolve(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = lock_path(workdir, process_index)
    for _ in range(5):  # a few rounds in case of contenders taking over the same stale lock
        info = _create(path)
        if info is not None:
            lock = WorkdirLock(path=path, info=info)
            _HELD.append(lock)
            _release_on_sigterm()
            return lock
        holder = read_lock(path)
        if holder is None:
            continue  # released between our create and our read
        reason = "--force" if force else _stale_reason(holder, foreign_stale_after_s)
        if reason is None:
            raise WorkdirLockedError(
                f"workdir {workdir} is in use by another run: {holder.describe()}. "
                f"Wait for it to finish, stop it, or use another --workdir. If that run is "
                f"gone (e.g. its machine died), delete {path}."
            )
        if _take_over(path, holder):
            logging.warning(
                "taking over the lock of workdir %s from %s: %s",
                workdir,
                holder.describe(),
                "forced" if force else reason,
            )
    raise WorkdirLockedError(f"could not take the lock {path}: other runs keep taking it")


@contextlib.contextmanager
def hold(
    workdir: str,
    *,
    process_index: int = 0,
    force: bool = False,
    foreign_stale_after_s: float = FOREIGN_STALE_AFTER_S,
) -> Iterator[WorkdirLock]:
    """`acquire` as a context manager: the lock is released when the block ends.

    Args:
      workdir: the run's directory.
      process_index: this process's index in a multi-process run.
      force: take the lock whoever holds it.
      foreign_stale_after_s: a lock of another host older than this is taken over.

    Yields:
      The held lock.
    """
    lock = acquire(
        workdir,
        process_index=process_index,
        force=force,
        foreign_stale_after_s=foreign_stale_after_s,
    )
    try:
        yield lock
    finally:
        lock.release()
        with contextlib.suppress(ValueError):
            _HELD.remove(lock)
        _restore_sigint()
