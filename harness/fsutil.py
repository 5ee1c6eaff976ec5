"""Small file-system helpers shared by everything that writes atomically."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.errors import UserError, quote


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike) -> None:
    """Give a temporary file or folder the mode a plain write would have had.

    ``mkstemp``/``mkdtemp`` create private (0600/0700) entries; renamed into place as they are, results,
    caches and downloads would be unreadable to other users.
    """
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure delete it.

    A reader never sees a half-written file: either the old one, the complete new one, or none.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_writable_dir(path: str | os.PathLike, option: str) -> Path:
    """Create ``path`` if needed and prove a file can be written in it, or raise a one-line UserError.

    The write is tried, not inferred from permission bits: root ignores modes, and a read-only file
    system, a path under a file or a pseudo file system (/proc, /sys) refuse writes whatever they say.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "it is a file, not a folder" if folder.is_file() else (err.strerror or type(err).__name__)
        raise UserError(f"{option} {quote(str(folder))}: cannot write there ({reason}); "
                        "pass a folder you can write to") from err
    return folder
