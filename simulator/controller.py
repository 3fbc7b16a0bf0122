"""Simulated motor controller on a real pty, driving the reference world in real time.

It is the firmware of docs/serial-protocol.md running on the host: the runtime opens ``link_path``
(a stable symlink, like /dev/serial/by-id/...) with pyserial exactly as it opens a USB adapter, and
reads the camera from ``camera_url`` exactly as it reads an IP camera. Nothing else connects them.

Threads: one reads frames from the pty leader; one "firmware" tick checks the watchdog at least every
10 ms and sends telemetry at its period; one physics thread advances the world by its dt on absolute
monotonic deadlines (the world's motor lag and acceleration limit model the motors); the MJPEG server
has its own. ``ground_truth()`` and the fault hooks (garbage, bit flips, silence, unplug/replug, camera
freeze/kill, FAULT with a code) exist for tests and the demo only.

Channels (``layout``, simulator.channels): the reference robot's two velocity wheels by default, driven
through the world's physics; any other layout of velocity and position channels is simulated per
channel (a first-order servo for a position channel) while the world's robot stays still. The layout's
kinds and position limits are what Capabilities announce. ``protocol_version=1`` makes it a v1
controller: it sends v1 telemetry and drops every v2 host frame (for the host's v1 refusal).
"""

from __future__ import annotations

import logging
import math
import select
import struct
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from edge.io.framing import seal
from edge.io.protocol import (
    PROTOCOL_VERSION,
    REJECTION_COUNTERS,
    WATCHDOG_TIMEOUT_S,
    Capabilities,
    ClearEmergencyStop,
    EmergencyStop,
    FaultCode,
    FrameDecoder,
    GetCapabilities,
    Message,
    MessageType,
    SequenceCounter,
    SetTargets,
    StatusFlags,
    Telemetry,
    encode,
)
from reference_world.world import TabletopWorld, WorldConfig
from simulator.channels import ChannelLayout, ChannelModel
from simulator.mjpeg import MjpegServer
from simulator.pty_device import PtyDevice

logger = logging.getLogger(__name__)

CHANNELS = 2  # the reference robot: left and right wheel
FIRMWARE_VERSION = (2, 0, 0)  # announced in Capabilities
WHEEL_RADIUS_M = 0.03  # turns wheel speed (m/s) into the wheel angle reported as position (rad)
# |measured wheel velocity| (normalised) below which a wheel counts as stopped: 2 % of full speed.
MOTOR_STOPPED_EPSILON = 0.02
LINK_NAME = "usb-VLA_Edge_Simulated_Motor_Controller_SIM0001-if00-port0"  # the shape of a by-id name

_WATCHDOG_CHECK_PERIOD_S = 0.01  # the protocol asks for at least every 10 ms
_READ_POLL_S = 0.05  # bounds how long the reader takes to notice stop() or unplug()
_READ_CHUNK_BYTES = 4096
_JOIN_TIMEOUT_S = 5.0
_U16 = 0xFFFF
_DEFAULT_WORLD_CONFIG = WorldConfig()  # frozen, so one shared default is safe
_DEFAULT_LAYOUT = ChannelLayout()
# Protocol v1's telemetry (docs/serial-protocol.md, revision 1.0): time, status, last seq, crc, framing,
# dropped, n_vel, n_pos; then the floats. Only the v1 mode writes it.
_V1_TELEMETRY = struct.Struct("<IBHHHHBB")


class _FreeRunningWorld(TabletopWorld):
    """The world without an episode end: a controller keeps simulating after success or the time limit.

    ``TabletopWorld.step`` refuses to step a done episode (success or time limit), which suits an
    evaluation loop but not hardware, which keeps moving when commanded. ``success`` still latches the
    first time the robot reaches the target; the controller records when.
    """

    @property
    def done(self) -> bool:
        return False


