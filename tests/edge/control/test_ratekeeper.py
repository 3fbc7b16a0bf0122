import logging
import math
import random
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.control.ratekeeper import RateKeeper
from edge.errors import ConfigError

PERIOD = 0.1


class FakeClock:
    """Monotonic clock whose sleep advances time (optionally overshooting or waking early)."""

    def __init__(self, start=1000.0, overshoot=None, wake_fraction=1.0):
        self.t = start
        self.sleeps = []
        self._overshoot = overshoot or (lambda: 0.0)
        self._wake_fraction = wake_fraction

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        assert seconds > 0.0, "the keeper must not ask for a zero or negative sleep"
        self.sleeps.append(seconds)
        self.t += seconds * self._wake_fraction + self._overshoot()

    def work(self, seconds):
        self.t += seconds


def keeper_on(clock, **kw):
    return RateKeeper(PERIOD, clock=clock, sleep=clock.sleep, **kw)


def test_steady_ticks_have_zero_lag_and_start_on_the_grid():
    clock = FakeClock()
    keeper = keeper_on(clock)
    anchor = clock.t
    for k in range(1, 51):
        clock.work(0.03 + 0.001 * (k % 7))
        assert keeper.wait() is False
        assert keeper.lag_s == 0.0
        assert keeper.tick_start_s == pytest.approx(anchor + k * PERIOD, abs=1e-9)
    assert keeper.overruns == 0 and keeper.missed_deadlines == 0
    assert keeper.ticks == 50
    assert len(clock.sleeps) == 50  # one sleep per tick
    assert max(abs(v) for v in keeper.jitter_percentiles().values()) < 1e-9


def test_long_tick_skips_ahead_to_the_grid_without_bursting():
    clock = FakeClock(start=0.0)
    keeper = keeper_on(clock)
    clock.work(0.25)  # tick 0 should have ended at 0.1
    assert keeper.wait() is True
    assert keeper.lag_s == pytest.approx(0.15)
    assert keeper.missed_deadlines == 2  # no tick started at 0.1 or 0.2
    assert keeper.overruns == 1
    assert keeper.tick_start_s == pytest.approx(0.3)
    assert clock.sleeps == [pytest.approx(0.05)]  # waited for the grid, did not start at once
    # The next, normal tick keeps the grid and is not counted as an overrun.
    clock.work(0.03)
    assert keeper.wait() is False
    assert keeper.lag_s == 0.0
    assert keeper.tick_start_s == pytest.approx(0.4)
    assert keeper.overruns == 1 and keeper.missed_deadlines == 2
    assert keeper.max_lag_s == pytest.approx(0.15)


def test_tick_ending_exactly_on_its_deadline_is_not_an_overrun():
    clock = FakeClock(start=0.0)
    keeper = keeper_on(clock)
    clock.t = keeper.next_deadline_s
    assert keeper.wait() is False
    assert keeper.missed_deadlines == 0
    assert clock.sleeps == []  # nothing left to wait for


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 0.45), min_size=1, max_size=60))
def test_grid_accounting_holds_for_any_tick_durations(durations):
    clock = FakeClock(start=5.0)
    keeper = keeper_on(clock)
    anchor = clock.t
    starts = [clock.t]
    expected_overruns = 0
    for d in durations:
        deadline = keeper.next_deadline_s
        clock.work(d)
        overran = clock.t > deadline
        expected_overruns += overran
        assert keeper.wait() is overran
        starts.append(keeper.tick_start_s)
        index = (keeper.tick_start_s - anchor) / PERIOD
        assert index == pytest.approx(round(index), abs=1e-6)  # every tick starts on the grid
    gaps = np.diff(starts)
    assert np.all(gaps >= PERIOD - 1e-9)  # never two ticks back to back
    last_index = round((starts[-1] - anchor) / PERIOD)
    assert last_index == keeper.ticks + keeper.missed_deadlines
    assert keeper.overruns == expected_overruns


def test_no_drift_over_1000_ticks_with_sleep_overshoot():
    rng = random.Random(7)
    clock = FakeClock(start=0.0, overshoot=lambda: rng.uniform(0.0, 0.002))
    keeper = keeper_on(clock)
    for _ in range(1000):
        clock.work(rng.uniform(0.0, 0.09))
        keeper.wait()
    # Deadlines are absolute: 1000 ticks later the start is still within one overshoot of the
    # ideal time, where accumulated relative sleeps would be off by about a second.
    assert 1000 * PERIOD <= keeper.tick_start_s <= 1000 * PERIOD + 0.002
    assert keeper.missed_deadlines == 0 and keeper.overruns == 0
    pct = keeper.jitter_percentiles((0.0, 50.0, 100.0))
    assert 0.0 <= pct[0.0] <= pct[50.0] <= pct[100.0] <= 0.002
    assert pct[50.0] == pytest.approx(0.001, abs=0.0003)  # median of uniform(0, 2 ms)


