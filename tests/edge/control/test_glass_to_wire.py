"""Glass-to-wire latency in the status snapshot: the frame's capture time -> the command's bytes handed to
the link (from the tick record), and command -> the telemetry echoing it (the link's round trips)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge.control.status import LinkHealth, TickRecorder, Window
from edge.io.link_state import LinkState
from edge.io.messages import StatusFlags, Telemetry


def test_glass_to_wire_is_capture_to_command_written():
    recorder = TickRecorder(16, action_dim=2)
    for k in range(10):
        row = recorder.next()
        row["start_s"] = 10.0 + k * 0.1
        row["frame_time_s"] = row["start_s"] - 0.030 - 0.001 * k  # the frame was 30..39 ms old at tick start
        row["observe_ms"] = 1.0
        row["tick_ms"] = 14.0  # frame ready -> command written
    window = Window.of(recorder.latest())
    glass = window.quantiles_ms["glass_to_wire"]
    assert glass[0.5] == pytest.approx(30 + 4.5 + 1 + 14, abs=1e-3)
    assert glass[1.0] == pytest.approx(39 + 1 + 14, abs=1e-3)


def test_a_tick_without_a_frame_has_no_glass_to_wire():
    recorder = TickRecorder(4, action_dim=1)
    row = recorder.next()
    row["start_s"], row["frame_time_s"], row["observe_ms"], row["tick_ms"] = 1.0, np.nan, 1.0, 2.0
    assert math.isnan(Window.of(recorder.latest()).quantiles_ms["glass_to_wire"][0.5])


def test_round_trip_quantiles_of_the_link():
    state = LinkState()
    assert state.round_trip_quantiles_s() == {}
    for seq, trip in enumerate([0.004, 0.006, 0.005, 0.020]):
        state.sent(seq, 1.0 + seq)
        # The controller's telemetry echoing the command's seq, received `trip` seconds after it was sent.
        echo = Telemetry(seq=seq, controller_time_ms=1000 * (seq + 1), velocities=(0.0,), positions=(0.0,),
                         status=StatusFlags(0), last_command_seq=seq)
        state.receive([echo], 1.0 + seq + trip, n_bytes=32)
    quantiles = state.round_trip_quantiles_s()
    assert quantiles[0.5] == pytest.approx(0.006)
    assert quantiles[0.99] == pytest.approx(0.020)

    class Link:
        stats = state.stats
        is_connected = True
        last_round_trip_s = 0.020
        round_trip_quantiles_s = quantiles

        def telemetry_age_s(self):
            return 0.01

    health = LinkHealth.of(Link())
    assert health.round_trip_quantiles_s[0.99] == pytest.approx(0.020)