@dataclass(frozen=True)
class GroundTruth:
    """What only the simulator knows. Times are time.monotonic() seconds; None where it never happened."""

    time_s: float
    seed: int
    target: str
    instruction: str
    variant: str | None
    pose: tuple[float, float, float]  # x (m), y (m), heading (rad)
    distance_to_target_m: float
    success: bool  # reached the target at least once this episode
    success_at_s: float | None
    physics_steps: int  # world steps this episode
    time_limit_reached: bool  # physics_steps >= world_config.time_limit_steps (the episode's budget)
    wheel_velocities: tuple[float, ...]  # measured, normalised as in telemetry, one per channel
    positions: tuple[float, ...]  # measured, one per channel (wheel angle in rad for a wheel)
    applied_targets: tuple[float, ...]
    targets_zero_since_s: float | None  # since when the applied targets are a stop (0, positions held)
    motors_stopped: bool  # every |wheel velocity| < MOTOR_STOPPED_EPSILON
    motors_stopped_since_s: float | None  # first physics step of the current stopped stretch
    watchdog_tripped: bool
    watchdog_tripped_at_s: float | None
    estop_latched: bool
    last_valid_command_s: float | None  # last valid SetTargets
    last_command_seq: int
    crc_errors: int  # rejections["rejected_crc"]
    framing_errors: int  # rejections["rejected_framing"]
    rejections: dict[str, int]  # Telemetry's seven per-reason counters
    fault_code: int
    telemetry_sent: int
    telemetry_unsent: int  # frames lost because nothing was listening (buffer full) or unplugged
    physics_overruns: int
    plugged: bool
    port_path: str | None
    camera_running: bool
    camera_frozen: bool
    camera_connections: int  # stream clients the camera has served since start (0: nothing opened it)

    def to_dict(self) -> dict:
        return asdict(self)


