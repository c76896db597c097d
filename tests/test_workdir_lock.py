"""One run per workdir: the lock file, stale locks, and real processes contending."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mlcnc_jax import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run that holds the lock until stdin closes (or it is killed), printing what happens.
_HOLDER = textwrap.dedent(
    """
    import sys, time
    from mlcnc_jax import workdir_lock
    try:
        lock = workdir_lock.acquire(sys.argv[1])
    except workdir_lock.WorkdirLockedError as e:
        print("REFUSED", e, flush=True)
        sys.exit(3)
    print("HELD", flush=True)
    # Short sleeps, as a run's main thread is never long in one call: a signal that the
    # kernel hands to another thread reaches the Python handler only when the main
    # thread next checks, and one long sleep would put that off to its end.
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        time.sleep(0.05)
    """
)


def _as_from_a_terminal():
    # A child inherits an ignored or blocked SIGINT from the process that starts it (a
    # background job of a script has SIGINT ignored, and Python then leaves it ignored, as
    # the lock does too). The holder stands for a run started from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start(workdir, hold_s=60.0):
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir), str(hold_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )


def _write_lock(path, pid, host, started):
    with open(path, "w") as f:
        json.dump({"pid": pid, "host": host, "started": started, "argv": ["x"], "token": "t"}, f)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_hold_writes_the_holder_and_removes_the_file(tmp_path):
    path = workdir_lock.lock_path(str(tmp_path))
    with workdir_lock.hold(str(tmp_path)) as lock:
        info = workdir_lock.read_lock(path)
        assert info.pid == os.getpid() and info.host == socket.gethostname()
        assert info.token == lock.info.token
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
            workdir_lock.acquire(str(tmp_path))
    assert not os.path.exists(path)


def test_released_on_an_exception(tmp_path):
    with pytest.raises(KeyError), workdir_lock.hold(str(tmp_path)):
        raise KeyError("boom")
    assert not os.path.exists(workdir_lock.lock_path(str(tmp_path)))


def test_process_index_has_its_own_file(tmp_path):
    with workdir_lock.hold(str(tmp_path)), workdir_lock.hold(str(tmp_path), process_index=1):
        assert os.path.exists(tmp_path / "run.lock") and os.path.exists(tmp_path / "run.1.lock")


def test_stale_lock_of_this_host_is_taken_over(tmp_path, caplog):
    path = workdir_lock.lock_path(str(tmp_path))
    pid = _dead_pid()
    _write_lock(path, pid, socket.gethostname(), time.time())
    with workdir_lock.hold(str(tmp_path)) as lock:
        assert workdir_lock.read_lock(path).pid == os.getpid() == lock.info.pid
    assert "no longer runs" in caplog.text and str(pid) in caplog.text


def test_lock_of_another_host(tmp_path):
    path = workdir_lock.lock_path(str(tmp_path))
    _write_lock(path, 1, "elsewhere", time.time() - 60)
    with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on host elsewhere") as e:
        workdir_lock.acquire(str(tmp_path))
    assert path in str(e.value)  # the fix: delete it when that run is gone
    with workdir_lock.hold(str(tmp_path), force=True):
        assert workdir_lock.read_lock(path).host == socket.gethostname()
    _write_lock(path, 1, "elsewhere", time.time() - 3600)
    with workdir_lock.hold(str(tmp_path), foreign_stale_after_s=600):
        assert workdir_lock.read_lock(path).host == socket.gethostname()


def test_a_later_holders_file_is_never_removed(tmp_path):
    lock = workdir_lock.acquire(str(tmp_path))
    path = lock.path
    _write_lock(path, os.getpid(), socket.gethostname(), time.time())  # someone else's now
    lock.release()
    assert os.path.exists(path)


def test_second_process_is_refused_naming_the_holder_then_takes_over_after_kill(tmp_path):
    first = _start(tmp_path)
    try:
        assert first.stdout.readline().strip() == "HELD"
        second = _start(tmp_path, 0)
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 3
        assert out.startswith("REFUSED") and f"pid {first.pid} on host" in out
        first.send_signal(signal.SIGKILL)  # leaves the lock file behind
        first.wait(timeout=30)
        assert os.path.exists(tmp_path / "run.lock")
        third = _start(tmp_path, 0)
        out, _ = third.communicate(timeout=60)
        assert third.returncode == 0 and "HELD" in out and "taking over" in out
    finally:
        first.kill()


def test_sigterm_releases_the_lock(tmp_path):
    first = _start(tmp_path)
    try:
        assert first.stdout.readline().strip() == "HELD"
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
        assert not os.path.exists(tmp_path / "run.lock")
    finally:
        first.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_with_one_line_and_releases_the_lock(tmp_path, signum):
    first = _start(tmp_path)
    try:
        assert first.stdout.readline().strip() == "HELD"
        first.send_signal(signum)
        try:
            out, _ = first.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{signal.Signals(signum).name} did not stop the holder in 30 s; this process: "
                f"SIGINT handler {signal.getsignal(signal.SIGINT)}, blocked "
                f"{signal.pthread_sigmask(signal.SIG_BLOCK, [])}"
            )
        assert first.returncode == 128 + signum
        assert "Traceback" not in out and "KeyboardInterrupt" not in out
        assert out.strip() == (
            f"-c: stopped by {signal.Signals(signum).name}: {workdir_lock.STOPPED}"
        )
        assert not os.path.exists(tmp_path / "run.lock")
    finally:
        first.kill()


def test_a_stop_waits_for_checkpoint_io_to_finish(tmp_path, monkeypatch):
    # Raised inside orbax (here: a frame of a module named like it), the stop is put off.
    retries = []
    monkeypatch.setattr(workdir_lock.threading, "Timer", lambda *a: retries.append(a) or _NoTimer())
    namespace = {"__name__": "orbax.checkpoint.fake"}
    exec("def write(stop):\n    import sys\n    stop(sys._getframe())", namespace)
    namespace["write"](lambda frame: workdir_lock._stop(signal.SIGTERM, frame))
    assert len(retries) == 1 and retries[0][2][1] == signal.SIGTERM
    with pytest.raises(SystemExit) as stopped:
        workdir_lock._stop(signal.SIGTERM, sys._getframe())
    assert stopped.value.code == 128 + signal.SIGTERM


class _NoTimer:
    def start(self):
        pass


def test_two_processes_started_together_one_wins(tmp_path):
    runs = [_start(tmp_path, 5.0) for _ in range(2)]
    outs = [r.communicate(timeout=60)[0] for r in runs]
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 3], outs
    assert sum(o.startswith("HELD") for o in outs) == 1
    assert not os.path.exists(tmp_path / "run.lock")
