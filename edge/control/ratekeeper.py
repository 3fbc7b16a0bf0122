"""Rate keeper for the control loop (after openpilot's Ratekeeper), on an injected clock.

Deadlines are absolute: tick ``k`` is due at ``anchor + k * period_s``, computed from the
tick index rather than accumulated, so neither sleep overshoot nor float rounding drifts the
loop. A tick that runs past its deadline is an overrun: instead of starting the missed ticks
back to back (a burst that would send several commands within milliseconds), the keeper
skips ahead to the next deadline on the grid that is still in the future and counts the grid
deadlines it skipped.

Typical loop::

    keeper = RateKeeper(0.1)
    while running:
        tick()                      # observe -> infer -> guard -> send
        collect_in_slack(keeper.remaining_s(), min_slack_s=0.02)
        keeper.wait()
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence

import numpy as np

from edge.errors import ConfigError

logger = logging.getLogger(__name__)

# A real sleep can wake a hair early; sleep again, but never spin forever on a clock
# that does not advance.
_MAX_SLEEPS_PER_WAIT = 8


class RateKeeper:
    """Keeps a loop on a fixed period with absolute deadlines; counts overruns.

    ``clock`` must be monotonic and share its epoch with whatever the loop timestamps;
    ``sleep`` takes seconds. Both are injected so tests can run on a fake clock.
    The grid is anchored at construction (tick 0 starts then); ``restart`` re-anchors it.
    """

    def __init__(
        self,
        period_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        name: str = "control",
        *,
        jitter_window: int = 1024,  # tick-start offsets kept for percentiles (~100 s at 10 Hz)
        warn_interval_s: float = 10.0,  # at most one overrun warning per this much clock time
    ) -> None:
        if (
            isinstance(period_s, bool)
            or not isinstance(period_s, numbers.Real)
            or not (math.isfinite(period_s) and period_s > 0)
        ):
            raise ConfigError(f"rate keeper period_s must be a finite number > 0, got {period_s!r}")
        if isinstance(jitter_window, bool) or not isinstance(jitter_window, int) or jitter_window < 1:
            raise ConfigError(f"rate keeper jitter_window must be an integer >= 1, got {jitter_window!r}")
        if not (isinstance(warn_interval_s, numbers.Real) and warn_interval_s >= 0):
            raise ConfigError(f"rate keeper warn_interval_s must be >= 0, got {warn_interval_s!r}")
        self.period_s = float(period_s)
        self.name = name
        self._clock = clock
        self._sleep = sleep
        self._warn_interval_s = float(warn_interval_s)
        self._jitter = np.zeros(jitter_window, dtype=np.float64)
        self._wake: Callable[[float], bool] | None = None
        self.sync_window_s = 0.0
        self.restart()

    def sync_to(self, wake: Callable[[float], bool] | None, window_s: float = 0.0) -> None:
        """Frame-synchronous ticks: in the last `window_s` before each deadline, `wake(timeout_s)` blocks
        until a new frame arrives (True) or the timeout passes (False); the tick starts on the frame, early,
        and its own deadline stays on the grid. None turns it off. The window must be shorter than a period."""
        if wake is not None and not (isinstance(window_s, numbers.Real) and 0 < window_s < self.period_s):
            raise ConfigError(f"frame-sync window must be a number in (0, {self.period_s:g}) s (under one control "
                              f"period), got {window_s!r}; set loop.frame_sync_window_s, or loop.frame_sync: false")
        self._wake = wake
        self.sync_window_s = float(window_s) if wake is not None else 0.0

    def restart(self) -> None:
        """Re-anchor the grid at the clock's current time (tick 0 starts now); clears counters."""
        now = self._clock()
        self._anchor_s = now
        self._index = 0  # grid index of the current tick's start
        self.tick_start_s = now
        self.ticks = 0
        self.overruns = 0
        self.missed_deadlines = 0
        self.lag_s = 0.0
        self.max_lag_s = 0.0
        self._jitter_count = 0
        self.synced_ticks = 0  # ticks started early on a new frame (sync_to)
        self._last_warn_s = -math.inf
        self._overruns_since_warn = 0

    @property
    def next_deadline_s(self) -> float:
        """Absolute clock time at which the current tick should end."""
        return self._deadline(self._index + 1)

    def remaining_s(self) -> float:
        """Slack left before the current tick's deadline (negative when already late)."""
        return self.next_deadline_s - self._clock()

    def wait(self) -> bool:
        """End the current tick: sleep until the next deadline; True if this tick overran."""
        now = self._clock()
        target = self._index + 1
        deadline = self._deadline(target)
        overran = now > deadline
        if overran:
            self.lag_s = now - deadline
            # First grid point strictly after now; floor() of a float ratio can be one off
            # either way, so settle it against the deadlines themselves.
            nxt = max(target + 1, math.floor((now - self._anchor_s) / self.period_s) + 1)
            while self._deadline(nxt) <= now:
                nxt += 1
            while nxt - 1 > target and self._deadline(nxt - 1) > now:
                nxt -= 1
            missed = nxt - target
            self.overruns += 1
            self.missed_deadlines += missed
            self.max_lag_s = max(self.max_lag_s, self.lag_s)
            self._report_overrun(now, missed)
            target = nxt
            deadline = self._deadline(target)
        else:
            self.lag_s = 0.0

        opens = deadline - self.sync_window_s  # == deadline without frame sync
        for _ in range(_MAX_SLEEPS_PER_WAIT):
            remaining = opens - now
            if remaining <= 0.0:
                break
            self._sleep(remaining)
            now = self._clock()
        if self._wake is not None and deadline - now > 0.0:
            woke = self._wake(deadline - now)
            now = self._clock()
            if woke and now < deadline:
                self.synced_ticks += 1
            else:  # no frame in the window: start on the deadline as without frame sync
                for _ in range(_MAX_SLEEPS_PER_WAIT):
                    if deadline - now <= 0.0:
                        break
                    self._sleep(deadline - now)
                    now = self._clock()

        self._index = target
        self.tick_start_s = now
        self._jitter[self._jitter_count % self._jitter.shape[0]] = now - deadline
        self._jitter_count += 1
        self.ticks += 1
        return overran

    def jitter_percentiles(
        self, percentiles: Sequence[float] = (50.0, 90.0, 99.0, 100.0)
    ) -> dict[float, float]:
        """Percentiles (seconds) of tick-start offset from the ideal deadline, over the window (negative:
        a frame-synchronous tick that started early on its frame).

        Values are NaN before the first ``wait``.
        """
        n = min(self._jitter_count, self._jitter.shape[0])
        if n == 0:
            return {float(p): math.nan for p in percentiles}
        values = np.percentile(self._jitter[:n], list(percentiles))
        return {float(p): float(v) for p, v in zip(percentiles, values, strict=True)}

    def summary(self) -> str:
        """One line for the timing summary at exit."""
        pct = self.jitter_percentiles((50.0, 99.0, 100.0))
        return (
            f"{self.name}: {self.ticks} ticks at {1.0 / self.period_s:.3g} Hz, {self.overruns} overruns, "
            f"{self.missed_deadlines} missed deadlines, max lag {self.max_lag_s * 1e3:.2f} ms, "
            f"start jitter p50 {pct[50.0] * 1e3:.3f} ms p99 {pct[99.0] * 1e3:.3f} ms "
            f"max {pct[100.0] * 1e3:.3f} ms"
        )

    def _deadline(self, index: int) -> float:
        return self._anchor_s + index * self.period_s

    def _report_overrun(self, now: float, missed: int) -> None:
        # Rate-limited: a loop that overruns every tick must not flood journald.
        self._overruns_since_warn += 1
        if now - self._last_warn_s >= self._warn_interval_s:
            logger.warning(
                "%s loop overran its deadline by %.2f ms (skipped %d deadline(s)); "
                "%d overrun(s) since the last warning, %d in total",
                self.name,
                self.lag_s * 1e3,
                missed,
                self._overruns_since_warn,
                self.overruns,
            )
            self._last_warn_s = now
            self._overruns_since_warn = 0
        else:
            logger.debug("%s loop overran by %.2f ms", self.name, self.lag_s * 1e3)
