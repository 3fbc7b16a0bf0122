"""What the motor link knows about the controller: the newest telemetry, its capabilities, round trips
and counters.

``SerialMotorLink`` (edge.io.motor_link) owns the port, its reader thread and reconnection; this is the
state those threads share, behind one lock. The reader thread feeds it the telemetry it decodes
(``receive``) and hands over each connection's decoder; the caller's thread records the commands it
sent; any thread reads the latest sample, the controller's Capabilities, the last round trip and the
counters. No I/O, no clock and no logging: times come in as arguments and what deserves a log line is
returned to the link.

Capabilities (docs/serial-protocol.md, sections 4 and 6a): each connection's arrive in reply to the
link's GetCapabilities and are forgotten when the connection closes or the controller restarts. The
first the link ever received are the ones it armed with; a later set that differs is kept as a
problem for the link's life, and ``command_problem`` then holds every SetTargets back.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from dataclasses import dataclass

from edge.io.protocol import (
    PROTOCOL_VERSION,
    Capabilities,
    DecoderStats,
    FrameDecoder,
    Message,
    StatusFlags,
    Telemetry,
    seq_delta,
)

# Commands awaiting a telemetry echo, for the round-trip measurement; older ones are forgotten.
_PENDING_COMMANDS = 64
_ROUND_TRIPS_KEPT = 1024  # round trips kept for their quantiles (about 100 s at 10 Hz)
_TIME_MS_MODULUS = 1 << 32


@dataclass(frozen=True)
class LinkStats:
    """Counters since the link was created; decoder counts add up over reconnections."""

    telemetry_frames: int = 0
    telemetry_lost: int = 0  # from gaps in the telemetry seq within one connection
    crc_errors: int = 0
    framing_errors: int = 0  # bad COBS, too short or too long, unknown type, bad payload
    version_errors: int = 0  # frames for another protocol version (firmware/runtime mismatch)
    ignored_frames: int = 0  # valid host-to-controller frames (e.g. our own commands echoed back)
    capabilities_frames: int = 0  # Capabilities received
    held_commands: int = 0  # send_targets calls not sent: no (matching) Capabilities on this connection
    bytes_received: int = 0
    commands_sent: int = 0  # frames written in full
    write_failures: int = 0  # writes that timed out or failed (each took the link down)
    undelivered: int = 0  # send calls while the link was down (nothing written)
    disconnects: int = 0
    reconnects: int = 0
    open_failures: int = 0  # failed reopen attempts while down
    controller_resets: int = 0  # controller_time_ms went backwards

    @property
    def bad_frames(self) -> int:
        return self.crc_errors + self.framing_errors + self.version_errors


@dataclass(frozen=True)
class ControllerRestart:
    """The controller's clock went backwards between two telemetry samples: it restarted."""

    previous_time_ms: int
    time_ms: int


@dataclass(frozen=True)
class CapabilitiesReceived:
    """A Capabilities frame arrived; ``armed`` is the set the link armed with when this one differs."""

    capabilities: Capabilities
    armed: Capabilities | None = None


V1_REFUSED = (
    "the motor controller speaks serial protocol v1; this runtime speaks v{host} only (a v1 controller "
    "cannot report its channel kinds and limits): flash firmware that implements protocol v{host} "
    "(docs/serial-protocol.md) and start again"
)


