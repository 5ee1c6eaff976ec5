"""Small file-system helpers shared by everything that writes atomically."""

from __future__ import annotations

import os
from pathlib import Path


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
