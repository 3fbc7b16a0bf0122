"""The bridge's inputs: each a device with the house lifecycle (connect, is_connected, reads, disconnect);
the outputs (commands, /diagnostics) are in :mod:`edge.io.ros2.outputs`.

- ``Ros2Camera``: Image or CompressedImage topic, latest-frame semantics, the same reading interface as
  ``edge.io.camera.Camera`` (``read_into``, ``read_latest``, ``frame_age_s``, ``frame_shape``); frames BGR.
- ``Ros2InstructionSource``: a std_msgs/String topic; the newest instruction and a counter.
- ``Ros2JointStateSource``: sensor_msgs/JointState telemetry, newest sample and its age.
- ``Ros2EStop``: std_msgs/Bool; ``True`` latches until ``clear()``, like the control socket's e-stop.

Times: a header stamp is ROS time (the wall clock, ``time.time()``). It is mapped onto ``time.monotonic()``
at receipt; a stamp from the future (clocks of two hosts apart) or an unset stamp (0) counts as receipt
time, so a frame never looks younger than when it arrived.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edge.errors import CameraError, InputError
from edge.io.latest_frame import LatestFrame, LatestFrameReader
from edge.io.ros2.dds import QosProfile, Ros2Error, Ros2Node, check_topic
from edge.ratelimit import RateLimitedWarnings
from edge.validation import check_range

logger = logging.getLogger(__name__)

_WARN_INTERVAL_S = 5.0
_POLL_S = 0.05  # a receive thread wakes at least this often to see a disconnect
_CHANNELS = {"bgr8": 3, "rgb8": 3, "mono8": 1, "bgra8": 4, "rgba8": 4}


def stamp_to_monotonic(stamp_s: float, now_wall_s: float, now_mono_s: float) -> float:
    """A wall-clock header stamp as a time on time.monotonic(); never later than now (see module doc)."""
    if stamp_s <= 0.0:
        return now_mono_s
    return now_mono_s - max(0.0, now_wall_s - stamp_s)


class _Subscription:
    """A reader and a thread that hands each received sample to ``on_sample`` (in arrival order)."""

    def __init__(self, node: Ros2Node, topic: str, msg_type: type, profile: QosProfile,
                 on_sample: Callable[[Any], None]) -> None:
        from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
        from cyclonedds.util import duration

        self._reader = node.reader(topic, msg_type, profile)
        self._waitset = WaitSet(node.participant)
        self._waitset.attach(ReadCondition(self._reader, SampleState.Any | ViewState.Any | InstanceState.Any))
        self._timeout = duration(seconds=_POLL_S)
        self._on_sample = on_sample
        self._msg_type = msg_type
        self._topic = topic
        self.refused = 0  # samples that arrived and could not be taken (bad encoding, corrupt jpeg)
        self._warn = RateLimitedWarnings(logger, _WARN_INTERVAL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ros2:{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from cyclonedds.core import DDSException

        while not self._stop.is_set():
            try:
                self._waitset.wait(self._timeout)
                samples = self._reader.take(N=16)
            except DDSException as exc:  # the reader or its participant is gone: nothing more will come
                if not self._stop.is_set():
                    logger.error("ROS 2 topic %s: reader failed (%s); no more samples, values go stale",
                                 self._topic, exc)
                return
            except Exception as exc:  # bytes the type cannot decode: taken already, so the next take goes on
                self.refused += 1
                self._warn("ROS 2 topic %s: a sample could not be decoded: %r", self._topic, exc)
                continue
            for sample in samples:
                if not isinstance(sample, self._msg_type):  # dispose/unregister notices carry no data
                    continue
                try:
                    self._on_sample(sample)
                except (InputError, ValueError, cv2.error) as exc:
                    self.refused += 1
                    self._warn("ROS 2 topic %s: sample refused: %s", self._topic, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


# --- camera -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ros2CameraConfig:
    topic: str = "/camera/image_raw"
    compressed: bool = False  # sensor_msgs/CompressedImage (jpeg/png) instead of sensor_msgs/Image
    open_timeout_s: float = 5.0  # connect() fails if no frame arrived by then (a lost first sample is fine)
    stale_after_s: float = 0.3  # no frame for this long counts as a lost stream (is_streaming, reconnects)

    def __post_init__(self) -> None:
        check_topic("ros2.camera.topic", self.topic)
        check_range("ros2.camera.open_timeout_s", self.open_timeout_s, 0, 120, unit="s", low_open=True)
        check_range("ros2.camera.stale_after_s", self.stale_after_s, 0, 60, unit="s", low_open=True)


def decode_image(msg: Any) -> np.ndarray:
    """A sensor_msgs/Image as an HxWx3 BGR uint8 array (a copy); InputError for what it cannot take."""
    channels = _CHANNELS.get(msg.encoding)
    if channels is None:
        raise InputError(f"Image encoding {msg.encoding!r} is not supported; publish one of "
                         f"{', '.join(sorted(_CHANNELS))}")
    row = msg.width * channels
    if msg.step < row or len(msg.data) < msg.step * msg.height:
        raise InputError(f"Image of {msg.width}x{msg.height} {msg.encoding} has step {msg.step} and "
                         f"{len(msg.data)} bytes; expected step >= {row} and step*height bytes")
    rows = np.frombuffer(msg.data, np.uint8, count=msg.step * msg.height).reshape(msg.height, msg.step)
    pixels = rows[:, :row].reshape(msg.height, msg.width, channels)
    conversion = {"rgb8": cv2.COLOR_RGB2BGR, "mono8": cv2.COLOR_GRAY2BGR, "bgra8": cv2.COLOR_BGRA2BGR,
                  "rgba8": cv2.COLOR_RGBA2BGR}.get(msg.encoding)
    return np.ascontiguousarray(pixels) if conversion is None else cv2.cvtColor(pixels, conversion)


def decode_compressed(msg: Any) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(msg.data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"CompressedImage ({msg.format!r}, {len(msg.data)} bytes) did not decode; "
                         "publish jpeg or png")
    return image


class Ros2Camera(LatestFrameReader):
    """Latest-frame camera on a ROS 2 image topic (best effort, keep last 1)."""

    def __init__(self, node: Ros2Node, config: Ros2CameraConfig) -> None:
        self.node = node
        self.config = config
        self._frames = LatestFrame(f"the topic {config.topic}")
        self._first = threading.Event()
        self._sub: _Subscription | None = None
        self._received_s = -math.inf  # receipt time of the newest frame (time.monotonic())
        self._reconnects = 0
        self._read_failures = 0  # refused samples of earlier connections
        self._open_failures = 0

    def connect(self) -> None:
        from edge.io.ros2 import msgs

        if self._sub is not None:
            raise CameraError(f"ROS 2 camera {self.config.topic} is already connected")
        msg_type = msgs.CompressedImage if self.config.compressed else msgs.Image
        self._first.clear()
        self._sub = _Subscription(self.node, self.config.topic, msg_type, QosProfile.SENSOR, self._on_frame)
        if not self._first.wait(self.config.open_timeout_s):
            self._open_failures += 1
            self.disconnect()
            raise CameraError(f"ROS 2 camera: no {msg_type.__name__} on {self.config.topic} within "
                              f"{self.config.open_timeout_s:g} s (ros2.camera.open_timeout_s); check the topic "
                              "with `ros2 topic hz`, ros2.domain_id and that the publisher is best-effort "
                              "compatible")
        logger.info("ROS 2 camera %s connected: %s frames", self.config.topic, self.frame_shape)

    @property
    def is_connected(self) -> bool:
        return self._sub is not None

    def disconnect(self) -> None:
        """Stop receiving. The last frame stays readable and ages (stale), as with the OpenCV camera."""
        if self._sub is not None:
            self._sub.close()
            self._read_failures += self._sub.refused
            self._sub = None

    @property
    def is_streaming(self) -> bool:
        """True while frames arrive (the newest came less than stale_after_s ago)."""
        return self.is_connected and time.monotonic() - self._received_s < self.config.stale_after_s

    @property
    def reconnects(self) -> int:
        """Times frames came again after a gap longer than stale_after_s."""
        return self._reconnects

    @property
    def read_failures(self) -> int:
        """Frames that arrived and could not be decoded (bad encoding, size or jpeg)."""
        return self._read_failures + (self._sub.refused if self._sub is not None else 0)

    @property
    def open_failures(self) -> int:
        """connect() calls that saw no frame within open_timeout_s."""
        return self._open_failures

    def __enter__(self) -> Ros2Camera:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    def _on_frame(self, msg: Any) -> None:
        image = decode_compressed(msg) if self.config.compressed else decode_image(msg)
        received = time.monotonic()
        stamp = stamp_to_monotonic(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, time.time(), received)
        # Only this callback's thread writes _received_s and publishes frames.
        if self._frames.count and received - self._received_s > self.config.stale_after_s:
            self._reconnects += 1
            logger.info("ROS 2 camera %s: frames are back (after %.2f s)", self.config.topic,
                        received - self._received_s)
        self._received_s = received
        self._frames.publish(image, stamp)  # a new array per message: nothing to reuse
        self._first.set()


# --- instruction, telemetry, e-stop (newest-value sources) ------------------------------------------

@dataclass(frozen=True)
class Ros2TopicConfig:
    """A topic for one of the simple roles (instruction, joint states, e-stop)."""

    topic: str
    key: str = "ros2.topic"  # the config key named in errors

    def __post_init__(self) -> None:
        check_topic(self.key, self.topic)


class _LatestValue:
    """Keeps the newest sample of a topic and its receipt time (time.monotonic())."""

    msg_name = ""
    profile = QosProfile.DEFAULT

    def __init__(self, node: Ros2Node, config: Ros2TopicConfig) -> None:
        self.node = node
        self.config = config
        self._lock = threading.Lock()
        self._value: Any = None
        self._received_s = -math.inf
        self._count = 0
        self._sub: _Subscription | None = None

    def connect(self) -> None:
        from edge.io.ros2 import msgs

        if self._sub is not None:
            raise Ros2Error(f"ROS 2 {self.msg_name} on {self.config.topic} is already connected")
        self._sub = _Subscription(self.node, self.config.topic, getattr(msgs, self.msg_name), self.profile,
                                  self._on_sample)

    @property
    def is_connected(self) -> bool:
        return self._sub is not None

    def disconnect(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    def __enter__(self) -> _LatestValue:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    def _convert(self, msg: Any) -> Any:
        return msg

    def _on_sample(self, msg: Any) -> None:
        value = self._convert(msg)
        with self._lock:
            self._value = value
            self._received_s = time.monotonic()
            self._count += 1

    def latest(self) -> tuple[Any, float, int]:
        """(newest value or None, its receipt time on time.monotonic(), how many have arrived)."""
        with self._lock:
            return self._value, self._received_s, self._count


class Ros2InstructionSource(_LatestValue):
    """Instructions as std_msgs/String (ROS 2 default QoS: reliable, keep last 10)."""

    msg_name = "String"

    def _convert(self, msg: Any) -> str:
        text = msg.data.strip()
        if not text:
            raise InputError(f"empty instruction on {self.config.topic} ignored")
        return text


@dataclass(frozen=True)
class JointSample:
    names: tuple[str, ...]
    position: tuple[float, ...]
    velocity: tuple[float, ...]
    effort: tuple[float, ...]
    stamp_s: float  # header stamp mapped onto time.monotonic()

    @property
    def velocities(self) -> tuple[float, ...]:
        """The measured velocities under the name the serial link's Telemetry gives them."""
        return self.velocity

    @property
    def positions(self) -> tuple[float, ...]:
        """The measured positions under the name the serial link's Telemetry gives them."""
        return self.position


