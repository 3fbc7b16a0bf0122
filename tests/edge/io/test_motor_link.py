"""SerialMotorLink over real ptys, pyserial URL handlers and the simulated controller; no serial mocks."""

from __future__ import annotations

import os
import select
import socket
import termios
import time
import tty
from itertools import pairwise

import numpy as np
import pytest

from edge.errors import ConfigError, InputError, LinkError
from edge.io.motor_link import MotorLinkConfig, SentCommand, SerialMotorLink
from edge.io.protocol import (
    PROTOCOL_VERSION,
    Capabilities,
    ChannelCapability,
    FrameDecoder,
    GetCapabilities,
    MessageType,
    SetTargets,
    StatusFlags,
    Telemetry,
    crc16_ccitt_false,
    encode,
)
from simulator.channels import ChannelLayout
from simulator.controller import SimulatedController
from tests.waiting import HANG_GUARD_S, wait_until

FAST_BACKOFF = (0.02, 0.1)
WHEELS = Capabilities(seq=50, firmware_version=(2, 0, 0), channels=(ChannelCapability(("velocity",)),) * 2,
                      watchdog_timeout_ms=300, telemetry_period_ms=20)


def telemetry(seq: int, last_command_seq: int = 0, time_ms: int = 1000, status=StatusFlags.MOTORS_ENABLED):
    return Telemetry(seq=seq, controller_time_ms=time_ms, velocities=(0.25, -0.25), positions=(1.0, 2.0),
                     status=status, last_command_seq=last_command_seq)


class ScriptedController:
    """The device end of a real pty, driven by the test: it writes exact bytes and reads what the host sent."""

    def __init__(self) -> None:
        self.leader, self.follower = os.openpty()
        tty.setraw(self.follower)
        os.set_blocking(self.leader, False)
        self.path = os.ttyname(self.follower)
        self.decoder = FrameDecoder()
        self.raw = bytearray()

    def write(self, data: bytes) -> None:
        os.write(self.leader, data)

    def drain(self) -> None:
        while True:
            ready, _, _ = select.select([self.leader], [], [], 0)
            if not ready:
                return
            try:
                self.raw += os.read(self.leader, 65536)
            except BlockingIOError:
                return

    def received(self, count: int, skip: tuple[type, ...] = (GetCapabilities,)) -> list:
        """The next ``count`` frames the host sent, leaving out its repeated GetCapabilities."""
        messages: list = []

        def got_enough() -> bool:
            before = len(self.raw)
            self.drain()
            messages.extend(m for m in self.decoder.feed(bytes(self.raw[before:])) if not isinstance(m, skip))
            return len(messages) >= count

        assert wait_until(got_enough), f"host sent {len(messages)} frames, expected {count}"
        return messages

    def close(self) -> None:
        os.close(self.leader)
        os.close(self.follower)


