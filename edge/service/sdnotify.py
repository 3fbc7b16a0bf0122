"""systemd's notify protocol (sd_notify) without a dependency: datagrams to $NOTIFY_SOCKET.

READY=1 after start-up, WATCHDOG=1 from ticks that met their deadline, STOPPING=1 on shutdown,
STATUS=... for `systemctl status`. A no-op when not started by systemd (no NOTIFY_SOCKET).

The watchdog interval comes from $WATCHDOG_USEC (WatchdogSec= of the unit); $WATCHDOG_PID, when set,
names the process the watchdog is meant for (as sd_watchdog_enabled() reads it).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from edge.ratelimit import RateLimitedWarnings

logger = logging.getLogger(__name__)

_WARN_INTERVAL_S = 10.0


class SystemdNotifier:
    def __init__(self, address: str | None = None, *, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.address = address if address is not None else env.get("NOTIFY_SOCKET")
        self.watchdog_interval_s = _watchdog_interval_s(env)
        self._socket: socket.socket | None = None
        # Notifications come from the control loop at 10 Hz: when the socket is gone, one line per
        # interval, not one per tick.
        self._warn = RateLimitedWarnings(logger, _WARN_INTERVAL_S)
        if self.address:
            target = self.address
            if target.startswith("@"):  # abstract namespace socket
                target = "\0" + target[1:]
            self._target = target
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the control loop on a full receive queue: a lost ping is logged instead.
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, message: str) -> bool:
        if self._socket is None:
            return False
        try:
            self._socket.sendto(message.encode(), self._target)
        except OSError as exc:
            # Losing a notification must not take the loop down; systemd's watchdog notices if it persists.
            self._warn("sd_notify %r to %s failed: %s", message.split("\n", 1)[0], self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        # One line: systemd shows STATUS= as is, and a newline would start another assignment.
        return self.notify("STATUS=" + " ".join(text.split()))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    """WatchdogSec= of the unit in seconds, or None when the watchdog is off or meant for another process."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            logger.warning("ignoring WATCHDOG_PID=%r: not an integer", pid)
    return usec / 1e6 if usec > 0 else None
