"""The firmware core built for the host (libfwcore.so, firmware/host/board_host.c) behind ctypes.

``HostFirmware(lib, layout)`` initialises the one controller instance with a channel layout; the test
owns time (``advance``), the encoder readings (``set_measured``) and the UART (``take_frames`` decodes
what the controller sent with the runtime's own FrameDecoder).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from edge.io.protocol import POSITION, VELOCITY, FrameDecoder, Message, Telemetry

MAX_CHANNELS = 8
KIND_BITS = {VELOCITY: 0x01, POSITION: 0x02}
REJECTIONS = ("rejected_crc", "rejected_framing", "rejected_channel_count", "rejected_kind",
              "rejected_range", "rejected_estop", "rejected_fault")


class ChannelConfig(ctypes.Structure):
    _fields_ = [("kinds", ctypes.c_uint8), ("position_min", ctypes.c_float), ("position_max", ctypes.c_float)]


class Config(ctypes.Structure):
    _fields_ = [("channel_count", ctypes.c_uint8), ("watchdog_timeout_ms", ctypes.c_uint16),
                ("telemetry_period_ms", ctypes.c_uint16), ("channels", ChannelConfig * MAX_CHANNELS)]


class Outputs(ctypes.Structure):
    _fields_ = [("channel_count", ctypes.c_uint8), ("enabled", ctypes.c_uint8),
                ("position_mask", ctypes.c_uint8), ("target", ctypes.c_float * MAX_CHANNELS)]


class State(ctypes.Structure):
    _fields_ = [("status", ctypes.c_uint8), ("fault_code", ctypes.c_uint8),
                ("last_command_seq", ctypes.c_uint16), ("rejected", ctypes.c_uint16 * len(REJECTIONS)),
                ("outputs", Outputs)]


class HostMessage(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint8), ("seq", ctypes.c_uint16), ("channel_count", ctypes.c_uint8),
                ("position_mask", ctypes.c_uint8), ("targets", ctypes.c_float * MAX_CHANNELS)]


RX_PENDING, RX_MESSAGE, RX_REJECTED = 0, 1, 2


def load(path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.fw_crc16_ccitt_false.restype = ctypes.c_uint16
    lib.fw_crc16_ccitt_false.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.fw_parse_frame.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(HostMessage),
                                   ctypes.POINTER(ctypes.c_int)]
    lib.fw_init.argtypes = [ctypes.POINTER(Config)]
    lib.fw_rx_byte.argtypes = [ctypes.c_uint8]
    lib.fw_set_fault.argtypes = [ctypes.c_uint8]
    lib.fw_get_state.argtypes = [ctypes.POINTER(State)]
    lib.host_set_millis.argtypes = [ctypes.c_uint32]
    lib.host_take_tx.restype = ctypes.c_size_t
    lib.host_take_tx.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.host_tx_overflows.restype = ctypes.c_uint32
    lib.host_get_outputs.argtypes = [ctypes.POINTER(Outputs)]
    lib.host_set_measured.argtypes = [ctypes.c_uint8, ctypes.c_float, ctypes.c_float]
    for name, struct in (("host_sizeof_config", Config), ("host_sizeof_outputs", Outputs),
                         ("host_sizeof_state", State)):
        getattr(lib, name).restype = ctypes.c_size_t
        assert getattr(lib, name)() == ctypes.sizeof(struct), f"{name}: the ctypes mirror is out of date"
    return lib


@dataclass(frozen=True)
class Layout:
    kinds: tuple[str, ...] = (VELOCITY, VELOCITY)  # per channel: "velocity", "position" or "both"
    limits: tuple[tuple[float, float], ...] = ()
    watchdog_timeout_ms: int = 300
    telemetry_period_ms: int = 20

    def config(self) -> Config:
        config = Config(channel_count=len(self.kinds), watchdog_timeout_ms=self.watchdog_timeout_ms,
                        telemetry_period_ms=self.telemetry_period_ms)
        limits = self.limits or ((0.0, 0.0),) * len(self.kinds)
        for k, (kind, (low, high)) in enumerate(zip(self.kinds, limits)):
            bits = 0x03 if kind == "both" else KIND_BITS[kind]
            config.channels[k] = ChannelConfig(bits, low, high)
        return config


class HostFirmware:
    def __init__(self, lib: ctypes.CDLL, layout: Layout = Layout()) -> None:
        self.lib = lib
        self.layout = layout
        self._config = layout.config()  # the core keeps a pointer: it must outlive the controller
        lib.host_reset()
        self.now_ms = 0
        self.init_result = lib.fw_init(ctypes.byref(self._config))
        self._decoder = FrameDecoder()

    def feed(self, data: bytes) -> None:
        for byte in data:
            self.lib.fw_rx_byte(byte)

    def advance(self, ms: int, step_ms: int = 1) -> None:
        """Let `ms` milliseconds pass, polling every `step_ms` as the board's 1 ms tick does."""
        for _ in range(0, ms, step_ms):
            self.now_ms += step_ms
            self.lib.host_set_millis(self.now_ms & 0xFFFFFFFF)
            self.lib.fw_poll()

    def poll(self) -> None:
        self.lib.fw_poll()

    def take_bytes(self) -> bytes:
        buffer = ctypes.create_string_buffer(8192)
        n = self.lib.host_take_tx(buffer, len(buffer))
        return buffer.raw[:n]

    def take_frames(self) -> list[Message]:
        data = self.take_bytes()
        before = self._decoder.stats.rejected
        messages = self._decoder.feed(data)
        assert self._decoder.stats.rejected == before, f"the host rejected a frame: {self._decoder.last_error}"
        return messages

    def telemetry(self) -> list[Telemetry]:
        return [m for m in self.take_frames() if isinstance(m, Telemetry)]

    def state(self) -> State:
        state = State()
        self.lib.fw_get_state(ctypes.byref(state))
        return state

    def rejections(self) -> dict[str, int]:
        return dict(zip(REJECTIONS, self.state().rejected))

    def outputs(self) -> tuple[bool, int, tuple[float, ...]]:
        """(drivers enabled, position mask, targets) as last handed to board_set_outputs."""
        out = Outputs()
        self.lib.host_get_outputs(ctypes.byref(out))
        return bool(out.enabled), out.position_mask, tuple(out.target[: out.channel_count])

    def set_measured(self, channel: int, velocity: float, position: float) -> None:
        self.lib.host_set_measured(channel, velocity, position)