class FakeClock:
    """Injected clock: the test decides what time the link sees."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def scripted():
    device = ScriptedController()
    yield device
    device.close()


@pytest.fixture
def controller():
    with SimulatedController(seed=1, target="blue ball") as sim:
        yield sim


def link_to(port: str, **overrides) -> SerialMotorLink:
    return SerialMotorLink(MotorLinkConfig(port=port, reconnect_backoff_s=FAST_BACKOFF, **overrides))


def answer(scripted: ScriptedController, link: SerialMotorLink, capabilities: Capabilities = WHEELS) -> None:
    """The scripted device announces its capabilities, as a controller answers GetCapabilities."""
    def armed() -> bool:
        scripted.write(encode(capabilities))
        return link.wait_for_capabilities(0.05) is not None

    assert wait_until(armed)


def armed(link: SerialMotorLink) -> SerialMotorLink:
    """A link to the simulated controller once its capabilities arrived."""
    assert link.wait_for_capabilities(HANG_GUARD_S) is not None
    return link


# --- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"port": ""}, "motor.port"),
        ({"baudrate": 0}, "motor.baudrate"),
        ({"baudrate": 115200.0}, "motor.baudrate"),
        ({"write_timeout_ms": 0}, "motor.write_timeout_ms"),
        ({"telemetry_stale_after_s": -1.0}, "motor.telemetry_stale_after_s"),
        ({"reconnect_backoff_s": (0.5,)}, "motor.reconnect_backoff_s"),
        ({"reconnect_backoff_s": (2.0, 1.0)}, "motor.reconnect_backoff_s"),
        ({"reconnect_backoff_s": (0.0, 1.0)}, "motor.reconnect_backoff_s[0]"),
        ({"exclusive": "yes"}, "motor.exclusive"),
        ({"low_latency": 1}, "motor.low_latency"),
        ({"channels": 0}, "motor.channels"),
        ({"channels": 9}, "motor.channels"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(overrides, key):
    values = {"port": "/dev/ttyUSB0", **overrides}
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        MotorLinkConfig(**values)


def test_config_accepts_yaml_lists_and_keeps_a_tuple():
    config = MotorLinkConfig(port="/dev/serial/by-id/usb-x", reconnect_backoff_s=[0.2, 1])
    assert config.reconnect_backoff_s == (0.2, 1.0)
    assert not config.is_url and MotorLinkConfig(port="socket://127.0.0.1:1").is_url


# --- opening -----------------------------------------------------------------------------------------


def test_missing_port_raises_link_error_with_by_id_and_dialout_hints(tmp_path):
    missing = str(tmp_path / "serial" / "by-id" / "usb-FTDI_nothing_here-if00-port0")
    link = link_to(missing)
    with pytest.raises(LinkError) as info:
        link.connect()
    message = str(info.value)
    assert missing in message
    assert "/dev/serial/by-id" in message
    assert "dialout" in message
    assert not link.is_connected
    link.disconnect()  # harmless on a link that never connected


def test_unknown_url_scheme_raises_link_error():
    with pytest.raises(LinkError, match="nosuchproto://"):
        link_to("nosuchproto://x").connect()


def test_second_exclusive_open_is_refused(scripted):
    with link_to(scripted.path):
        with pytest.raises(LinkError, match="another process holds the port"):
            link_to(scripted.path).connect()


def test_connect_twice_is_an_error(scripted):
    with link_to(scripted.path) as link:
        with pytest.raises(LinkError, match="already connected"):
            link.connect()


# --- loop:// -----------------------------------------------------------------------------------------


def test_loopback_url_echo_is_ignored_and_counted_not_fatal():
    with link_to("loop://") as link:
        assert link.is_connected
        # Our own GetCapabilities come back: ignored, and no controller ever answers them.
        assert wait_until(lambda: link.stats.ignored_frames >= 2)
        held = link.send_targets([0.1, -1.5])
        assert not held.delivered and held.kind is MessageType.SET_TARGETS
        assert "did not answer GetCapabilities" in link.command_problem()
        # What would be sent is what the wire would carry: clipped to [-1, 1] and rounded to float32.
        assert held.targets == (float(np.float32(0.1)), -1.0)
        stop = link.emergency_stop()  # an e-stop is never held back
        assert stop.delivered and stop.targets == ()
        assert wait_until(lambda: link.stats.ignored_frames >= 3)
        assert link.is_connected and link.capabilities is None
        assert link.latest_telemetry() == (None, -float("inf"))
        stats = link.stats
        assert stats.telemetry_frames == 0 and stats.bad_frames == 0 and stats.held_commands == 1
        assert link.last_round_trip_s is None
        assert not link.has_fresh_telemetry()


def test_bad_targets_raise_input_error_and_send_nothing():
    with link_to("loop://") as link:
        with pytest.raises(InputError, match="shape"):
            link.send_targets([0.1, 0.2, 0.3])
        with pytest.raises(InputError, match="finite"):
            link.send_targets([float("nan"), 0.0])
        with pytest.raises(InputError):
            link.send_targets(["fast", 0.0])
        assert link.stats.held_commands == 0


# --- socket:// ---------------------------------------------------------------------------------------


def test_socket_url_receives_telemetry_and_reconnects_after_the_peer_drops():
    """A controller behind a TCP serial bridge (ser2net style): pyserial's socket:// handler."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(HANG_GUARD_S)
    port = server.getsockname()[1]
    try:
        with link_to(f"socket://127.0.0.1:{port}") as link:
            peer, _ = server.accept()
            peer.sendall(encode(telemetry(seq=0)) + encode(telemetry(seq=1)))
            assert wait_until(lambda: link.stats.telemetry_frames == 2)
            peer.close()  # the bridge drops the connection
            assert wait_until(lambda: not link.is_connected)
            peer, _ = server.accept()  # the link dials again by itself
            with peer:
                assert wait_until(lambda: link.is_connected)
                peer.sendall(encode(telemetry(seq=7, last_command_seq=3)))
                assert wait_until(lambda: link.latest_telemetry()[0].seq == 7)
                assert link.stats.reconnects == 1 and link.stats.telemetry_lost == 0
    finally:
        server.close()


