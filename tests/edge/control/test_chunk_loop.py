"""The loop executing chunks on a fake clock: the entry index follows an injected inference delay, an
empty chunk queue stops the robot within one period, the worker's bound and errors, several cameras,
language-free policies, proprio by the spec's sources and position channels that hold on a stop."""

from __future__ import annotations

import numpy as np
import pytest

from edge.control.chunks import ChunkConfig
from edge.control.loop import Mode
from edge.control.policy_worker import PolicyWorker
from edge.control.safety import SafetyReason
from edge.errors import ConfigError, EdgeError, InputError
from edge.service.loop_control import status_reply
from tests.edge.control.doubles import (
    PERIOD,
    ChunkPipeline,
    FakeCamera,
    FakeClock,
    FakeLink,
    make_loop,
    spec,
    wait_until,
)


def rig(policy_spec, *, hold=True, replan_every=None, ensemble=None, **options):
    clock = FakeClock()
    pipeline = ChunkPipeline(policy_spec, hold=hold)
    cameras = {c.name: FakeCamera(clock) for c in policy_spec.cameras}
    link = FakeLink(clock, policy_spec.action.dim)
    loop = make_loop(pipeline, cameras, link, clock,
                     chunk_config=ChunkConfig(replan_every=replan_every, temporal_ensemble=ensemble), **options)
    return clock, pipeline, cameras, link, loop


def tick(loop, clock):
    row = loop.tick().copy()
    clock.advance(PERIOD)
    return row


@pytest.mark.parametrize("delay_periods", [1, 2, 3])
def test_a_chunk_is_entered_at_the_step_matching_the_injected_inference_delay(delay_periods):
    clock, pipeline, _, _, loop = rig(spec(horizon=8), replan_every=8)
    try:
        first = tick(loop, clock)  # posts the request: frames captured now
        assert first["mode"] == Mode.FALLBACK, "nothing to execute before the first chunk: a stop"
        for _ in range(delay_periods - 1):
            assert tick(loop, clock)["mode"] == Mode.FALLBACK
        pipeline.release()  # the inference took `delay_periods` periods
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.completed == 1, "the worker never delivered the chunk")
        row = tick(loop, clock)
        assert row["mode"] == Mode.NOMINAL
        stats = loop.status().chunks
        assert stats.entry_index == delay_periods
        assert stats.entry_delay_s == pytest.approx(delay_periods * PERIOD)
        assert loop.status().tick.action == pytest.approx((pipeline.step_value(1, delay_periods),) * 2)
        assert row["command"] == pytest.approx(pipeline.step_value(1, delay_periods))  # within slew
        row = tick(loop, clock)
        assert loop.status().chunks.step == delay_periods + 1, "one step per period after the entry"
    finally:
        loop.close()


def test_an_empty_chunk_queue_stops_the_robot_within_one_period():
    horizon = 4
    clock, pipeline, _, link, loop = rig(spec(horizon=horizon), replan_every=horizon)
    try:
        tick(loop, clock)
        pipeline.release()
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.completed == 1, "no chunk")
        rows = [tick(loop, clock) for _ in range(horizon - 1)]  # steps 1..3 of the chunk
        assert all(r["mode"] == Mode.NOMINAL for r in rows) and np.abs(rows[-1]["command"]).max() > 0
        # The second inference (posted at tick 4) is held: the chunk's last step has passed.
        row = tick(loop, clock)
        assert row["mode"] == Mode.FALLBACK
        assert row["reasons"] & SafetyReason.FALLBACK
        assert not np.abs(row["command"]).any(), "zero at the first tick without a step (decel 10/s)"
        assert not np.abs(link.sent[-1]).any()
        stats = loop.status().chunks
        assert stats.empty_stops == 1 and stats.step is None
        assert loop.counters["chunk_empty"] == stats.empty_ticks == 2, "the tick before the first chunk and this"
        assert stats.in_flight or stats.queue_depth == 1, "the next chunk is still being computed"
    finally:
        pipeline.release()
        loop.close()


