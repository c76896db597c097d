"""Where run outputs go: local paths or bucket URLs (gs://...) alike, through etils.epath."""

from __future__ import annotations

import io
import os
import tempfile

from etils import epath


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary files are created private (0600); the finished file gets the usual permissions.
_FILE_MODE = 0o666 & ~_umask()


def is_url(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> str:
    """A workdir as an absolute local path (with ~ expanded), or the URL unchanged."""
    path = str(path)
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def join(*parts: str) -> str:
    return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file atomically: readers see the old file or the new one, never a part.

    A local file is written to a temporary file in the same directory, flushed to disk, then
    renamed over `path` (a rename within one file system is atomic), so a write error (a full
    disk) or a kill leaves the previous file, or none, as it was. A bucket object is written
    in one request, which is atomic already.

    Args:
      path: a local path or a bucket URL.
      data: the file's whole content.
    """
    path = str(path)
    if is_url(path):
        epath.Path(path).write_bytes(data)
        return
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise


def write_text(path: str, text: str) -> None:
    """Writes a text file (UTF-8) atomically; see `write_bytes`."""
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str, text: str) -> None:
    """Adds `text` at the end of a file, atomically: the old content is kept on any failure.

    The file is rewritten whole (old content, then `text`) through `write_bytes`, so a write
    error leaves the previous content intact instead of a half-written file.
    """
    target = epath.Path(path)
    previous = target.read_bytes() if target.exists() else b""
    write_bytes(path, previous + text.encode("utf-8"))


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Saves a matplotlib figure as PNG to a local path or a bucket (atomically)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes(path, buffer.getvalue())