# --- scripted device on a real pty -------------------------------------------------------------------


def test_commands_reach_the_device_intact(scripted):
    with link_to(scripted.path) as link:
        asked = scripted.received(1, skip=())
        answer(scripted, link)
        sent = link.send_targets(np.array([0.5, -0.25], dtype=np.float32))
        stop = link.emergency_stop()
        clear = link.clear_emergency_stop()
        messages = scripted.received(3)
    assert scripted.raw[0] == 0  # leading delimiter flushes whatever partial frame the device held
    # Seq 1 first (issue 13, finding 20): the controller's last_command_seq 0 means "none yet".
    assert asked == [GetCapabilities(seq=1)]
    assert messages[0] == SetTargets(seq=sent.seq, targets=(0.5, -0.25))
    assert [type(m).__name__ for m in messages[1:]] == ["EmergencyStop", "ClearEmergencyStop"]
    assert [m.seq for m in messages] == [sent.seq, stop.seq, clear.seq]
    assert stop.seq == sent.seq + 1 and clear.seq == sent.seq + 2


def test_telemetry_stamps_round_trip_and_confirmation_use_the_injected_clock(scripted):
    clock = FakeClock(100.0)
    link = SerialMotorLink(MotorLinkConfig(port=scripted.path, reconnect_backoff_s=FAST_BACKOFF), clock=clock)
    with link:
        answer(scripted, link)
        first = link.send_targets([0.2, 0.2])
        second = link.send_targets([0.3, 0.3])
        assert first.sent_at_s == second.sent_at_s == 100.0
        clock.now = 100.25
        scripted.write(encode(telemetry(seq=0, last_command_seq=first.seq)))
        assert wait_until(lambda: link.latest_telemetry()[0] is not None)
        received, stamp = link.latest_telemetry()
        assert stamp == 100.25 and received.last_command_seq == first.seq
        assert received.velocities == (0.25, -0.25) and received.status == StatusFlags.MOTORS_ENABLED
        assert link.last_round_trip_s == pytest.approx(0.25)
        assert link.is_confirmed(first) and not link.is_confirmed(second)
        assert link.telemetry_age_s(now=100.45) == pytest.approx(0.2)
        assert link.has_fresh_telemetry(now=100.35) and not link.has_fresh_telemetry(now=100.45)  # 0.15 s default

        clock.now = 100.5
        scripted.write(encode(telemetry(seq=1, last_command_seq=second.seq)))
        assert wait_until(lambda: link.is_confirmed(second))
        assert link.last_round_trip_s == pytest.approx(0.5)
        undelivered = SentCommand(MessageType.SET_TARGETS, second.seq, (0.0, 0.0), 100.0, delivered=False)
        assert not link.is_confirmed(undelivered)


def test_lost_telemetry_and_controller_restart_are_counted(scripted):
    with link_to(scripted.path) as link:
        for seq, time_ms in ((0, 5000), (1, 5020), (4, 5080), (5, 40)):  # 2 lost, then clock goes back
            scripted.write(encode(telemetry(seq=seq, time_ms=time_ms)))
        assert wait_until(lambda: link.stats.telemetry_frames == 4)
        stats = link.stats
        assert stats.telemetry_lost == 2
        assert stats.controller_resets == 1
        assert link.latest_telemetry()[0].seq == 5


def corrupt_crc(frame: bytes) -> bytes:
    from cobs import cobs

    raw = bytearray(cobs.decode(frame[:-1]))
    raw[-1] ^= 0x01
    return cobs.encode(bytes(raw)) + b"\x00"


def frame_with_version(version: int) -> bytes:
    from cobs import cobs

    good = bytearray(cobs.decode(encode(telemetry(seq=9))[:-1]))[:-2]
    good[0] = version
    return cobs.encode(bytes(good) + crc16_ccitt_false(bytes(good)).to_bytes(2, "big")) + b"\x00"