def test_the_gate_scores_the_part_that_will_be_executed():
    clock, pipeline, _, _, loop = rig(spec(horizon=8), replan_every=2)
    try:
        tick(loop, clock)
        tick(loop, clock)
        pipeline.release()
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.completed == 1, "no chunk")
        tick(loop, clock)  # entered at step 2
        assert pipeline.calls[0]["score_steps"] == 2  # no entry measured yet: the first replan_every steps
        tick(loop, clock)  # posts the next request
        wait_until(lambda: len(pipeline.calls) >= 2, "no second request")
        assert pipeline.calls[1]["score_steps"] == 2 + 2, "through the end of what will be executed"
    finally:
        for _ in range(3):
            pipeline.release()
        loop.close()


def test_an_inference_error_is_a_controlled_stop_and_the_loop_goes_on():
    clock, pipeline, _, _, loop = rig(spec(horizon=4), hold=False, replan_every=1)
    try:
        pipeline.fail = EdgeError("the head engine failed")
        tick(loop, clock)
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.errors == 1, "the error never reached the worker's account")
        row = tick(loop, clock)
        assert row["mode"] == Mode.FALLBACK and loop.counters["inference_errors"] == 1
        pipeline.wait_done()  # the next request runs
        wait_until(lambda: loop.chunks.worker.completed >= 1, "the worker stopped after an error")
        assert tick(loop, clock)["mode"] == Mode.NOMINAL
    finally:
        loop.close()


def test_an_unexpected_worker_exception_stops_the_robot_every_tick_and_never_kills_the_loop():
    clock, pipeline, _, _, loop = rig(spec(horizon=4), hold=False, replan_every=1)
    try:
        pipeline.fail = RuntimeError("segfault in a plugin")
        tick(loop, clock)
        pipeline.wait_done()
        wait_until(lambda: not loop.chunks.worker.alive, "the worker did not end")
        for _ in range(3):
            row = tick(loop, clock)
            assert row["mode"] == Mode.FALLBACK and not np.abs(row["command"]).any()
        assert "RuntimeError" in loop.chunks.worker.died
        assert loop.counters["inference_errors"] == 3
    finally:
        loop.close()


def test_the_request_queue_is_one_deep_and_a_newer_request_replaces_the_older():
    clock = FakeClock()
    pipeline = ChunkPipeline(spec(horizon=4), hold=True)
    worker = PolicyWorker(pipeline, [(8, 8, 3)], 2, 4, 2, clock=clock).start()
    try:
        frame = np.zeros((8, 8, 3), np.uint8)
        worker.post([frame], np.zeros(2, np.float32), None, 1.0)
        wait_until(lambda: worker.in_flight, "the worker never took the first request")
        for i in range(3):
            worker.post([frame + i + 1], np.full(2, i + 1, np.float32), None, 2.0 + i)
        assert worker.queue_depth == 1 and worker.replaced == 2
        pipeline.release()
        pipeline.release()
        pipeline.wait_done(2)
        wait_until(lambda: worker.completed == 2, "the queued request was not run")
        assert len(pipeline.calls) == 2, "the replaced requests never ran"
        assert pipeline.calls[1]["frames"][0].max() == 3 and pipeline.calls[1]["proprio"][0] == 3
        result = worker.take()
        assert result.capture_s == 4.0, "the newest request's capture time"
        assert worker.take() is None
    finally:
        pipeline.release()
        worker.close()


def test_replan_every_beyond_the_horizon_is_refused():
    with pytest.raises(ConfigError, match=r"policy.replan_every must be in 1..4"):
        rig(spec(horizon=4), replan_every=5)


def test_a_stale_camera_of_several_stops_the_robot_and_status_names_it():
    clock, pipeline, cameras, _, loop = rig(spec(horizon=1, cameras=("wrist", "top")), hold=False)
    assert loop.chunks is None, "H = 1 keeps the synchronous path"
    tick(loop, clock)
    row = tick(loop, clock)
    assert row["mode"] == Mode.NOMINAL
    assert [len(c["frames"]) for c in pipeline.calls] == [2, 2], "one frame per spec camera, in spec order"
    cameras["top"].fresh = False
    for _ in range(4):
        row = tick(loop, clock)
    assert row["mode"] == Mode.FALLBACK and row["reasons"] & SafetyReason.STALE_FRAME
    status = loop.status()
    assert status.stale_cameras == ("top",)
    assert "top" in status.line()


def test_a_camera_missing_for_a_spec_camera_is_refused_with_its_name():
    clock = FakeClock()
    policy = spec(horizon=1, cameras=("wrist", "top"))
    with pytest.raises(InputError, match="top"):
        make_loop(ChunkPipeline(policy), {"wrist": FakeCamera(clock)}, FakeLink(clock, 2), clock)


