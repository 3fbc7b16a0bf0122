"""The loop's one status snapshot and its stage timing, on the real parts (simulated controller on a pty,
its MJPEG camera, the reference bundle on ONNX Runtime), wired by edge.service.wiring as `vla-edge run`
wires them (tests/edge/control/closed_loop.py)."""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np
import pytest

from edge.control.status import TICK_STAGES, LoopStatus
from edge.io.camera import Camera
from edge.service.loop_control import status_reply
from tests.edge.control.closed_loop import closed_loop
from tests.waiting import HANG_GUARD_S


class StatusProbe:
    """The real camera; each read also asks the loop for its status, as another thread may mid-tick."""

    def __init__(self, camera: Camera):
        self.camera = camera
        self.loop = None
        self.seen: list[tuple[int, LoopStatus]] = []

    def read_into(self, out):
        if self.loop is not None:
            self.seen.append((self.loop.counters["ticks"], self.loop.status()))
        return self.camera.read_into(out)

    def __getattr__(self, name):
        return getattr(self.camera, name)


@pytest.fixture()
def rig(reference_bundle):
    # A calm gate: this is not about gating. The window is refreshed every 5 ticks to see it move.
    with closed_loop(reference_bundle[0], uncertainty={"threshold": 1.0, "hard_ceiling": 2.0},
                     wrap_camera=StatusProbe, window_refresh_ticks=5) as (controller, loop):
        loop.camera.loop = loop
        loop.set_instruction(controller.ground_truth().instruction)
        yield loop


def run_ticks(loop, ticks: int) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while loop.counters["ticks"] < ticks:
        assert time.monotonic() < deadline, f"the loop made {loop.counters['ticks']} ticks, not {ticks}"
        time.sleep(0.02)
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive()


def test_before_the_first_tick_the_snapshot_says_starting(rig):
    status = rig.status()
    assert status.mode == "starting" and status.tick is None and status.ticks == 0
    assert status.instruction is not None  # set before the loop ran, and visible at once


def test_a_reader_mid_tick_sees_the_last_completed_tick(rig):
    run_ticks(rig, 12)
    probes = rig.camera.seen
    assert len(probes) >= 12
    for started, status in probes:
        # `started` ticks were complete when tick number `started` began and read its camera.
        assert status.ticks == started
        assert (status.tick is None) if started == 0 else (status.tick.index == started - 1)
        assert status.counters["ticks"] == started


def test_the_loop_times_its_own_stages(rig):
    run_ticks(rig, 15)
    status = rig.status()
    tick = status.tick
    assert tick is not None and tick.mode == "nominal" and tick.samples == 8
    stages = tick.stages_ms
    assert set(stages) == set(TICK_STAGES)
    for name in ("observe", "resize", "vision", "head", "reduce", "gate", "safety", "send"):
        assert math.isfinite(stages[name]) and stages[name] >= 0, (name, stages)
    assert stages["h2d"] == 0 and stages["d2h"] == 0  # CPU backends copy nothing
    assert tick.policy_ms == pytest.approx(stages["resize"] + stages["vision"] + stages["head"] + stages["reduce"],
                                           rel=1e-4)
    assert tick.action is not None and len(tick.action) == len(tick.command)
    records = rig.recorder.latest()
    assert np.isfinite(records["observe_ms"]).all() and (records["send_ms"] >= 0).all()
    # The loop has stopped: the last snapshot's window covers every recorded tick.
    assert status.window.ticks == status.ticks == len(records)
    assert status.window.quantiles_ms["tick"][1.0] == pytest.approx(float(records["tick_ms"].max()), rel=1e-5)


def test_a_hold_tick_records_no_policy_stages(rig):
    rig.set_instruction(None)
    row = rig.tick()
    status = rig.status()
    assert status.mode == "hold" and status.tick.index == int(row["tick"]) and status.tick.samples == 0
    assert math.isnan(status.tick.stages_ms["vision"]) and math.isnan(status.tick.policy_ms)
    assert math.isfinite(status.tick.stages_ms["send"]) and status.tick.action is None


def test_an_estop_shows_in_the_snapshot_at_once_and_in_every_reader(rig):
    run_ticks(rig, 3)
    rig.emergency_stop()
    status = rig.status()
    assert status.mode == "estop" and status.estop
    reply = status_reply(status)
    assert reply["mode"] == "estop" and reply["estop"] is True
    assert status.line().startswith("estop | ")
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.mode = "nominal"  # readers cannot change what the others read


def test_the_latency_window_is_refreshed_while_the_loop_runs_not_only_at_its_end(rig):
    run_ticks(rig, 12)
    seen = [status.window.ticks for _, status in rig.camera.seen]
    # window_refresh_ticks is 5 here: readers mid-run saw windows that cover the ticks done so far.
    assert any(ticks >= 5 for ticks in seen[:-1]), seen
    assert seen == sorted(seen)  # a refreshed window never covers fewer ticks than the one before