def test_bad_frames_are_counted_and_never_stop_the_reader(scripted):
    assert PROTOCOL_VERSION != 7
    with link_to(scripted.path) as link:
        scripted.write(corrupt_crc(encode(telemetry(seq=0))))
        scripted.write(b"\x05\x01\x02\x00")  # COBS promises 4 bytes, delivers 2
        scripted.write(bytes(range(1, 200)) + b"\x00")  # longer than any frame
        scripted.write(frame_with_version(7))
        scripted.write(b"\x13\x37\xff")  # noise without a delimiter, glued to the next frame: it is lost
        scripted.write(encode(telemetry(seq=1)))
        scripted.write(encode(telemetry(seq=2)))
        assert wait_until(lambda: link.stats.telemetry_frames == 1)
        stats = link.stats
        # One each: bad CRC, bad COBS, oversized, wrong version, and the frame the noise spoiled
        # (which fails as framing or CRC depending on how the noise decodes).
        assert stats.bad_frames == 5
        assert stats.crc_errors >= 1 and stats.framing_errors >= 2 and stats.version_errors == 1
        assert link.is_connected
        assert link.latest_telemetry()[0].seq == 2


def test_write_timeouts_in_a_row_mark_the_link_down_then_it_reconnects(scripted):
    # Nobody reads the device end, so the pty's buffer fills and a write blocks past write_timeout_ms.
    # Issue 13 (finding 19) changed this: one timeout keeps the port; three in a row take the link down.
    link = link_to(scripted.path, write_timeout_ms=5)
    with link:
        answer(scripted, link)
        delivered = []
        for _ in range(200_000):
            delivered.append(link.send_targets([0.1, 0.1]).delivered)
            if not link.is_connected:
                break
        assert False in delivered, "the pty never pushed back; cannot test the write timeout"
        assert not link.is_connected, "timeouts went on, yet the port stayed open"
        # The pty may take a little more after a timeout, so a timeout can be followed by a success:
        # what takes the link down is the first run of three in a row, and only that.
        runs = "".join("." if d else "x" for d in delivered)
        assert runs.endswith("xxx") and "xxx" not in runs[:-1], runs[-40:]
        assert link.stats.write_failures == runs.count("x")
        assert not link.send_targets([0.0, 0.0]).delivered  # down: returns at once, nothing raised
        scripted.drain()  # the controller catches up
        scripted.raw.clear()
        assert wait_until(lambda: link.is_connected)
        answer(scripted, link)  # a reopened port asks again; the device answers
        assert wait_until(lambda: link.send_targets([0.4, 0.4]).delivered)
        stats = link.stats
        assert stats.reconnects >= 1 and stats.undelivered >= 1


@pytest.mark.parametrize("hangup_on_close", [True, False])
def test_hangup_on_close_decides_whether_closing_drops_dtr(scripted, hangup_on_close):
    # Issue 13, finding 19: a reopen toggles DTR, and an Arduino-style board resets on that edge. With
    # motor.hangup_on_close false the link clears HUPCL on the tty, so a close keeps DTR and RTS up.
    attrs = termios.tcgetattr(scripted.follower)
    attrs[2] |= termios.HUPCL
    termios.tcsetattr(scripted.follower, termios.TCSANOW, attrs)
    link = link_to(scripted.path, hangup_on_close=hangup_on_close)
    with link:
        answer(scripted, link)
        assert link.send_targets([0.1, 0.1]).delivered
        hupcl = bool(termios.tcgetattr(scripted.follower)[2] & termios.HUPCL)
    assert hupcl == hangup_on_close


def test_hangup_on_close_must_be_a_boolean():
    with pytest.raises(ConfigError, match="motor.hangup_on_close"):
        MotorLinkConfig(port="/dev/null", hangup_on_close="no")


def test_one_write_timeout_keeps_the_port_and_the_next_frame_starts_clean(scripted):
    # Finding 19: under shared-CPU load a single 20 ms timeout made the host drop and reopen the port.
    link = link_to(scripted.path, write_timeout_ms=5)
    with link:
        answer(scripted, link)
        for _ in range(200_000):
            if not link.send_targets([0.1, 0.1]).delivered:
                break
        else:
            pytest.fail("the pty never pushed back; cannot test the write timeout")
        scripted.drain()  # the controller catches up
        scripted.raw.clear()
        sent = link.send_targets([0.3, 0.3])
        assert sent.delivered and link.is_connected
        assert link.stats.reconnects == 0 and link.stats.write_failures == 1
        # The frame after a timeout starts with 0x00: whatever part of a frame went out is ended.
        def arrived() -> bool:
            scripted.drain()
            return any(isinstance(m, SetTargets) and m.seq == sent.seq
                       for m in FrameDecoder().feed(bytes(scripted.raw)))

        assert wait_until(arrived)
        assert scripted.raw[0] == 0