def test_a_language_free_policy_runs_without_an_instruction_and_say_is_refused():
    clock, pipeline, _, _, loop = rig(spec(horizon=1, language=False), hold=False)
    assert tick(loop, clock)["mode"] == Mode.NOMINAL
    assert pipeline.calls[-1]["language"] is None
    with pytest.raises(InputError, match="takes no instruction"):
        loop.set_instruction("go to the red block")
    loop.set_instruction(None)  # `vla-edge stop`: holds until resume
    assert tick(loop, clock)["mode"] == Mode.HOLD
    loop.resume()
    assert tick(loop, clock)["mode"] == Mode.NOMINAL
    assert "none needed" in loop.status().line()


def test_a_policy_with_language_holds_until_it_has_an_instruction():
    clock, pipeline, _, _, loop = rig(spec(horizon=1, language=True), hold=False)
    assert tick(loop, clock)["mode"] == Mode.HOLD and not pipeline.calls
    loop.set_instruction("go to the red block")
    assert tick(loop, clock)["mode"] == Mode.NOMINAL


def test_proprio_is_filled_by_the_specs_sources_not_forced_to_the_action_width():
    policy = spec(horizon=1, action=2, proprio=("positions[1]", "velocities[0]", "positions[0]"))
    clock, pipeline, _, link, loop = rig(policy, hold=False)
    link.velocities, link.positions = (0.25, -0.5), (1.5, 2.5)
    tick(loop, clock)
    np.testing.assert_allclose(pipeline.calls[-1]["proprio"], [2.5, 0.25, 1.5])


def test_position_channels_send_nothing_before_a_measured_position_and_hold_it_on_a_stop():
    policy = spec(horizon=4, action=2, kinds=("position", "velocity"), proprio=("positions[0]",))
    clock, pipeline, cameras, link, loop = rig(policy, hold=False, replan_every=4)
    try:
        link.telemetry_on = False
        tick(loop, clock)
        assert link.sent == [] and loop.counters["unsent_no_position"] == 1
        link.telemetry_on, link.positions = True, (0.7, 0.0)
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.completed >= 1, "no chunk")
        tick(loop, clock)
        assert link.sent, "commands once the position is known"
        cameras["front"].fresh = False  # a stop: the position channel holds its target, not 0
        for _ in range(5):
            row = tick(loop, clock)
        assert row["mode"] == Mode.FALLBACK
        held = link.sent[-1]
        assert held[0] == pytest.approx(link.sent[-2][0]) and held[0] != 0.0
        assert held[1] == 0.0, "the velocity channel stops"
    finally:
        loop.close()


def test_chunk_state_is_in_the_status_reply():
    clock, pipeline, _, _, loop = rig(spec(horizon=4), hold=False, replan_every=2)
    try:
        tick(loop, clock)
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.completed >= 1, "no chunk")
        tick(loop, clock)
        reply = status_reply(loop.status())
        chunks = reply["chunks"]
        assert chunks["replans"] == 1 and chunks["entry_index"] == 1 and chunks["horizon"] == 4
        assert set(chunks) >= {"queue_depth", "empty_stops", "replans_per_s", "entries", "step"}
        assert reply["stale_cameras"] == [] and reply["language"] is False
    finally:
        loop.close()


def test_chunk_state_and_stale_cameras_are_metrics():
    pytest.importorskip("prometheus_client")
    from edge.service.metrics import LoopCollector

    clock, pipeline, cameras, _, loop = rig(spec(horizon=4, cameras=("wrist", "top")), hold=False, replan_every=2)
    for camera in cameras.values():
        camera.frame_age_s = lambda: 0.0  # health fields of a real camera
        camera.is_connected = True
    try:
        tick(loop, clock)
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.completed >= 1, "no chunk")
        tick(loop, clock)
        cameras["top"].fresh = False
        for _ in range(4):
            tick(loop, clock)
        metrics = {m.name: m for m in LoopCollector(loop).collect()}
        replans = metrics["vla_edge_chunk_replans"].samples[0].value
        assert replans == loop.status().chunks.replans >= 1
        stats = loop.status().chunks
        assert metrics["vla_edge_chunk_entry_index"].samples[0].value == stats.entry_index
        entries = {s.labels["index"]: s.value for s in metrics["vla_edge_chunk_entries"].samples}
        assert entries == {str(k): float(v) for k, v in stats.entries.items()} and sum(entries.values()) == replans
        assert {s.labels["camera"]: s.value for s in metrics["vla_edge_camera_stale"].samples} == {"wrist": 0.0,
                                                                                                   "top": 1.0}
    finally:
        loop.close()


