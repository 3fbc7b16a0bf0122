"""The chunk scheduler on its own: entry at the step matching the measured delay, ACT's temporal
ensembling, no extrapolation past a chunk's end, and its account."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge.control.chunks import ChunkConfig, ChunkScheduler, ensemble_weights
from edge.errors import ConfigError, InputError

PERIOD = 0.1
H, A = 8, 2


def chunk(base: float) -> np.ndarray:
    """Step k of this chunk is (base + k, -(base + k)): which step ran is readable from the action."""
    steps = base + np.arange(H, dtype=np.float32)
    return np.stack([steps, -steps], axis=1)


@pytest.mark.parametrize("delay_periods", [0, 1, 2, 3, 5])
def test_a_chunk_is_entered_at_the_step_matching_its_delay(delay_periods):
    scheduler = ChunkScheduler(H, A, PERIOD, replan_every=2)
    capture = 10.0
    arrival = capture + delay_periods * PERIOD
    scheduler.accept(chunk(0.0), capture, arrival)
    action = scheduler.action(arrival)
    assert action is not None and action[0] == pytest.approx(delay_periods)
    assert scheduler.entry_index == delay_periods
    assert scheduler.entry_delay_s == pytest.approx(delay_periods * PERIOD)
    # Later ticks follow the chunk's own time line, one step per period.
    assert scheduler.action(arrival + PERIOD)[0] == pytest.approx(delay_periods + 1)


def test_the_step_is_rounded_from_the_measured_time_not_counted_in_ticks():
    scheduler = ChunkScheduler(H, A, PERIOD)
    scheduler.accept(chunk(0.0), 0.0, 0.0)
    assert scheduler.action(0.04)[0] == 0  # 0.4 periods -> step 0
    assert scheduler.action(0.16)[0] == 2  # a late tick skips step 1: step k is meant for k * period
    assert scheduler.action(0.26)[0] == 3


def test_the_chunk_runs_out_and_nothing_is_extrapolated():
    scheduler = ChunkScheduler(H, A, PERIOD, replan_every=4)
    scheduler.accept(chunk(0.0), 0.0, 0.0)
    for k in range(H):
        assert scheduler.action(k * PERIOD)[0] == k
    assert scheduler.action(H * PERIOD) is None, "past the last step there is no action"
    assert scheduler.action((H + 1) * PERIOD) is None
    assert scheduler.empty_stops == 1 and scheduler.empty_ticks == 2
    assert scheduler.live_chunks == 0 and scheduler.step is None
    # A new chunk ends the stop; the next run-out counts as a second stop.
    scheduler.accept(chunk(100.0), 2.0, 2.0)
    assert scheduler.action(2.0)[0] == 100
    assert scheduler.action(2.0 + H * PERIOD) is None
    assert scheduler.empty_stops == 2


def test_the_newest_chunk_wins_without_ensembling():
    scheduler = ChunkScheduler(H, A, PERIOD, replan_every=2)
    scheduler.accept(chunk(0.0), 0.0, 0.05)
    assert scheduler.action(0.1)[0] == 1
    scheduler.accept(chunk(50.0), 0.2, 0.3)
    assert scheduler.action(0.3)[0] == 51  # the new chunk at its step 1, not the old one at step 3
    assert scheduler.live_chunks == 2 and scheduler.ensembled == 1


def test_a_chunk_older_than_the_horizon_is_dropped_as_late():
    scheduler = ChunkScheduler(H, A, PERIOD)
    scheduler.accept(chunk(0.0), 0.0, H * PERIOD + 0.01)
    assert scheduler.late_chunks == 1 and scheduler.replans == 1
    assert scheduler.action(H * PERIOD + 0.02) is None


def test_ensemble_weights_are_acts_exponential_oldest_first():
    weights = ensemble_weights(3, 0.5)
    expected = np.exp(-0.5 * np.arange(3))
    np.testing.assert_allclose(weights, expected / expected.sum())
    assert weights[0] > weights[1] > weights[2], "m > 0 favours the oldest chunk (i = 0)"
    np.testing.assert_allclose(ensemble_weights(4, 0.0), 0.25)


def test_overlapping_chunks_are_averaged_with_acts_weights():
    m = 0.3
    scheduler = ChunkScheduler(H, A, PERIOD, replan_every=2, temporal_ensemble=m)
    scheduler.accept(chunk(0.0), 0.0, 0.0)
    scheduler.accept(chunk(10.0), 0.2, 0.2)
    scheduler.accept(chunk(20.0), 0.4, 0.4)
    t = 0.5
    action = scheduler.action(t)
    # Each chunk votes with its own step for t: oldest at step 5, then step 3, the newest at step 1.
    votes = np.array([0.0 + 5, 10.0 + 3, 20.0 + 1])
    w = ensemble_weights(3, m)
    assert action[0] == pytest.approx(float(w @ votes), rel=1e-6)
    assert action[1] == pytest.approx(-float(w @ votes), rel=1e-6)
    assert scheduler.ensembled == 3
    assert scheduler.step == 1, "the step reported is the newest chunk's"


def test_clear_forgets_every_chunk():
    scheduler = ChunkScheduler(H, A, PERIOD)
    scheduler.accept(chunk(0.0), 0.0, 0.0)
    scheduler.clear()
    assert scheduler.action(0.1) is None


def test_stats_account_for_replans_entries_and_delays():
    scheduler = ChunkScheduler(H, A, PERIOD, replan_every=2)
    for i, delay in enumerate([1, 1, 2]):
        capture = i * 0.2
        scheduler.accept(chunk(0.0), capture, capture + delay * PERIOD)
        scheduler.action(capture + delay * PERIOD)
    stats = scheduler.stats(queue_depth=1, in_flight=True, replaced_requests=3, worker_errors=0)
    assert stats.replans == 3
    assert stats.replans_per_s == pytest.approx(2 / 0.5)  # 3 chunks accepted over 0.5 s
    assert stats.entries == {1: 2, 2: 1}
    assert stats.mean_delay_s[1] == pytest.approx(0.1) and stats.mean_delay_s[2] == pytest.approx(0.2)
    assert stats.entry_index == 2 and stats.queue_depth == 1 and stats.replaced_requests == 3


def test_bad_chunks_and_settings_are_refused_with_what_was_wrong():
    scheduler = ChunkScheduler(H, A, PERIOD)
    with pytest.raises(InputError, match=r"shape \(8, 2\)"):
        scheduler.accept(np.zeros((4, 2), np.float32), 0.0, 0.0)
    with pytest.raises(InputError, match="capture time"):
        scheduler.accept(chunk(0.0), math.nan, 0.0)
    with pytest.raises(InputError, match=r"replan_every must be in 1..8"):
        ChunkScheduler(H, A, PERIOD, replan_every=9)
    with pytest.raises(ConfigError, match="policy.replan_every"):
        ChunkConfig(replan_every=0)
    with pytest.raises(ConfigError, match="policy.temporal_ensemble"):
        ChunkConfig(temporal_ensemble=-1.0)


def test_replan_every_defaults_to_a_quarter_of_the_horizon():
    assert ChunkConfig().replan_ticks(16) == 4
    assert ChunkConfig().replan_ticks(3) == 1
    assert ChunkConfig().replan_ticks(1) == 1
    assert ChunkConfig(replan_every=5).replan_ticks(16) == 5