def test_early_waking_sleep_is_repeated_until_the_deadline():
    clock = FakeClock(start=0.0, wake_fraction=0.5)
    keeper = keeper_on(clock)
    clock.work(0.02)
    keeper.wait()
    # Each sleep covers half the rest; the keeper re-sleeps, but only a bounded number of
    # times, so a clock that never reaches the deadline cannot hang the loop.
    assert len(clock.sleeps) == 8
    assert keeper.tick_start_s == pytest.approx(0.1 - 0.08 / 2**8)
    assert clock.sleeps[0] == pytest.approx(0.08) and clock.sleeps[1] == pytest.approx(0.04)


def test_remaining_s_is_the_slack_to_the_next_deadline():
    clock = FakeClock(start=0.0)
    keeper = keeper_on(clock)
    clock.work(0.03)
    assert keeper.remaining_s() == pytest.approx(0.07)
    clock.work(0.1)
    assert keeper.remaining_s() == pytest.approx(-0.03)


def test_jitter_ring_buffer_keeps_only_the_last_window():
    offsets = iter([0.05] * 12 + [0.001 * k for k in range(8)])
    clock = FakeClock(start=0.0, overshoot=lambda: next(offsets))
    keeper = keeper_on(clock, jitter_window=8)
    assert all(math.isnan(v) for v in keeper.jitter_percentiles().values())
    for _ in range(20):
        clock.work(0.01)
        keeper.wait()
    pct = keeper.jitter_percentiles((0.0, 50.0, 100.0))
    # The 12 early 50 ms offsets have been overwritten.
    assert pct[100.0] == pytest.approx(0.007, abs=1e-9)
    assert pct[0.0] == pytest.approx(0.0, abs=1e-9)
    assert pct[50.0] == pytest.approx(0.0035, abs=1e-9)
    assert "20 ticks" in keeper.summary()


def test_overrun_warnings_are_rate_limited(caplog):
    clock = FakeClock(start=0.0)
    keeper = keeper_on(clock, warn_interval_s=9.9)
    with caplog.at_level(logging.DEBUG, logger="edge.control.ratekeeper"):
        for _ in range(60):
            clock.work(0.13)  # every tick overruns and skips one deadline
            assert keeper.wait() is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # at t=0.13 and t=10.13, not 60
    assert "control loop overran" in warnings[0].getMessage()
    assert keeper.overruns == 60 and keeper.missed_deadlines == 60


def test_restart_reanchors_the_grid_and_clears_counters():
    clock = FakeClock(start=0.0)
    keeper = keeper_on(clock)
    clock.work(0.35)
    keeper.wait()
    clock.work(3.333)
    keeper.restart()
    assert keeper.overruns == 0 and keeper.ticks == 0 and keeper.missed_deadlines == 0
    assert keeper.next_deadline_s == pytest.approx(clock.t + PERIOD)


@pytest.mark.parametrize("bad", [0.0, -0.1, math.nan, math.inf, "0.1", True])
def test_invalid_period_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="period_s"):
        RateKeeper(bad)


def test_real_clock_ticks_never_start_before_their_deadline():
    keeper = RateKeeper(0.005)
    for _ in range(5):
        deadline = keeper.next_deadline_s
        keeper.wait()
        # time.sleep never returns early and monotonic never goes back: an ordering fact,
        # not a duration measurement.
        assert keeper.tick_start_s >= deadline
        assert time.monotonic() >= keeper.tick_start_s
    assert keeper.ticks == 5


def test_wait_does_not_grow_memory_per_tick():
    import tracemalloc

    clock = FakeClock(start=0.0)
    clock.sleep = lambda s: setattr(clock, "t", clock.t + s)  # no recording of sleeps here
    # One warning at most: pytest keeps every log record, which would look like growth.
    keeper = keeper_on(clock, jitter_window=64, warn_interval_s=1e9)
    tracemalloc.start()
    try:
        for k in range(100):  # fill the ring buffer and warm caches; the one warning is logged here
            clock.work(0.25 if k == 0 else 0.01)
            keeper.wait()
        before = tracemalloc.get_traced_memory()[0]
        for k in range(5000):
            clock.work(0.01 if k % 50 else 0.25)  # include overruns
            keeper.wait()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert keeper.overruns == 101
    assert grown < 16384  # one object kept per tick would be >= 80 KB