class SimulatedController:
    """The robot's motor controller and camera, simulated: ``start()``, use ``link_path``, ``stop()``."""

    def __init__(
        self,
        world_config: WorldConfig = _DEFAULT_WORLD_CONFIG,
        seed: int = 0,
        instruction: str | None = None,
        target: str | None = None,
        variant: str | None = None,
        camera_fps: float = 10.0,
        telemetry_period_s: float = 0.02,
        watchdog_timeout_s: float = WATCHDOG_TIMEOUT_S,
        *,
        camera_host: str = "127.0.0.1",
        camera_port: int = 0,
        fault_seed: int = 0,
        layout: ChannelLayout = _DEFAULT_LAYOUT,
        protocol_version: int = PROTOCOL_VERSION,
    ) -> None:
        for name, value in (("camera_fps", camera_fps), ("telemetry_period_s", telemetry_period_s),
                            ("watchdog_timeout_s", watchdog_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if protocol_version not in (1, PROTOCOL_VERSION):
            raise ValueError(f"protocol_version must be 1 or {PROTOCOL_VERSION}, got {protocol_version!r}")
        if protocol_version == 1 and not layout.is_reference_robot:
            raise ValueError("protocol_version 1 has velocity channels only; use the default layout")
        self._layout = layout
        self._channels = ChannelModel(layout)  # used when the layout is not the reference robot
        self._protocol_version = protocol_version
        self._world_config = world_config
        self._telemetry_period_s = float(telemetry_period_s)
        self._watchdog_timeout_s = float(watchdog_timeout_s)
        self._world = _FreeRunningWorld(world_config)
        # Lock order: _world_lock, then _state_lock; never the other way round.
        self._world_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._fault_lock = threading.Lock()  # guards the fault generator and the bit-flip probability
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._rng = np.random.default_rng(fault_seed)  # garbage and bit flips, repeatable per run

        self._pty = PtyDevice(LINK_NAME)  # the "USB adapter"
        self._flip_probability = 0.0

        # firmware state, under _state_lock
        self._boot_s = time.monotonic()
        self._targets: tuple[float, ...] = layout.stop_targets(self._channels.positions)
        self._targets_zero_since_s: float | None = self._boot_s  # when the applied targets last became zero
        self._watchdog_tripped = True  # power-up behaves as if the watchdog had tripped
        self._watchdog_tripped_at_s: float | None = self._boot_s
        self._estop_latched = False
        self._fault = False  # set by set_fault(): the controller's own verdict (driver, over-current)
        self._fault_code = FaultCode.NONE
        self._drop_host_frames: dict[type, int] = {}
        self._reported: tuple[tuple[float, ...] | None, tuple[float, ...] | None] = (None, None)  # report()  # drop_next(): host frames of a type lost on the line
        self._last_valid_command_s: float | None = None
        self._last_command_seq = 0
        self._rejections = dict.fromkeys(REJECTION_COUNTERS, 0)  # each wraps at 2**16
        self._telemetry_enabled = True
        self._telemetry_sent = 0
        self._telemetry_unsent = 0
        self._tx_seq = SequenceCounter()

        # world snapshot, under _state_lock (written by the physics thread, read by everyone else)
        self._physics_overruns = 0
        self._reset_world_locked(seed, target, instruction, variant)

        self._camera = MjpegServer(self._camera_frame, fps=camera_fps, host=camera_host, port=camera_port)

    # lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> SimulatedController:
        if self._started:
            raise RuntimeError("SimulatedController already started")
        self._stop.clear()
        self._pty.open()
        try:
            self._camera.start()
        except OSError:  # e.g. the camera port taken: leave nothing behind
            self._pty.close()
            raise
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._read_loop,), name="sim-controller-rx", daemon=True),
            threading.Thread(target=self._guarded, args=(self._firmware_loop,), name="sim-controller-fw",
                             daemon=True),
            threading.Thread(target=self._guarded, args=(self._physics_loop,), name="sim-controller-physics",
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._started = True
        logger.info("simulated motor controller on %s -> %s, camera at %s", self.link_path, self.port_path,
                    self.camera_url)
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=_JOIN_TIMEOUT_S)
            if thread.is_alive():
                logger.error("simulator thread %s did not exit within %.1f s", thread.name, _JOIN_TIMEOUT_S)
        self._threads = []
        self._camera.stop()
        self._pty.close()
        self._started = False
        logger.info("simulated motor controller stopped")

    def __enter__(self) -> SimulatedController:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # where to connect ----------------------------------------------------------------------------------
    @property
    def port_path(self) -> str | None:
        """The current pty (e.g. /dev/pts/7); changes on every replug; None while unplugged."""
        return self._pty.port_path

    @property
    def link_path(self) -> str:
        """Stable symlink to the current pty, as /dev/serial/by-id/...; absent while unplugged."""
        return self._pty.link_path

    @property
    def camera_url(self) -> str:
        return self._camera.url

    @property
    def world_config(self) -> WorldConfig:
        return self._world_config

    # ground truth --------------------------------------------------------------------------------------
    def ground_truth(self) -> GroundTruth:
        plugged, port_path = self._pty.plugged, self._pty.port_path
        with self._state_lock:
            return GroundTruth(
                time_s=time.monotonic(),
                seed=self._seed,
                target=self._target,
                instruction=self._instruction,
                variant=self._variant,
                pose=self._pose,
                distance_to_target_m=self._distance_m,
                success=self._success_at_s is not None,
                success_at_s=self._success_at_s,
                physics_steps=self._physics_steps,
                time_limit_reached=self._physics_steps >= self._world_config.time_limit_steps,
                wheel_velocities=self._measured,
                positions=self._positions,
                applied_targets=self._targets,
                targets_zero_since_s=self._targets_zero_since_s,
                motors_stopped=self._stopped_since_s is not None,
                motors_stopped_since_s=self._stopped_since_s,
                watchdog_tripped=self._watchdog_tripped,
                watchdog_tripped_at_s=self._watchdog_tripped_at_s if self._watchdog_tripped else None,
                estop_latched=self._estop_latched,
                last_valid_command_s=self._last_valid_command_s,
                last_command_seq=self._last_command_seq,
                crc_errors=self._rejections["rejected_crc"],
                framing_errors=self._rejections["rejected_framing"],
                rejections=dict(self._rejections),
                fault_code=int(self._fault_code),
                telemetry_sent=self._telemetry_sent,
                telemetry_unsent=self._telemetry_unsent,
                physics_overruns=self._physics_overruns,
                plugged=plugged,
                port_path=port_path,
                camera_running=self._camera.is_running,
                camera_frozen=self._camera.is_paused,
                camera_connections=self._camera.connections,
            )

    def reset_episode(
        self,
        seed: int,
        target: str | None = None,
        instruction: str | None = None,
        variant: str | None = None,
    ) -> None:
        """New episode in the same running controller; firmware state (latch, watchdog) is untouched."""
        with self._world_lock:
            self._reset_world_locked(seed, target, instruction, variant)

    # fault injection -----------------------------------------------------------------------------------
    def inject_garbage(self, n_bytes: int) -> None:
        """Write ``n_bytes`` random bytes (zeros included) to the host between two frames."""
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise ValueError(f"n_bytes must be a non-negative integer, got {n_bytes!r}")
        with self._fault_lock:
            garbage = self._rng.integers(0, 256, size=n_bytes, dtype=np.uint8).tobytes()
        self._pty.write(garbage)

    def flip_bits(self, probability: float) -> None:
        """Flip each bit of outgoing telemetry with ``probability`` (0 turns the fault off)."""
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not (
            0.0 <= probability <= 1.0
        ):
            raise ValueError(f"probability must be in [0, 1], got {probability!r}")
        with self._fault_lock:
            self._flip_probability = float(probability)

    def set_fault(self, on: bool = True, code: str = "DRIVER") -> None:
        """Raise (or clear) FAULT with ``code`` (a FaultCode name): motors disabled, SetTargets ignored and
        counted in rejected_fault while it is set (docs/serial-protocol.md, section 6, "Fault")."""
        if on and (code not in FaultCode.__members__ or code == "NONE"):
            raise ValueError(f"code must be a fault code name other than NONE, got {code!r}")
        with self._state_lock:
            self._fault = bool(on)
            self._fault_code = FaultCode[code] if on else FaultCode.NONE
            if on:
                self._stop_locked()
        logger.info("controller FAULT %s", f"raised ({code})" if on else "cleared")

    def drop_next(self, kind: str, count: int = 1) -> None:
        """Lose the next ``count`` host frames of ``kind`` (set_targets, emergency_stop,
        clear_emergency_stop, get_capabilities) on the line: the controller never sees them."""
        types = {"set_targets": SetTargets, "emergency_stop": EmergencyStop,
                 "clear_emergency_stop": ClearEmergencyStop, "get_capabilities": GetCapabilities}
        if kind not in types:
            raise ValueError(f"kind must be one of {', '.join(types)}, got {kind!r}")
        with self._state_lock:
            self._drop_host_frames[types[kind]] = self._drop_host_frames.get(types[kind], 0) + int(count)

    def report(self, velocities: list[float] | None = None, positions: list[float] | None = None) -> None:
        """Send these velocities / positions in telemetry instead of the measured ones (a broken encoder, a
        firmware with another channel count); None for both goes back to the measurements."""
        with self._state_lock:
            self._reported = (None if velocities is None else tuple(float(v) for v in velocities),
                              None if positions is None else tuple(float(p) for p in positions))

    def restart_firmware(self) -> None:
        """The controller resets: its clock starts again from 0, the volatile latch and fault are gone, and
        it comes up as if its watchdog had tripped (motors stopped)."""
        with self._state_lock:
            now = time.monotonic()
            self._boot_s = now
            self._estop_latched = False
            self._fault = False
            self._fault_code = FaultCode.NONE
            self._watchdog_tripped = True
            self._watchdog_tripped_at_s = now
            self._last_valid_command_s = None
            self._rejections = dict.fromkeys(REJECTION_COUNTERS, 0)
            self._stop_locked()
        logger.info("controller firmware restarted")

    def stop_telemetry(self) -> None:
        """Go silent towards the host (a hung controller); commands are still received and applied."""
        with self._state_lock:
            self._telemetry_enabled = False

    def resume_telemetry(self) -> None:
        with self._state_lock:
            self._telemetry_enabled = True

    def unplug(self) -> None:
        """The adapter vanishes: the pty closes (the host's reads and writes fail) and the symlink goes."""
        self._pty.unplug()
        logger.info("simulated controller unplugged")

    def replug(self) -> None:
        """The adapter comes back as a new pty; ``link_path`` now points at it (``port_path`` changes)."""
        self._pty.plug()
        logger.info("simulated controller replugged at %s", self.port_path)

    def freeze_camera(self) -> None:
        """The stream stays connected but delivers no new frames."""
        self._camera.pause()

    def unfreeze_camera(self) -> None:
        self._camera.resume()

    def kill_camera(self) -> None:
        """The camera loses power: every client is dropped and connections are refused."""
        self._camera.stop()

    def revive_camera(self) -> None:
        """The camera comes back on the same URL."""
        if not self._camera.is_running:
            self._camera.start()

    # threads -------------------------------------------------------------------------------------------
    def _guarded(self, loop) -> None:
        try:
            loop()
        except Exception:  # a dead thread would freeze the simulated robot silently; make it loud
            logger.exception("simulator thread %s crashed; the simulated robot is no longer live",
                             threading.current_thread().name)

    def _read_loop(self) -> None:
        decoder: FrameDecoder | None = None
        generation = -1
        seen = None
        while not self._stop.is_set():
            fd, current = self._pty.current()
            if fd is None:
                self._stop.wait(_READ_POLL_S)
                continue
            if current != generation:
                # A new "cable": nothing of a frame in flight on the old one survives.
                decoder, generation = FrameDecoder(), current
                seen = decoder.stats
            try:
                ready, _, _ = select.select([fd], [], [], _READ_POLL_S)
            except (OSError, ValueError):
                continue  # unplug() closed the fd while we waited; the generation check catches it
            if not ready:
                continue
            data = self._pty.read(generation, _READ_CHUNK_BYTES)
            if data is None:
                continue  # replugged meanwhile, or nothing there after all
            if not data:
                self._stop.wait(_READ_POLL_S)  # select said readable but nothing came: do not spin
                continue
            assert decoder is not None and seen is not None
            messages = decoder.feed(data)
            stats = decoder.stats
            crc = stats.crc_errors - seen.crc_errors
            out_of_range = stats.range_errors - seen.range_errors
            self._count_rejections(rejected_crc=crc, rejected_range=out_of_range,
                                   rejected_framing=stats.rejected - seen.rejected - crc - out_of_range)
            if self._protocol_version == PROTOCOL_VERSION:
                self._apply(messages)
            else:  # a v1 controller drops every v2 frame at its version check
                self._count_rejections(rejected_framing=len(messages))
            seen = stats

    def _count_rejections(self, **counts: int) -> None:
        with self._state_lock:
            for name, count in counts.items():
                self._count_locked(name, count)

    def _count_locked(self, name: str, count: int = 1) -> None:
        self._rejections[name] = (self._rejections[name] + count) & _U16

    def _apply(self, messages: list[Message]) -> None:
        now = time.monotonic()
        replies = []
        with self._state_lock:
            for message in messages:
                if self._drop_host_frames.get(type(message), 0) > 0:
                    self._drop_host_frames[type(message)] -= 1
                    continue  # lost on the line (drop_next)
                if isinstance(message, SetTargets):
                    rejection = self._layout.rejection(message)
                    if rejection is not None:  # dropped: not echoed, does not feed the watchdog
                        self._count_locked(rejection)
                        continue
                    self._last_command_seq = message.seq
                    self._last_valid_command_s = now
                    if self._watchdog_tripped:
                        self._watchdog_tripped = False
                        logger.info("watchdog cleared by SetTargets seq %d", message.seq)
                    if self._estop_latched:
                        self._count_locked("rejected_estop")
                    elif self._fault:
                        self._count_locked("rejected_fault")
                    else:
                        self._set_targets_locked(tuple(message.targets))
                elif isinstance(message, EmergencyStop):
                    self._last_command_seq = message.seq
                    if not self._estop_latched:
                        logger.info("emergency stop latched (seq %d)", message.seq)
                    self._estop_latched = True
                    self._stop_locked()
                elif isinstance(message, ClearEmergencyStop):
                    self._last_command_seq = message.seq
                    if self._estop_latched:
                        logger.info("emergency stop cleared (seq %d)", message.seq)
                    self._estop_latched = False
                elif isinstance(message, GetCapabilities):
                    self._last_command_seq = message.seq
                    replies.append(self._capabilities())
                else:
                    # Telemetry or Capabilities travelling host -> controller: not a host frame, not echoed.
                    self._count_locked("rejected_framing")
        for reply in replies:
            self._pty.write(encode(reply))

    def _capabilities(self) -> Capabilities:
        return Capabilities(seq=self._tx_seq.next(), firmware_version=FIRMWARE_VERSION,
                            channels=self._layout.capabilities(),
                            watchdog_timeout_ms=max(1, round(self._watchdog_timeout_s * 1000)),
                            telemetry_period_ms=max(1, round(self._telemetry_period_s * 1000)))

    def _firmware_loop(self) -> None:
        tick_s = min(_WATCHDOG_CHECK_PERIOD_S, self._telemetry_period_s)
        next_tick = next_telemetry = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_tick:
                self._check_watchdog(now)
                next_tick += tick_s
                if next_tick < now:  # overran (a descheduled process): skip ahead, do not burst
                    next_tick = now + tick_s
            if now >= next_telemetry:
                self._send_telemetry(now)
                next_telemetry += self._telemetry_period_s
                if next_telemetry < now:
                    next_telemetry = now + self._telemetry_period_s
            if self._stop.wait(max(0.0, min(next_tick, next_telemetry) - time.monotonic())):
                return

    def _check_watchdog(self, now: float) -> None:
        with self._state_lock:
            if self._watchdog_tripped:
                return
            last = self._last_valid_command_s
            if last is not None and now - last > self._watchdog_timeout_s:
                self._watchdog_tripped = True
                self._watchdog_tripped_at_s = now
                self._stop_locked()
                logger.info("watchdog tripped: no valid SetTargets for %.0f ms", (now - last) * 1e3)

    def _stop_locked(self) -> None:
        """Stop every channel: velocity ones at 0, position ones held where they are measured now."""
        self._set_targets_locked(self._layout.stop_targets(self._positions), stop=True)

    def _set_targets_locked(self, targets: tuple[float, ...], stop: bool = False) -> None:
        """Apply targets; remember since when they are a stop (the fault suite's "zero command" time): a
        stop, or every target zero on a robot of velocity channels only."""
        zero = stop or (self._layout.is_reference_robot and not any(targets))
        if zero and self._targets_zero_since_s is None:
            self._targets_zero_since_s = time.monotonic()
        elif not zero:
            self._targets_zero_since_s = None
        self._targets = targets

    def _status_locked(self) -> StatusFlags:
        status = StatusFlags.NONE
        if self._watchdog_tripped:
            status |= StatusFlags.WATCHDOG_TRIPPED
        if self._estop_latched:
            status |= StatusFlags.ESTOP_LATCHED
        if self._fault:
            status |= StatusFlags.FAULT
        if not status:
            status = StatusFlags.MOTORS_ENABLED
        return status

    def _send_telemetry(self, now: float) -> None:
        with self._state_lock:
            if not self._telemetry_enabled:
                return
            message = Telemetry(
                seq=self._tx_seq.next(),
                controller_time_ms=int((now - self._boot_s) * 1000.0) & 0xFFFFFFFF,
                velocities=self._measured if self._reported[0] is None else self._reported[0],
                positions=self._positions if self._reported[1] is None else self._reported[1],
                status=self._status_locked(),
                last_command_seq=self._last_command_seq,
                fault_code=self._fault_code,
                **self._rejections,
            )
        frame = encode(message) if self._protocol_version == PROTOCOL_VERSION else _encode_v1_telemetry(message)
        with self._fault_lock:
            if self._flip_probability > 0.0:
                frame = self._flip_locked(frame, self._flip_probability)
        sent = self._pty.write(frame)
        with self._state_lock:
            if sent:
                self._telemetry_sent += 1
            else:
                self._telemetry_unsent += 1

    def _flip_locked(self, frame: bytes, probability: float) -> bytes:
        flips = self._rng.random(len(frame) * 8) < probability
        if not flips.any():
            return frame
        mask = np.packbits(flips)
        return (np.frombuffer(frame, dtype=np.uint8) ^ mask).tobytes()

    def _physics_loop(self) -> None:
        dt_s = self._world_config.dt_s
        deadline = time.monotonic() + dt_s
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            self._physics_step(dt_s)
            deadline += dt_s
            now = time.monotonic()
            if deadline < now:  # overran: skip ahead instead of bursting steps to catch up
                with self._state_lock:
                    self._physics_overruns += 1
                deadline = now + dt_s

    def _physics_step(self, dt_s: float) -> None:
        reference = self._layout.is_reference_robot
        with self._world_lock:
            with self._state_lock:
                targets = self._targets
            # Another layout moves its own channels; the world's robot stands still (zero wheel targets).
            wheels = targets if reference else (0.0,) * CHANNELS
            observation = self._world.step(np.asarray(wheels, dtype=np.float32))
            now = time.monotonic()
            with self._state_lock:
                if not reference:
                    self._channels.step(self._targets, dt_s)
                self._publish_world_locked(observation.frame, now, dt_s)

    # world snapshot ------------------------------------------------------------------------------------
    def _reset_world_locked(self, seed, target, instruction, variant) -> None:
        observation = self._world.reset(seed, target=target, instruction=instruction, variant=variant)
        now = time.monotonic()
        with self._state_lock:
            self._seed = self._world.seed
            self._target = self._world.target_name
            self._instruction = self._world.instruction
            self._variant = self._world.variant
            self._success_at_s = None
            self._physics_steps = 0
            self._wheel_positions: tuple[float, ...] = (0.0,) * CHANNELS
            self._positions: tuple[float, ...] = self._channels.positions
            self._wheel_speeds_m_s = np.zeros(CHANNELS)
            self._stopped_since_s: float | None = None
            self._publish_world_locked(observation.frame, now, 0.0)

    def _publish_world_locked(self, frame: np.ndarray, now: float, dt_s: float) -> None:
        world = self._world
        speeds = world.wheel_velocity
        # Trapezoid: the wheel angle follows the mean speed over the step.
        travelled = (self._wheel_speeds_m_s + speeds) / 2.0 * dt_s / WHEEL_RADIUS_M
        self._wheel_positions = tuple(float(p) for p in np.asarray(self._wheel_positions) + travelled)
        self._wheel_speeds_m_s = speeds
        measured = speeds / self._world_config.max_wheel_speed_m_s
        if self._layout.is_reference_robot:
            self._measured = tuple(float(v) for v in measured)
            self._positions = self._wheel_positions
        else:
            self._measured, self._positions = self._channels.velocities, self._channels.positions
            measured = np.asarray(self._measured)
        if np.all(np.abs(measured) < MOTOR_STOPPED_EPSILON):
            if self._stopped_since_s is None:
                self._stopped_since_s = now
        else:
            self._stopped_since_s = None
        self._pose = tuple(float(v) for v in world.pose)
        self._distance_m = float(world.distance_to_target_m)
        self._physics_steps = world.steps
        if world.success and self._success_at_s is None:
            self._success_at_s = now
            logger.info("robot reached the %s after %d steps", self._target, world.steps)
        self._frame = frame

    def _camera_frame(self) -> np.ndarray:
        with self._state_lock:
            return self._frame  # never mutated: each physics step publishes a new array


def _encode_v1_telemetry(message: Telemetry) -> bytes:
    """The frame a protocol-v1 controller sends (revision 1.0 of docs/serial-protocol.md)."""
    dropped = (message.rejected_estop + message.rejected_fault) & _U16
    other = (message.rejected_framing + message.rejected_channel_count + message.rejected_kind
             + message.rejected_range) & _U16
    fixed = _V1_TELEMETRY.pack(message.controller_time_ms, int(message.status), message.last_command_seq,
                               message.rejected_crc, other, dropped, len(message.velocities),
                               len(message.positions))
    floats = struct.pack(f"<{len(message.velocities) + len(message.positions)}f",
                         *message.velocities, *message.positions)
    return seal(MessageType.TELEMETRY, message.seq, fixed + floats, version=1)