def test_disconnect_is_idempotent_and_sends_after_it_are_undelivered(scripted):
    link = link_to(scripted.path)
    link.connect()
    link.disconnect()
    link.disconnect()
    assert not link.is_connected
    assert not link.send_targets([0.1, 0.1]).delivered
    link.connect()  # a link can be connected again
    answer(scripted, link)
    assert link.send_targets([0.1, 0.1]).delivered
    link.disconnect()


# --- against the simulated controller ----------------------------------------------------------------


def test_round_trip_with_the_simulated_controller_moves_the_robot(controller):
    start = controller.ground_truth()
    assert start.watchdog_tripped and start.motors_stopped
    with link_to(controller.link_path) as link:
        armed(link)
        seen: list[Telemetry] = []
        sent = None

        def spinning() -> bool:
            nonlocal sent
            sent = link.send_targets([0.6, 0.6])
            assert sent.delivered
            time.sleep(0.02)
            telemetry_now, _ = link.latest_telemetry()
            if telemetry_now is not None and (not seen or telemetry_now.seq != seen[-1].seq):
                seen.append(telemetry_now)
            return telemetry_now is not None and min(telemetry_now.velocities) > 0.5

        assert wait_until(spinning)
        assert wait_until(lambda: link.latest_telemetry()[0].last_command_seq == sent.seq)
        latest, _ = link.latest_telemetry()
        assert latest.status == StatusFlags.MOTORS_ENABLED
        assert all(b.seq > a.seq for a, b in pairwise(seen))
        assert all(p > 0 for p in latest.positions)  # wheels turned forwards
        assert link.last_round_trip_s is not None and link.last_round_trip_s > 0
        assert link.stats.bad_frames == 0 and link.stats.telemetry_lost == 0 and link.stats.held_commands == 0
    moved = controller.ground_truth()
    assert moved.applied_targets == (pytest.approx(0.6), pytest.approx(0.6))
    assert np.hypot(moved.pose[0] - start.pose[0], moved.pose[1] - start.pose[1]) > 0.01


def test_emergency_stop_latches_until_cleared(controller):
    with link_to(controller.link_path) as link:
        armed(link)
        assert wait_until(lambda: link.send_targets([0.5, 0.5]) and controller.ground_truth().wheel_velocities[0] > 0.2)
        stop = link.emergency_stop()
        assert wait_until(lambda: link.is_confirmed(stop))
        assert wait_until(lambda: StatusFlags.ESTOP_LATCHED in link.latest_telemetry()[0].status)
        ignored = [link.send_targets([0.5, 0.5]) for _ in range(3)]
        assert wait_until(lambda: link.is_confirmed(ignored[-1]))
        latched, _ = link.latest_telemetry()
        assert latched.rejected_estop == 3 and latched.rejected_fault == 0
        assert StatusFlags.MOTORS_ENABLED not in latched.status
        assert controller.ground_truth().applied_targets == (0.0, 0.0)
        clear = link.clear_emergency_stop()
        assert wait_until(lambda: link.is_confirmed(clear))
        assert StatusFlags.ESTOP_LATCHED not in link.latest_telemetry()[0].status
        assert controller.ground_truth().applied_targets == (0.0, 0.0)  # stopped until the next command
        link.send_targets([0.3, 0.3])
        assert wait_until(lambda: controller.ground_truth().applied_targets == (pytest.approx(0.3),) * 2)


def test_garbage_and_bit_flips_are_survived_and_counted(controller):
    with link_to(controller.link_path) as link:
        assert wait_until(lambda: link.stats.telemetry_frames >= 3)
        for _ in range(5):
            controller.inject_garbage(300)
        controller.flip_bits(0.002)
        assert wait_until(lambda: link.stats.bad_frames >= 10)
        controller.flip_bits(0.0)
        assert link.is_connected
        before = link.stats.telemetry_frames
        assert wait_until(lambda: link.stats.telemetry_frames >= before + 5)  # valid telemetry still arrives
        armed(link)
        sent = link.send_targets([0.2, 0.2])
        assert wait_until(lambda: link.is_confirmed(sent))


def test_unplug_takes_the_link_down_and_replug_reconnects_via_the_stable_path(controller):
    with link_to(controller.link_path) as link:
        first = armed(link).send_targets([0.2, 0.2])
        assert wait_until(lambda: link.is_confirmed(first))
        controller.unplug()
        assert wait_until(lambda: not link.is_connected)
        down = link.send_targets([0.2, 0.2])
        assert not down.delivered
        controller.replug()
        assert os.path.realpath(controller.link_path) == controller.port_path
        assert wait_until(lambda: link.is_connected)
        after = armed(link).send_targets([0.2, 0.2])
        assert after.delivered and after.seq > down.seq
        assert wait_until(lambda: link.is_confirmed(after))
        stats = link.stats
        assert stats.disconnects == 1 and stats.reconnects == 1 and stats.undelivered >= 1


