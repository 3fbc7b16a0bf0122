"""Waiting on real threads, processes and sockets in tests without sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable

# Bounds every wait so that a broken part fails its test instead of hanging the suite; no test
# measures time with it.
HANG_GUARD_S = 10.0


def wait_until(predicate: Callable[[], object], timeout_s: float = HANG_GUARD_S, poll_s: float = 0.005) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passed; its last answer, as a bool."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())
