"""The simulated controller's "USB adapter": a pty behind a stable symlink, plugged and unplugged.

The runtime opens ``link_path`` (shaped like /dev/serial/by-id/...) with pyserial exactly as it opens a
real adapter. ``unplug`` closes the pty (the host's reads and writes fail) and removes the link;
``plug`` makes a new pty (a new /dev/pts/N) behind the same link. Every plug and unplug bumps a
generation, so the controller's reader never reads from a stale fd.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import tty

logger = logging.getLogger(__name__)


class PtyDevice:
    """One pty at a time behind ``link_path``: ``open()``, ``write``/``read``, ``plug``/``unplug``, ``close()``."""

    def __init__(self, link_name: str) -> None:
        self._link_name = link_name
        self._lock = threading.Lock()  # guards the fds, the generation and writes to the leader
        self._leader_fd: int | None = None
        self._follower_fd: int | None = None  # held open so the leader never sees EIO between host opens
        self._generation = 0
        self._port_path: str | None = None
        self._link_dir: str | None = None

    def open(self) -> None:
        """Make the link's directory and plug the first pty; OSError (no ptys left) leaves nothing behind."""
        self._link_dir = tempfile.mkdtemp(prefix="vla-sim-serial-")
        try:
            self.plug()
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._unplug_locked()
        if self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)
            self._link_dir = None

    @property
    def link_path(self) -> str:
        if self._link_dir is None:
            raise RuntimeError("the controller is not started; link_path exists between start() and stop()")
        return os.path.join(self._link_dir, self._link_name)

    @property
    def port_path(self) -> str | None:
        with self._lock:
            return self._port_path

    @property
    def plugged(self) -> bool:
        with self._lock:
            return self._leader_fd is not None

    def plug(self) -> None:
        with self._lock:
            if self._leader_fd is not None:
                raise RuntimeError(f"already plugged in at {self._port_path}; unplug() first")
            if self._link_dir is None:
                raise RuntimeError("the controller is not started")
            leader, follower = os.openpty()
            try:
                tty.setraw(follower)  # no echo, no line editing, no XON/XOFF: bytes pass untouched
                os.set_blocking(leader, False)  # a full buffer (host not reading) drops frames, as a UART would
                path = os.ttyname(follower)
                link = os.path.join(self._link_dir, self._link_name)
                staging = link + ".new"
                if os.path.lexists(staging):
                    os.unlink(staging)
                os.symlink(path, staging)
                os.replace(staging, link)  # atomic: the host never sees a half-made link
            except OSError:
                os.close(leader)
                os.close(follower)
                raise
            self._leader_fd, self._follower_fd, self._port_path = leader, follower, path
            self._generation += 1

    def unplug(self) -> None:
        with self._lock:
            self._unplug_locked()

    def _unplug_locked(self) -> None:
        if self._link_dir is not None:
            try:
                os.unlink(os.path.join(self._link_dir, self._link_name))
            except FileNotFoundError:
                logger.debug("symlink already gone")
        for fd in (self._leader_fd, self._follower_fd):
            if fd is not None:
                os.close(fd)
        self._leader_fd = self._follower_fd = None
        self._port_path = None
        self._generation += 1

    def write(self, data: bytes) -> bool:
        """Write to the host; False when unplugged or when nobody reads and the buffer is full (lost)."""
        with self._lock:
            if self._leader_fd is None or not data:
                return False
            try:
                written = os.write(self._leader_fd, data)
            except BlockingIOError:
                return False  # nobody reads the other end and its buffer is full: the bytes are lost
            except OSError as exc:
                logger.debug("pty write failed: %s", exc)
                return False
            return written == len(data)

    def current(self) -> tuple[int | None, int]:
        """(the leader fd to wait on, or None while unplugged; the generation it belongs to)."""
        with self._lock:
            return self._leader_fd, self._generation

    def read(self, generation: int, n_bytes: int) -> bytes | None:
        """Up to ``n_bytes`` from the host; None when ``generation`` is gone or nothing was there."""
        with self._lock:
            if self._generation != generation or self._leader_fd is None:
                return None
            try:
                return os.read(self._leader_fd, n_bytes)
            except BlockingIOError:
                return None
            except OSError as exc:
                logger.debug("pty read failed: %s", exc)
                return b""
