"""Rate-limited warnings for code that runs in loops (the tick, capture and reader threads).

Each message template is logged at most once per interval; what was held back is counted and
reported with the next one that goes through, so the journal shows the problem without drowning in it.
"""

from __future__ import annotations

import logging
import math
import threading
import time


class RateLimitedWarnings:
    def __init__(self, logger: logging.Logger, interval_s: float = 5.0):
        self._logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()  # warned from several threads (reader + caller)
        self.suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(message, -math.inf)
            if now - last < self.interval_s:
                self._held[message] = self._held.get(message, 0) + 1
                self.suppressed += 1
                return
            held = self._held.pop(message, 0)
            self._last[message] = now
        if held:
            message += " (%d similar warnings in the last %.0f s not shown)"
            args = (*args, held, now - last)
        self._logger.warning(message, *args)
