"""SimulatedController from the host's side of a real pty (raw pyserial + the protocol), and its process."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from itertools import pairwise

import cv2
import numpy as np
import pytest
import serial
from cobs import cobs

from edge.control.controller_watch import REJECTION_TICKS, ControllerWatch
from edge.io.framing import seal
from edge.io.protocol import (
    Capabilities,
    ClearEmergencyStop,
    EmergencyStop,
    FaultCode,
    FrameDecoder,
    GetCapabilities,
    SequenceCounter,
    SetTargets,
    StatusFlags,
    Telemetry,
    encode,
)
from reference_world.expert import expert_action
from reference_world.world import WorldConfig
from simulator.channels import ChannelLayout
from simulator.controller import (
    FIRMWARE_VERSION,
    MOTOR_STOPPED_EPSILON,
    SimulatedController,
    _FreeRunningWorld,
)
from simulator.process import SimulatorConfig, SimulatorProcess
from tests.waiting import HANG_GUARD_S, wait_until


class RawHost:
    """A bare host: pyserial on the controller's stable path, frames built with edge.io.protocol."""

    def __init__(self, path: str) -> None:
        self.port = serial.Serial(path, timeout=0.02)
        self.decoder = FrameDecoder()
        self.seq = SequenceCounter(start=100)

    def send(self, message_or_bytes) -> int | None:
        if isinstance(message_or_bytes, bytes):
            self.port.write(message_or_bytes)
            return None
        self.port.write(encode(message_or_bytes))
        return message_or_bytes.seq

    def set_velocity(self, left: float, right: float) -> int:
        return self.send(SetTargets(seq=self.seq.next(), targets=(left, right)))

    def set_targets(self, targets, kinds) -> int:
        return self.send(SetTargets(seq=self.seq.next(), targets=tuple(targets), kinds=tuple(kinds)))

    def telemetry(self) -> list[Telemetry]:
        return [m for m in self.messages() if isinstance(m, Telemetry)]

    def messages(self) -> list:
        data = self.port.read(max(1, self.port.in_waiting))
        return self.decoder.feed(data)

    def capabilities(self, timeout_s: float = HANG_GUARD_S) -> Capabilities:
        seq = self.send(GetCapabilities(seq=self.seq.next()))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.messages():
                if isinstance(message, Capabilities):
                    return message
        raise AssertionError(f"no Capabilities in reply to GetCapabilities seq {seq}")

    def telemetry_until(self, predicate, timeout_s: float = HANG_GUARD_S) -> Telemetry:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for message in self.telemetry():
                seen += 1
                if predicate(message):
                    return message
        raise AssertionError(f"no matching telemetry in {timeout_s} s ({seen} frames seen)")

    def close(self) -> None:
        self.port.close()


@pytest.fixture
def controller():
    with SimulatedController(seed=2, target="green triangle") as sim:
        yield sim


@pytest.fixture
def host(controller):
    raw = RawHost(controller.link_path)
    yield raw
    raw.close()


def echoes(seq: int):
    return lambda t: t.last_command_seq == seq


def test_power_up_is_stopped_with_the_watchdog_tripped_and_telemetry_flows(controller, host):
    frames: list[Telemetry] = []
    host.telemetry_until(lambda t: frames.append(t) or len(frames) >= 6)
    assert all(StatusFlags.WATCHDOG_TRIPPED in t.status for t in frames)
    assert all(StatusFlags.MOTORS_ENABLED not in t.status for t in frames)
    assert all(t.last_command_seq == 0 and t.velocities == (0.0, 0.0) for t in frames)
    assert [b.seq - a.seq for a, b in pairwise(frames)] == [1] * 5  # consecutive, none lost
    assert all(b.controller_time_ms >= a.controller_time_ms for a, b in pairwise(frames))
    truth = controller.ground_truth()
    assert truth.watchdog_tripped and truth.motors_stopped and truth.plugged
    assert os.path.realpath(controller.link_path) == controller.port_path
    assert controller.port_path.startswith("/dev/pts/")


def test_set_targets_enables_motors_and_moves_the_wheels(controller, host):
    start = controller.ground_truth()

    def driving(t: Telemetry) -> bool:
        host.set_velocity(0.8, 0.4)
        return min(t.velocities) > 0.3

    moving = host.telemetry_until(driving)
    assert moving.status == StatusFlags.MOTORS_ENABLED
    assert moving.velocities[0] > moving.velocities[1]  # left faster than right, as commanded
    assert all(p > 0 for p in moving.positions) and moving.positions[0] > moving.positions[1]
    truth = controller.ground_truth()
    assert truth.applied_targets == (pytest.approx(0.8), pytest.approx(0.4))
    assert not truth.watchdog_tripped and not truth.motors_stopped
    assert truth.pose != start.pose and truth.physics_steps > start.physics_steps


