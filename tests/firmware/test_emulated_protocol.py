"""The AVR image in simavr, spoken to directly over its pty with edge.io.protocol: the protocol as the
chip implements it, through its real UART, interrupts, timers, PWM and encoder inputs.

The reference image (two velocity wheels) and a variant built with channel 1 as a velocity-and-position
joint (``AVR_DEFS=-DBOARD_CHANNEL1_KINDS=0x03``), whose position loop closes through the runner's motor
and encoder model. Waits are hang guards; the values checked are the chip's.
"""

from __future__ import annotations

import math
import struct
import subprocess
import time

import numpy as np
import pytest
import serial

from edge.io.framing import seal
from edge.io.protocol import (
    POSITION,
    VELOCITY,
    Capabilities,
    FrameDecoder,
    GetCapabilities,
    MessageType,
    SequenceCounter,
    SetTargets,
    StatusFlags,
    Telemetry,
    encode,
)
from tests.firmware import build
from tests.firmware.emulator import PWM_TOP, AvrEmulator

COMMAND_PERIOD_S = 0.1  # the runtime's 10 Hz


def _has_simavr() -> bool:
    return subprocess.run(["pkg-config", "--exists", "simavr"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    missing = build.missing_tools("make", "cc", "avr-gcc", "avr-objcopy", "avr-size", "pkg-config")
    if missing or not _has_simavr():
        pytest.skip(f"the emulated firmware needs {', '.join(missing) or 'libsimavr-dev'} "
                    "(apt-get install gcc-avr avr-libc libsimavr-dev libelf-dev pkg-config)")
    out = tmp_path_factory.mktemp("sim")
    build.make("sim", out)
    return out / "sim" / "avr_pty_runner"


def image(tmp_path_factory, name: str, defs: str = "") -> str:
    out = tmp_path_factory.mktemp(name)
    build.make("avr", out, extra=[f"AVR_DEFS={defs}"] if defs else [])
    return out / "avr" / "vla_motor_controller.elf"


class Host:
    """A minimal host on the emulator's pty: sends frames, collects what the chip sends."""

    def __init__(self, port: str) -> None:
        self.serial = serial.Serial(port, timeout=0.02)
        self.decoder = FrameDecoder()
        self.seq = SequenceCounter(start=1)
        self.received: list = []
        self.serial.write(b"\x00")

    def send(self, frame: bytes) -> None:
        self.serial.write(frame)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.received += self.decoder.feed(self.serial.read(4096))

    def command(self, targets, kinds=None, seconds: float = 1.0) -> None:
        """SetTargets every 100 ms for `seconds`, as the runtime would."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.send(encode(SetTargets(seq=self.seq.next(), targets=tuple(targets), kinds=tuple(kinds or ()))))
            self.pump(COMMAND_PERIOD_S)

    def telemetry(self) -> list[Telemetry]:
        return [m for m in self.received if isinstance(m, Telemetry)]

    def capabilities(self) -> Capabilities:
        self.send(encode(GetCapabilities(seq=self.seq.next())))
        for _ in range(50):
            self.pump(0.02)
            found = [m for m in self.received if isinstance(m, Capabilities)]
            if found:
                return found[-1]
        raise AssertionError("the chip did not answer GetCapabilities within 1 s")

    def close(self) -> None:
        self.serial.close()


@pytest.fixture
def wheels(runner, tmp_path_factory, tmp_path):
    emulator = AvrEmulator(runner, image(tmp_path_factory, "wheels"), tmp_path / "avr.log").start()
    host = Host(emulator.port)
    yield emulator, host
    host.close()
    emulator.stop()


@pytest.fixture
def joint(runner, tmp_path_factory, tmp_path):
    elf = image(tmp_path_factory, "joint", "-DBOARD_CHANNEL1_KINDS=0x03")
    emulator = AvrEmulator(runner, elf, tmp_path / "avr.log").start()
    host = Host(emulator.port)
    yield emulator, host
    host.close()
    emulator.stop()


def test_the_chip_announces_itself_counts_bad_frames_and_keeps_its_telemetry_period(wheels):
    emulator, host = wheels
    caps = host.capabilities()
    assert [c.kinds for c in caps.channels] == [(VELOCITY,), (VELOCITY,)]
    assert (caps.watchdog_timeout_ms, caps.telemetry_period_ms, caps.firmware_version) == (300, 20, (1, 0, 0))
    good = encode(SetTargets(seq=99, targets=(0.1, 0.1)))
    bad = {
        "rejected_crc": good[:-3] + bytes([good[-3] ^ 0x01]) + good[-2:],
        "rejected_framing": seal(MessageType.SET_TARGETS, 98, b"\x02\x00" + struct.pack("<2f", 0.1, 0.1), version=1),
        "rejected_channel_count": encode(SetTargets(seq=97, targets=(0.1, 0.1, 0.1))),
        "rejected_kind": encode(SetTargets(seq=96, targets=(0.1, 0.1), kinds=(VELOCITY, POSITION))),
        "rejected_range": seal(MessageType.SET_TARGETS, 95, b"\x02\x00" + struct.pack("<2f", 0.1, math.nan)),
    }
    for frame in bad.values():
        host.send(frame)
        host.pump(0.05)
    host.pump(0.4)  # longer than the watchdog: none of them fed it
    last = host.telemetry()[-1]
    assert last.rejections == {**dict.fromkeys(last.rejections, 0), **dict.fromkeys(bad, 1)}
    assert last.status == StatusFlags.WATCHDOG_TRIPPED
    assert last.last_command_seq == 1  # the GetCapabilities: a dropped frame is never echoed
    assert all(s.stopped for s in emulator.snapshot()[0])
    times = [t.controller_time_ms for t in host.telemetry()[-10:]]
    assert all(b - a == 20 for a, b in zip(times, times[1:])), times
    seqs = [m.seq for m in host.received[-10:]]
    assert all((b - a) % 65536 == 1 for a, b in zip(seqs, seqs[1:])), seqs


def test_velocity_targets_become_pwm_and_the_encoders_report_the_speed(wheels):
    emulator, host = wheels
    host.command((0.5, -0.25), seconds=1.0)
    last = emulator.snapshot()[0][-1]
    assert last.compare == (round(0.5 * PWM_TOP), round(0.25 * PWM_TOP)) and last.duties[1] < 0
    telemetry = host.telemetry()[-1]
    assert telemetry.status == StatusFlags.MOTORS_ENABLED
    # The runner's motors: speed = duty. One sample's speed is a few encoder counts over one telemetry period
    # of emulated time, which slips against the wall clock on a loaded machine: judge the mean of the last ten.
    recent = np.array([t.velocities for t in host.telemetry()[-10:]])
    assert tuple(recent.mean(axis=0)) == pytest.approx((0.5, -0.25), abs=0.03)
    earlier = host.telemetry()[-11]
    assert telemetry.positions[0] > earlier.positions[0] and telemetry.positions[1] < earlier.positions[1]


def test_a_position_joint_reaches_its_target_and_holds_it_when_the_watchdog_trips(joint):
    emulator, host = joint
    caps = host.capabilities()
    assert caps.channels[1].kinds == (VELOCITY, POSITION)
    assert (caps.channels[1].position_min, caps.channels[1].position_max) == pytest.approx((-math.pi, math.pi))
    host.command((0.0, 1.0), (VELOCITY, POSITION), seconds=2.0)
    reached = host.telemetry()[-1]
    assert reached.status == StatusFlags.MOTORS_ENABLED
    assert reached.positions[1] == pytest.approx(1.0, abs=0.02)  # within a few encoder counts (4.4 mrad)
    host.send(seal(MessageType.SET_TARGETS, 500, b"\x02\x02" + struct.pack("<2f", 0.0, 4.0)))  # beyond pi
    host.pump(1.0)  # silence: the watchdog trips and the joint holds where it is
    after = host.telemetry()
    assert after[-1].status == StatusFlags.WATCHDOG_TRIPPED and after[-1].rejected_range == 1
    held = [t.positions[1] for t in after[-20:]]
    assert max(held) - min(held) < 0.02 and held[-1] == pytest.approx(1.0, abs=0.03)