class LinkState:
    """Telemetry, round trips and counters of one motor link; every method is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._telemetry: Telemetry | None = None
        self._telemetry_stamp_s = -math.inf
        self._previous_seq: int | None = None  # last telemetry seq on this connection, for loss counting
        self._pending: collections.deque[tuple[int, float]] = collections.deque(maxlen=_PENDING_COMMANDS)
        self._last_round_trip_s: float | None = None
        self._round_trips: collections.deque[float] = collections.deque(maxlen=_ROUND_TRIPS_KEPT)
        self._counts = {name: 0 for name in LinkStats.__dataclass_fields__}
        self._decoder_base = DecoderStats()  # totals of the decoders of earlier connections
        self._decoder: FrameDecoder | None = None
        # Every status flag any sample showed since the last take_status_flags(): a WATCHDOG_TRIPPED
        # cleared by our next command within one tick is still seen by the tick.
        self._flags_seen = 0
        self._capabilities: Capabilities | None = None  # this connection's; None until they arrive
        self._armed: Capabilities | None = None  # the first the link received: what it armed with
        self._changed: Capabilities | None = None  # a later set that differs from _armed (sticky)
        self._peer_version: int | None = None  # version byte of frames dropped for their version
        self.capabilities_arrived = threading.Event()  # set while this connection's are known

    # connections (reader thread, connect) ------------------------------------------------------------
    def new_connection(self, reconnect: bool = False) -> None:
        """Forget the sequence and the pending commands of the previous connection."""
        with self._lock:
            if reconnect:
                self._counts["reconnects"] += 1
            self._previous_seq = None  # the controller kept sending while we were away
            self._pending.clear()  # commands of the old connection will never be echoed
            self._forget_capabilities_locked()

    def _forget_capabilities_locked(self) -> None:
        self._capabilities = None
        self.capabilities_arrived.clear()

    def note_peer_version(self, version: int) -> None:
        """The decoder dropped a frame (with a good CRC) for carrying protocol version ``version``."""
        with self._lock:
            self._peer_version = version

    def attach_decoder(self, decoder: FrameDecoder) -> None:
        """The decoder of the connection now open; its counts show in ``stats`` from now on."""
        with self._lock:
            self._decoder = decoder

    def detach_decoder(self) -> None:
        """The connection closed: keep its decoder's counts in the totals, forget its capabilities."""
        with self._lock:
            self._forget_capabilities_locked()
            if self._decoder is not None:
                self._decoder_base = _add_stats(self._decoder_base, self._decoder.stats)
                self._decoder = None

    def count(self, name: str) -> None:
        """One more of the LinkStats counter ``name``."""
        with self._lock:
            self._counts[name] += 1

    # commands (caller's thread) ------------------------------------------------------------------------
    def sent(self, seq: int, sent_at_s: float) -> None:
        """A command was written in full; its echo in telemetry gives the round trip."""
        with self._lock:
            self._counts["commands_sent"] += 1
            self._pending.append((seq, sent_at_s))

    # telemetry (reader thread) -------------------------------------------------------------------------
    def receive(self, messages: list[Message], now: float,
                n_bytes: int) -> list[ControllerRestart | CapabilitiesReceived]:
        """Take the messages decoded from ``n_bytes`` received at ``now``; returns the controller restarts
        and the Capabilities they show (for the link to log)."""
        events: list[ControllerRestart | CapabilitiesReceived] = []
        with self._lock:
            self._counts["bytes_received"] += n_bytes
            for message in messages:
                if isinstance(message, Capabilities):
                    self._count_gap_locked(message.seq)
                    events.append(self._capabilities_locked(message))
                    continue
                if not isinstance(message, Telemetry):
                    # A host frame coming back (loopback, echoing adapter): harmless, counted, ignored.
                    self._counts["ignored_frames"] += 1
                    continue
                self._counts["telemetry_frames"] += 1
                previous = self._telemetry
                self._count_gap_locked(message.seq)
                if previous is not None:
                    elapsed_ms = (message.controller_time_ms - previous.controller_time_ms) % _TIME_MS_MODULUS
                    if elapsed_ms >= _TIME_MS_MODULUS // 2:  # went backwards: the controller restarted
                        self._counts["controller_resets"] += 1
                        events.append(ControllerRestart(previous.controller_time_ms, message.controller_time_ms))
                        self._forget_capabilities_locked()  # asked again; it may have been reflashed
                self._flags_seen |= int(message.status)
                self._telemetry = message
                self._telemetry_stamp_s = now
                self._confirm_locked(message.last_command_seq, now)
        return events

    def _count_gap_locked(self, seq: int) -> None:
        # Telemetry and Capabilities share the controller's counter (section 5).
        if self._previous_seq is not None:
            delta = seq_delta(self._previous_seq, seq)
            if delta > 1:
                self._counts["telemetry_lost"] += delta - 1
        self._previous_seq = seq

    def _capabilities_locked(self, capabilities: Capabilities) -> CapabilitiesReceived:
        self._counts["capabilities_frames"] += 1
        self._capabilities = capabilities
        self._peer_version = None
        self.capabilities_arrived.set()
        if self._armed is None:
            self._armed = capabilities
        elif not _same_capabilities(self._armed, capabilities):
            self._changed = capabilities
            return CapabilitiesReceived(capabilities, armed=self._armed)
        return CapabilitiesReceived(capabilities)

    def _confirm_locked(self, echoed_seq: int, now: float) -> None:
        confirmed: tuple[int, float] | None = None
        while self._pending and seq_delta(self._pending[0][0], echoed_seq) >= 0:
            confirmed = self._pending.popleft()
        if confirmed is not None:
            self._last_round_trip_s = now - confirmed[1]
            self._round_trips.append(self._last_round_trip_s)

    # reading (any thread) ------------------------------------------------------------------------------
    def latest(self) -> tuple[Telemetry | None, float]:
        """The newest Telemetry and its receive time; (None, -inf) before the first."""
        with self._lock:
            return self._telemetry, self._telemetry_stamp_s

    @property
    def capabilities(self) -> Capabilities | None:
        """This connection's Capabilities; None until they arrived (and after a controller restart)."""
        with self._lock:
            return self._capabilities

    def command_problem(self, channels: int, kinds: tuple[str, ...]) -> str | None:
        """Why SetTargets for ``channels`` channels of ``kinds`` must not be sent now, or None."""
        with self._lock:
            capabilities, changed, peer_version = self._capabilities, self._changed, self._peer_version
            armed = self._armed
        if changed is not None:
            return (f"the controller's capabilities changed after a reconnect or restart (armed with: "
                    f"{armed.describe()}; now: {changed.describe()}); restart the runtime so they are "
                    "checked against the bundle again")
        if capabilities is None:
            if peer_version == 1:
                return V1_REFUSED.format(host=PROTOCOL_VERSION)
            if peer_version is not None:
                return (f"the motor controller speaks serial protocol v{peer_version}; this runtime speaks "
                        f"v{PROTOCOL_VERSION}: update the firmware or the runtime so both speak the same version")
            return "the controller did not answer GetCapabilities on this connection yet"
        if capabilities.channel_count != channels:
            return (f"the controller has {capabilities.channel_count} channels; motor.channels is {channels}")
        for index, (kind, channel) in enumerate(zip(kinds, capabilities.channels)):
            if not channel.supports(kind):
                return (f"channel {index} is commanded as {kind}, the controller supports only "
                        f"{'/'.join(channel.kinds)} on it")
        return None

    def take_status_flags(self) -> StatusFlags:
        """The status flags of every sample received since the previous call (OR-ed), then forget them."""
        with self._lock:
            flags, self._flags_seen = self._flags_seen, 0
        return StatusFlags(flags)

    def age_s(self, now: float) -> float:
        with self._lock:
            return now - self._telemetry_stamp_s

    def echoes(self, seq: int, sent_at_s: float) -> bool:
        """True once telemetry received at or after ``sent_at_s`` echoes ``seq`` (or a later one)."""
        with self._lock:
            telemetry, stamp = self._telemetry, self._telemetry_stamp_s
        return telemetry is not None and stamp >= sent_at_s and seq_delta(seq, telemetry.last_command_seq) >= 0

    @property
    def last_round_trip_s(self) -> float | None:
        with self._lock:
            return self._last_round_trip_s

    def round_trip_quantiles_s(self) -> dict[float, float]:
        """p50 and p99 (keys 0.5, 0.99) of the last round trips, command sent -> the telemetry echoing it
        (the command -> telemetry leg of the glass-to-wire latency); {} before the first."""
        with self._lock:
            trips = list(self._round_trips)
        if not trips:
            return {}
        ordered = sorted(trips)
        return {q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.99)}

    @property
    def stats(self) -> LinkStats:
        with self._lock:
            counts = dict(self._counts)
            decoder = self._decoder_base
            if self._decoder is not None:
                decoder = _add_stats(decoder, self._decoder.stats)
        counts["crc_errors"] = decoder.crc_errors
        counts["framing_errors"] = (
            decoder.framing_errors + decoder.oversized + decoder.unknown_messages + decoder.payload_errors
            + decoder.range_errors
        )
        counts["version_errors"] = decoder.version_errors
        return LinkStats(**counts)


def _same_capabilities(a: Capabilities, b: Capabilities) -> bool:
    # The seq differs between two answers; everything else must not change while the robot runs.
    return a == dataclasses.replace(b, seq=a.seq)


def _add_stats(a: DecoderStats, b: DecoderStats) -> DecoderStats:
    return DecoderStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(a)})