def test_watchdog_stops_the_motors_after_commands_stop(controller, host):
    def driving(t: Telemetry) -> bool:
        host.set_velocity(0.7, 0.7)
        return min(t.velocities) > 0.4

    host.telemetry_until(driving)
    # Commands stop here; the controller must stop the motors on its own.
    tripped = host.telemetry_until(lambda t: StatusFlags.WATCHDOG_TRIPPED in t.status)
    assert StatusFlags.MOTORS_ENABLED not in tripped.status
    assert wait_until(lambda: controller.ground_truth().motors_stopped)
    truth = controller.ground_truth()
    assert truth.applied_targets == (0.0, 0.0)
    assert all(abs(v) < MOTOR_STOPPED_EPSILON for v in truth.wheel_velocities)
    # Measured on the simulator's own clock, with generous bounds: 300 ms watchdog, then motor decel.
    since_command = truth.watchdog_tripped_at_s - truth.last_valid_command_s
    assert 0.3 <= since_command < 0.6
    assert truth.motors_stopped_since_s - truth.last_valid_command_s < 1.5
    # The next valid SetTargets clears the trip.
    seq = host.set_velocity(0.2, 0.2)
    cleared = host.telemetry_until(echoes(seq))
    assert StatusFlags.WATCHDOG_TRIPPED not in cleared.status


def test_emergency_stop_latches_drops_commands_and_clear_waits_for_a_new_command(controller, host):
    host.set_velocity(0.5, 0.5)
    stop_seq = host.send(EmergencyStop(seq=host.seq.next()))
    latched = host.telemetry_until(echoes(stop_seq))
    assert StatusFlags.ESTOP_LATCHED in latched.status
    assert StatusFlags.MOTORS_ENABLED not in latched.status
    for _ in range(4):
        last = host.set_velocity(0.9, 0.9)
    still = host.telemetry_until(echoes(last))
    assert StatusFlags.ESTOP_LATCHED in still.status
    assert still.rejected_estop == 4 and still.rejected_fault == 0
    assert StatusFlags.WATCHDOG_TRIPPED not in still.status  # ignored commands still feed the watchdog
    host.send(EmergencyStop(seq=host.seq.next()))  # repeating it is harmless
    clear_seq = host.send(ClearEmergencyStop(seq=host.seq.next()))
    cleared = host.telemetry_until(echoes(clear_seq))
    assert StatusFlags.ESTOP_LATCHED not in cleared.status
    assert controller.ground_truth().applied_targets == (0.0, 0.0)  # stopped until the next SetTargets
    seq = host.set_velocity(0.3, -0.3)
    host.telemetry_until(echoes(seq))
    truth = controller.ground_truth()
    assert truth.applied_targets == (pytest.approx(0.3), pytest.approx(-0.3))
    assert truth.rejections["rejected_estop"] == 4 and not truth.estop_latched


def test_invalid_frames_are_counted_and_neither_applied_nor_echoed(controller, host):
    good = host.set_velocity(0.1, 0.1)
    host.telemetry_until(echoes(good))
    raw = bytearray(cobs.decode(encode(SetTargets(seq=500, targets=(0.9, 0.9)))[:-1]))
    raw[-1] ^= 0xFF
    host.send(cobs.encode(bytes(raw)) + b"\x00")  # bad CRC
    host.send(b"\x07\x01\x01\x00")  # bad COBS
    host.send(seal(0x01, 503, b"\x02\x00" + b"\x00\x00\x00\x3f" * 2, version=1))  # another protocol version
    host.send(encode(SetTargets(seq=501, targets=(0.9, 0.9, 0.9))))  # a channel count it does not have
    host.send(encode(SetTargets(seq=504, targets=(0.9, 0.9), kinds=("velocity", "position"))))  # a kind it lacks
    host.send(seal(0x01, 505, b"\x02\x00" + b"\x00\x00\xc0\x7f" * 2))  # NaN: out of range
    host.send(seal(0x01, 506, b"\x02\x00" + b"\x00\x00\x00\x40" * 2))  # velocity 2.0: out of range
    host.send(encode(Telemetry(seq=502, controller_time_ms=0, velocities=(), positions=(),
                               status=StatusFlags.NONE, last_command_seq=0)))  # wrong direction
    marker = host.set_velocity(0.2, 0.2)
    after = host.telemetry_until(echoes(marker))
    assert after.rejections == {"rejected_crc": 1, "rejected_framing": 3, "rejected_channel_count": 1,
                                "rejected_kind": 1, "rejected_range": 2, "rejected_estop": 0, "rejected_fault": 0}
    truth = controller.ground_truth()
    assert truth.rejections == after.rejections and truth.crc_errors == 1 and truth.framing_errors == 3
    assert truth.applied_targets == (pytest.approx(0.2), pytest.approx(0.2))  # 0.9 never applied


