"""Atomic file writes: readers (and a crash) see the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644  # bundle files and reports: readable by the service user, whoever built them
DIR_MODE = 0o755


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = FILE_MODE) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over `path` (with `mode`:
    mkstemp alone would leave it 0600, unreadable to another user such as the robot's service)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = FILE_MODE) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def normalise_modes(root: str | os.PathLike[str]) -> None:
    """Folders DIR_MODE and files FILE_MODE under `root` (and root itself), whatever the umask made them."""
    top = Path(root)
    top.chmod(DIR_MODE)
    for path in top.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