class Ros2JointStateSource(_LatestValue):
    """Telemetry as sensor_msgs/JointState (sensor QoS: best effort, keep last 1)."""

    msg_name = "JointState"
    profile = QosProfile.SENSOR

    def _convert(self, msg: Any) -> JointSample:
        stamp = stamp_to_monotonic(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, time.time(),
                                   time.monotonic())
        return JointSample(tuple(msg.name), tuple(msg.position), tuple(msg.velocity), tuple(msg.effort), stamp)

    def telemetry_age_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        value, received, _ = self.latest()
        return math.inf if value is None else now - value.stamp_s


class Ros2EStop(_LatestValue):
    """E-stop as std_msgs/Bool (reliable): ``True`` latches until ``clear()``; ``False`` alone never clears."""

    msg_name = "Bool"
    profile = QosProfile.COMMAND

    def __init__(self, node: Ros2Node, config: Ros2TopicConfig) -> None:
        super().__init__(node, config)
        self._latched = threading.Event()

    def _convert(self, msg: Any) -> bool:
        if msg.data:
            if not self._latched.is_set():
                logger.warning("e-stop latched by ROS 2 topic %s", self.config.topic)
            self._latched.set()
        return bool(msg.data)

    @property
    def is_latched(self) -> bool:
        return self._latched.is_set()

    def clear(self) -> None:
        """Operator's clear (the control socket's); a later True latches again."""
        self._latched.clear()