def test_stop_and_resume_telemetry(controller, host):
    host.telemetry_until(lambda t: True)
    controller.stop_telemetry()
    time.sleep(0.05)  # let a frame already in flight arrive
    host.telemetry()
    sent_before = controller.ground_truth().telemetry_sent
    seq = host.set_velocity(0.1, 0.1)  # still received and applied while silent
    assert wait_until(lambda: controller.ground_truth().last_command_seq == seq)
    assert controller.ground_truth().telemetry_sent == sent_before
    assert host.telemetry() == []
    controller.resume_telemetry()
    assert host.telemetry_until(echoes(seq)).seq >= 0


def test_bit_flips_and_garbage_reach_the_host_as_bad_frames(controller, host):
    host.telemetry_until(lambda t: True)
    controller.inject_garbage(200)
    controller.flip_bits(0.01)

    def rejected_enough() -> bool:
        host.telemetry()
        return host.decoder.stats.rejected >= 5

    assert wait_until(rejected_enough)
    controller.flip_bits(0.0)
    host.telemetry_until(lambda t: True)  # clean frames again
    with pytest.raises(ValueError):
        controller.flip_bits(1.5)
    with pytest.raises(ValueError):
        controller.inject_garbage(-1)


def test_unplug_removes_the_device_and_replug_publishes_a_new_pty_behind_the_same_link(controller, host):
    link = controller.link_path
    controller.unplug()
    assert not os.path.lexists(link)
    assert controller.port_path is None and not controller.ground_truth().plugged
    with pytest.raises(serial.SerialException):
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            host.port.read(1)  # the vanished device shows up as a failing read
    host.close()
    controller.replug()
    with pytest.raises(RuntimeError, match="already plugged"):
        controller.replug()
    assert controller.link_path == link and os.path.islink(link)
    assert os.path.realpath(link) == controller.port_path
    fresh = RawHost(link)
    try:
        seq = fresh.set_velocity(0.1, 0.1)
        assert fresh.telemetry_until(echoes(seq)).last_command_seq == seq
    finally:
        fresh.close()


def test_camera_serves_world_frames_and_can_freeze_and_die(controller):
    snapshot = controller.camera_url.replace("/stream.mjpg", "/snapshot.jpg")

    def fetch() -> bytes | None:
        try:
            with urllib.request.urlopen(snapshot, timeout=HANG_GUARD_S) as response:
                return response.read()
        except urllib.error.HTTPError:  # 503 until the first frame is encoded
            return None

    assert wait_until(lambda: fetch() is not None)
    image = cv2.imdecode(np.frombuffer(fetch(), np.uint8), cv2.IMREAD_COLOR)
    config = controller.world_config
    assert image.shape == (config.frame_height_px, config.frame_width_px, 3)
    assert image.std() > 5  # a scene, not a blank frame
    controller.freeze_camera()
    assert controller.ground_truth().camera_frozen
    controller.unfreeze_camera()
    controller.kill_camera()
    assert not controller.ground_truth().camera_running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(snapshot, timeout=HANG_GUARD_S)
    controller.revive_camera()
    assert wait_until(lambda: fetch() is not None)


def test_reset_episode_starts_a_new_episode_in_the_running_controller(controller):
    controller.reset_episode(5, target="yellow star", instruction="find the star")
    truth = controller.ground_truth()
    assert (truth.seed, truth.target, truth.instruction) == (5, "yellow star", "find the star")
    assert truth.physics_steps < 3  # counted from the reset (a step may have run since)
    assert not truth.success and truth.success_at_s is None
    with pytest.raises(ValueError):
        controller.reset_episode(5, target="purple cube")


def test_world_keeps_running_after_success_and_past_the_time_limit():
    world = _FreeRunningWorld(WorldConfig(time_limit_steps=1, pixel_noise_sigma=0.0))
    world.reset(4)
    for _ in range(300):
        world.step(expert_action(world))
        if world.success:
            break
    assert world.success and world.steps > 1  # past the time limit too
    steps = world.steps
    for _ in range(3):
        world.step([0.5, 0.5])  # TabletopWorld would raise here: the episode is "done"
    assert world.steps == steps + 3 and world.success