def test_an_uncertain_chunk_is_gated_for_the_ticks_that_execute_it():
    clock, pipeline, _, _, loop = rig(spec(horizon=4), hold=False, replan_every=4)
    try:
        pipeline.score = 5.0  # above the gate's hard ceiling (2.0)
        tick(loop, clock)
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.completed >= 1, "no chunk")
        rows = [tick(loop, clock) for _ in range(3)]
        assert [r["mode"] for r in rows] == [Mode.FALLBACK] * 3
        assert all(r["score"] == pytest.approx(5.0) for r in rows), "each tick shows the executed chunk's score"
        assert all(r["reasons"] & SafetyReason.FALLBACK for r in rows)
        assert loop.status().chunks.step is not None, "the chunk is there; the gate stops the robot"
    finally:
        loop.close()


def test_the_worker_starts_when_the_service_asks_or_on_the_first_running_tick():
    clock, _, _, _, loop = rig(spec(horizon=4), hold=False)
    try:
        assert not loop.chunks.worker.started, "a loop that never ran the policy owns no thread"
        loop.start_worker()
        assert loop.chunks.worker.alive
        loop.start_worker()  # once only
        assert tick(loop, clock)["mode"] == Mode.FALLBACK  # the first chunk is being computed
    finally:
        loop.close()
    assert not loop.chunks.worker.alive


def test_a_chunk_computed_across_a_stop_is_dropped_and_a_taken_chunk_is_a_copy():
    clock = FakeClock()
    pipeline = ChunkPipeline(spec(horizon=4), hold=True)
    worker = PolicyWorker(pipeline, [(8, 8, 3)], 2, 4, 2, clock=clock).start()
    try:
        frame = np.zeros((8, 8, 3), np.uint8)
        worker.post([frame], np.zeros(2, np.float32), None, 1.0)
        wait_until(lambda: worker.in_flight, "the worker never took the request")
        worker.discard()  # the loop stopped while the chunk was being computed
        pipeline.release()
        pipeline.wait_done()
        wait_until(lambda: not worker.in_flight, "the inference never ended")
        assert worker.take() is None and worker.completed == 0
        worker.post([frame], np.zeros(2, np.float32), None, 2.0)
        pipeline.release()
        pipeline.wait_done()
        wait_until(lambda: worker.completed == 1, "the next request was not run")
        taken = worker.take()
        kept = taken.actions.copy()
        worker.post([frame], np.zeros(2, np.float32), None, 3.0)
        pipeline.release()
        pipeline.wait_done()
        wait_until(lambda: worker.completed == 2, "the third request was not run")
        assert (taken.actions == kept).all(), "a finished chunk does not change the one the tick took"
    finally:
        pipeline.release()
        worker.close()


def test_vla_edge_status_shows_the_chunks_the_cameras_and_no_instruction_needed():
    from edge.cli.control import format_status

    clock, pipeline, cameras, _, loop = rig(spec(horizon=4, cameras=("wrist", "top")), hold=False, replan_every=2)
    for camera in cameras.values():
        camera.frame_age_s = lambda: 0.0
        camera.is_connected = True
    try:
        tick(loop, clock)
        pipeline.wait_done()
        wait_until(lambda: loop.chunks.worker.completed >= 1, "no chunk")
        tick(loop, clock)
        cameras["top"].fresh = False
        for _ in range(4):
            tick(loop, clock)
        stats = loop.status().chunks
        text = format_status({"ok": True, **status_reply(loop.status())})
    finally:
        loop.close()
    assert "none needed: the policy takes no instruction" in text
    assert "camera       wrist: connected" in text and "top: connected" in text and "STALE" in text
    assert f"chunks       H 4, replan every 2: {stats.replans} replans" in text
    assert f"entered at {stats.entry_index} after" in text and f"empty stops {stats.empty_stops}" in text