# --- capabilities (docs/serial-protocol.md, section 6a, rules 13-16) -----------------------------------


def test_a_reconnect_asks_for_capabilities_again(controller):
    with link_to(controller.link_path) as link:
        assert armed(link).capabilities.channel_count == 2
        assert link.stats.capabilities_frames == 1
        controller.unplug()
        assert wait_until(lambda: not link.is_connected)
        assert link.capabilities is None  # forgotten with the connection
        controller.replug()
        assert wait_until(lambda: link.capabilities is not None)
        assert link.stats.capabilities_frames == 2
        controller.restart_firmware()  # its clock goes back: asked again, it may have been reflashed
        assert wait_until(lambda: link.stats.capabilities_frames == 3)
        assert link.command_problem() is None and link.send_targets([0.1, 0.1]).delivered


def measured_position(link: SerialMotorLink, channel: int = 0) -> float:
    telemetry_now, _ = link.latest_telemetry()
    return float("nan") if telemetry_now is None else telemetry_now.positions[channel]


def test_targets_are_clipped_to_their_kind_and_the_announced_limits():
    kinds = ("position", "velocity", "position")
    layout = ChannelLayout(kinds=kinds, position_limits=((-1.5, 1.5), (0.0, 0.0), (0.0, 0.08)))
    with SimulatedController(seed=1, layout=layout) as sim:
        with link_to(sim.link_path, channels=3, kinds=kinds) as link:
            assert armed(link).capabilities.channels[2].position_max == pytest.approx(0.08)
            sent = link.send_targets([2.0, -3.0, 0.05])
            assert sent.delivered
            assert sent.targets == (1.5, -1.0, pytest.approx(0.05))
            assert wait_until(lambda: link.is_confirmed(sent))
            # The servo follows the clipped target (commanded on, as the loop does); nothing was rejected.
            assert wait_until(lambda: link.send_targets([2.0, -3.0, 0.05]).delivered
                              and abs(measured_position(link) - 1.5) < 1e-3)
            telemetry_now = link.latest_telemetry()[0]
            assert telemetry_now.rejected_range == 0 and telemetry_now.rejected_kind == 0
            low = link.send_targets([-9.0, 0.5, -1.0])
            assert low.targets == (-1.5, 0.5, 0.0)
            assert wait_until(lambda: sim.ground_truth().applied_targets == (-1.5, 0.5, 0.0))


def test_a_link_whose_kinds_the_controller_does_not_support_sends_nothing(controller):
    with link_to(controller.link_path, kinds=("velocity", "position")) as link:
        armed(link)
        held = link.send_targets([0.1, 0.1])
        assert not held.delivered and link.stats.held_commands == 1
        assert "channel 1 is commanded as position" in link.command_problem()
    assert controller.ground_truth().last_valid_command_s is None


def test_config_kinds_default_to_velocity_and_are_checked():
    assert MotorLinkConfig(port="/dev/ttyUSB0", channels=3).kinds == ("velocity",) * 3
    assert MotorLinkConfig(port="/p", channels=2, kinds=["position", "velocity"]).kinds == ("position", "velocity")
    with pytest.raises(ConfigError, match="motor.kinds"):
        MotorLinkConfig(port="/p", channels=2, kinds=("position",))
    with pytest.raises(ConfigError, match="motor.kinds"):
        MotorLinkConfig(port="/p", channels=1, kinds=("effort",))


def test_stop_targets_hold_position_channels_where_they_are():
    layout = ChannelLayout(kinds=("position", "velocity"), position_limits=((-2.0, 2.0), (0.0, 0.0)))
    with SimulatedController(seed=1, layout=layout) as sim:
        with link_to(sim.link_path, kinds=("position", "velocity")) as link:
            armed(link)
            assert wait_until(lambda: link.send_targets([0.75, 0.5]).delivered
                              and abs(measured_position(link) - 0.75) < 1e-3)
            stop = link.stop_targets()
            assert stop[0] == pytest.approx(0.75, abs=1e-3) and stop[1] == 0.0
    with link_to("loop://", kinds=("position", "velocity")) as link:
        with pytest.raises(InputError, match="no measured positions"):
            link.stop_targets()