def test_constructor_validates():
    with pytest.raises(ValueError, match="telemetry_period_s"):
        SimulatedController(telemetry_period_s=0)
    with pytest.raises(ValueError):
        SimulatedController(target="nothing")
    with pytest.raises(ValueError, match="protocol_version"):
        SimulatedController(protocol_version=3)
    with pytest.raises(ValueError, match="velocity channels only"):
        SimulatedController(protocol_version=1, layout=ChannelLayout(kinds=("position",)))
    with pytest.raises(ValueError, match="kinds"):
        ChannelLayout(kinds=("torque",))
    with pytest.raises(ValueError, match="position_limits"):
        ChannelLayout(kinds=("position",), position_limits=((1.0, -1.0),))
    with pytest.raises(ValueError, match="time_constant_s"):
        ChannelLayout(time_constant_s=0.0)


# --- protocol v2: capabilities, position channels, rejection reasons, fault codes ----------------------


def test_capabilities_answer_get_capabilities_in_any_state(controller, host):
    caps = host.capabilities()
    assert caps.firmware_version == FIRMWARE_VERSION and caps.channel_count == 2
    assert [c.kinds for c in caps.channels] == [("velocity",), ("velocity",)]
    assert caps.watchdog_timeout_ms == 300 and caps.telemetry_period_ms == 20
    host.send(EmergencyStop(seq=host.seq.next()))
    controller.set_fault(True, code="ENCODER")
    again = host.capabilities()
    assert again.seq != caps.seq and again.channels == caps.channels  # constant while it runs
    echoed = host.telemetry_until(lambda t: StatusFlags.FAULT in t.status)
    assert echoed.last_command_seq == host.seq.peek() - 1  # GetCapabilities is echoed like any host frame
    assert not controller.ground_truth().last_valid_command_s  # ... but feeds no watchdog


ARM = ChannelLayout(kinds=("position", "position", "velocity"), position_limits=((-1.0, 1.0), (0.0, 0.08), (0, 0)),
                    time_constant_s=0.05, max_speed_per_s=2.0)


@pytest.fixture
def arm():
    with SimulatedController(seed=2, layout=ARM) as sim:
        yield sim


def test_position_channels_follow_a_first_order_servo_within_the_announced_limits(arm):
    host = RawHost(arm.link_path)
    try:
        caps = host.capabilities()
        assert [c.kinds for c in caps.channels] == [("position",), ("position",), ("velocity",)]
        assert [(c.position_min, c.position_max) for c in caps.channels[:2]] == [(-1.0, 1.0),
                                                                                 (0.0, pytest.approx(0.08))]
        kinds = ("position", "position", "velocity")
        samples = []

        def settled(t: Telemetry) -> bool:
            host.set_targets((0.5, 0.04, 0.25), kinds)
            samples.append(t)
            return abs(t.positions[0] - 0.5) < 1e-3 and abs(t.positions[1] - 0.04) < 1e-4
        final = host.telemetry_until(settled)
        # Monotonic approach, never past the target (first order, no overshoot), speed within +-1.
        joint = [t.positions[0] for t in samples]
        assert all(b >= a - 1e-6 for a, b in pairwise(joint)) and max(joint) <= 0.5 + 1e-6
        assert all(abs(v) <= 1.0 + 1e-6 for t in samples for v in t.velocities)
        assert final.velocities[2] == pytest.approx(0.25, abs=0.02)  # the velocity channel spins
        assert final.positions[2] > 0
        assert arm.ground_truth().applied_targets == (0.5, pytest.approx(0.04), 0.25)
        # Out of the announced range: rejected and counted, never applied.
        seq = host.set_targets((1.5, 0.04, 0.25), kinds)
        marker = host.set_targets((-0.25, 0.0, 0.0), kinds)
        after = host.telemetry_until(echoes(marker))
        assert after.rejected_range == 1 and seq != marker
        assert arm.ground_truth().applied_targets == (-0.25, 0.0, 0.0)  # 1.5 never applied
        back = host.telemetry_until(lambda t: host.set_targets((-0.25, 0.0, 0.0), kinds)
                                    and abs(t.positions[0] + 0.25) < 1e-3)
        assert back.rejected_range == 1
    finally:
        host.close()


