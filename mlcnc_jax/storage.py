"""Where run outputs go: local paths or bucket URLs (gs://...) alike, through etils.epath."""

from __future__ import annotations

import io
import os

from etils import epath


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


def write_text(path: str, text: str) -> None:
    epath.Path(path).write_text(text)


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Saves a matplotlib figure as PNG to a local path or a bucket."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    epath.Path(path).write_bytes(buffer.getvalue())