def test_a_stop_holds_position_channels_where_they_are(arm):
    host = RawHost(arm.link_path)
    try:
        kinds = ("position", "position", "velocity")
        host.telemetry_until(lambda t: host.set_targets((0.6, 0.05, 0.5), kinds) and abs(t.positions[0] - 0.6) < 1e-3)
        host.send(EmergencyStop(seq=host.seq.next()))
        latched = host.telemetry_until(lambda t: StatusFlags.ESTOP_LATCHED in t.status)
        truth = arm.ground_truth()
        # Held, not sent to position 0; the velocity channel stops.
        assert truth.applied_targets[0] == pytest.approx(0.6, abs=1e-3) and truth.applied_targets[2] == 0.0
        assert truth.targets_zero_since_s is not None
        later = host.telemetry_until(lambda t: abs(t.velocities[2]) < 0.01)
        assert later.positions[0] == pytest.approx(latched.positions[0], abs=2e-3)
    finally:
        host.close()


def test_rejection_reasons_and_fault_codes_reach_the_watch_by_name(controller, host):
    watch = ControllerWatch(channels=2)
    results = []
    for _ in range(REJECTION_TICKS + 1):
        host.send(encode(SetTargets(seq=host.seq.next(), targets=(0.1,))))  # wrong channel count, every tick
        marker = host.send(GetCapabilities(seq=host.seq.next()))
        results.append(watch.observe(host.telemetry_until(echoes(marker)), estopped=False))
    assert watch.counters["rejected_channel_count"] == REJECTION_TICKS + 1
    assert results[-1] is not None and "channel_count" in results[-1]
    controller.set_fault(True, code="OVER_CURRENT")
    faulted = host.telemetry_until(lambda t: StatusFlags.FAULT in t.status)
    assert faulted.fault_code == FaultCode.OVER_CURRENT
    assert "FAULT OVER_CURRENT" in watch.observe(faulted, estopped=False)
    seq = host.set_velocity(0.3, 0.3)
    ignored = host.telemetry_until(echoes(seq))
    assert ignored.rejected_fault == 1 and controller.ground_truth().applied_targets == (0.0, 0.0)
    controller.set_fault(False)
    assert host.telemetry_until(lambda t: StatusFlags.FAULT not in t.status).fault_code == 0
    with pytest.raises(ValueError, match="fault code"):
        controller.set_fault(True, code="NONE")


def test_a_v1_controller_sends_v1_telemetry_and_drops_every_v2_frame():
    with SimulatedController(seed=2, protocol_version=1) as sim:
        host = RawHost(sim.link_path)
        try:
            host.set_velocity(0.5, 0.5)
            host.send(GetCapabilities(seq=host.seq.next()))
            deadline = time.monotonic() + HANG_GUARD_S
            while host.decoder.stats.version_errors < 5 and time.monotonic() < deadline:
                assert host.messages() == []  # nothing it sends is v2
            assert host.decoder.peer_version == 1 and host.decoder.stats.version_errors >= 5
            truth = sim.ground_truth()
            assert truth.last_valid_command_s is None and truth.applied_targets == (0.0, 0.0)
            assert truth.rejections["rejected_framing"] == 2
        finally:
            host.close()


# --- the process -------------------------------------------------------------------------------------


def ask(sock_file, request: str) -> dict:
    sock_file.write(request + "\n")
    sock_file.flush()
    return json.loads(sock_file.readline())


def test_module_prints_paths_serves_ground_truth_and_stops_on_sigterm(tmp_path):
    config = SimulatorConfig(seed=3, target="red block", ready_timeout_s=60.0)
    with SimulatorProcess(config, tmp_path / "simulator.log") as process:
        paths = asdict(process.paths)
        assert os.path.islink(paths["serial"])
        assert os.path.realpath(paths["serial"]) == paths["pty"]
        assert paths["camera_url"].startswith("http://127.0.0.1:")
        host, port = paths["ground_truth"].split(":")
        assert host == "127.0.0.1"
        raw = RawHost(paths["serial"])
        try:
            seq = raw.set_velocity(0.2, 0.2)
            raw.telemetry_until(echoes(seq))
        finally:
            raw.close()
        with socket.create_connection((host, int(port)), timeout=HANG_GUARD_S) as sock:
            sock_file = sock.makefile("rw")
            truth = ask(sock_file, "")["ground_truth"]
            assert truth["target"] == "red block" and truth["seed"] == 3
            assert truth["last_command_seq"] == seq
            assert ask(sock_file, json.dumps({"cmd": "unplug"}))["ok"]
            assert not os.path.lexists(paths["serial"])
            assert ask(sock_file, json.dumps({"cmd": "replug"}))["ok"]
            assert os.path.islink(paths["serial"])
            assert not ask(sock_file, json.dumps({"cmd": "format_disk"}))["ok"]
            assert not ask(sock_file, json.dumps({"cmd": "flip_bits", "args": {"probability": 2}}))["ok"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout_s=HANG_GUARD_S) == 0, process.log_tail()
        assert not os.path.lexists(paths["serial"])  # cleaned up on the way out
