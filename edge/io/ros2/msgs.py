"""ROS 2 message types as ROS 2's DDS middlewares put them on the wire.

Each type is written field by field from the ROS 2 ``.msg`` file cited beside it (repositories
ros2/common_interfaces and ros2/rcl_interfaces). The naming is what rosidl generates for DDS: the IDL module
path ``<pkg>::msg::dds_`` and a trailing underscore on the type name (``std_msgs::msg::dds_::String_``);
every type is ``@final`` and travels as XCDR1 (plain CDR), which is what rmw_cyclonedds and rmw_fastrtps
write and read. ROS 2 ``byte`` is IDL ``octet``; ``uint8[]`` is ``sequence<uint8>``; ``string`` unbounded.

Large byte payloads (``Image.data``, ``CompressedImage.data``): the binding packs a ``sequence[uint8]``
field one value at a time (about 58 ms for a 640x480x3 frame in cyclonedds 11.0.1). Those two types keep
``sequence[uint8]`` in their declaration, so the type name and the XTypes type information the binding
announces are exactly ROS 2's, and they encode and decode through a twin struct whose field is ``bytes``
(the binding's ``BytesMachine``: a uint32 length, then the bytes as one block), which is the same CDR on
the wire (a test pins it). ``data`` then holds ``bytes`` (any buffer on the way out), not a list of ints.
"""

# No `from __future__ import annotations`: the binding reads the field annotations as live types.
from dataclasses import dataclass, field
from typing import Any

from edge.io.ros2.dds import require_cyclonedds

require_cyclonedds()

from cyclonedds.idl import IdlStruct  # noqa: E402  (after the check that names the extra to install)
from cyclonedds.idl import types as t  # noqa: E402
from cyclonedds.idl.annotations import final  # noqa: E402


def _dds_name(package: str, name: str) -> str:
    return f"{package}::msg::dds_::{name}_"


# --- builtin_interfaces -------------------------------------------------------------------------------

# ros2/rcl_interfaces: builtin_interfaces/msg/Time.msg (int32 sec, uint32 nanosec)
@final
@dataclass
class Time(IdlStruct, typename=_dds_name("builtin_interfaces", "Time")):
    sec: t.int32 = 0
    nanosec: t.uint32 = 0

    @classmethod
    def from_seconds(cls, seconds: float) -> "Time":
        whole = int(seconds // 1)
        return cls(sec=whole, nanosec=min(int(round((seconds - whole) * 1e9)), 999_999_999))

    def to_seconds(self) -> float:
        return self.sec + self.nanosec * 1e-9


# ros2/rcl_interfaces: builtin_interfaces/msg/Duration.msg (int32 sec, uint32 nanosec)
@final
@dataclass
class Duration(IdlStruct, typename=_dds_name("builtin_interfaces", "Duration")):
    sec: t.int32 = 0
    nanosec: t.uint32 = 0

    @classmethod
    def from_seconds(cls, seconds: float) -> "Duration":
        whole = int(seconds // 1)
        return cls(sec=whole, nanosec=min(int(round((seconds - whole) * 1e9)), 999_999_999))


# --- std_msgs -----------------------------------------------------------------------------------------

# ros2/common_interfaces: std_msgs/msg/Header.msg (builtin_interfaces/Time stamp, string frame_id)
@final
@dataclass
class Header(IdlStruct, typename=_dds_name("std_msgs", "Header")):
    stamp: Time = field(default_factory=Time)
    frame_id: str = ""


# ros2/common_interfaces: std_msgs/msg/String.msg (string data)
@final
@dataclass
class String(IdlStruct, typename=_dds_name("std_msgs", "String")):
    data: str = ""


# ros2/common_interfaces: std_msgs/msg/Bool.msg (bool data)
@final
@dataclass
class Bool(IdlStruct, typename=_dds_name("std_msgs", "Bool")):
    data: bool = False


# --- sensor_msgs --------------------------------------------------------------------------------------

# ros2/common_interfaces: sensor_msgs/msg/Image.msg
# (std_msgs/Header header, uint32 height, uint32 width, string encoding, uint8 is_bigendian, uint32 step,
#  uint8[] data)
@final
@dataclass
class _ImageWire(IdlStruct, typename="vla_edge::wire::Image"):
    header: Header
    height: t.uint32
    width: t.uint32
    encoding: str
    is_bigendian: t.uint8
    step: t.uint32
    data: bytes


@final
@dataclass
class Image(IdlStruct, typename=_dds_name("sensor_msgs", "Image")):
    header: Header = field(default_factory=Header)
    height: t.uint32 = 0
    width: t.uint32 = 0
    encoding: str = ""
    is_bigendian: t.uint8 = 0
    step: t.uint32 = 0
    data: t.sequence[t.uint8] = b""  # bytes at run time: see the module docstring

    def serialize(self, use_version_2: bool | None = None, **kwargs: Any) -> bytes:
        wire = _ImageWire(self.header, self.height, self.width, self.encoding, self.is_bigendian, self.step,
                          bytes(self.data))
        return wire.serialize(use_version_2=use_version_2, **kwargs)

    @classmethod
    def deserialize(cls, data: bytes, **kwargs: Any) -> "Image":
        w = _ImageWire.deserialize(data, **kwargs)
        return cls(w.header, w.height, w.width, w.encoding, w.is_bigendian, w.step, w.data)


# ros2/common_interfaces: sensor_msgs/msg/CompressedImage.msg (std_msgs/Header header, string format,
# uint8[] data)
@final
@dataclass
class _CompressedImageWire(IdlStruct, typename="vla_edge::wire::CompressedImage"):
    header: Header
    format: str
    data: bytes


@final
@dataclass
class CompressedImage(IdlStruct, typename=_dds_name("sensor_msgs", "CompressedImage")):
    header: Header = field(default_factory=Header)
    format: str = ""
    data: t.sequence[t.uint8] = b""  # bytes at run time: see the module docstring

    def serialize(self, use_version_2: bool | None = None, **kwargs: Any) -> bytes:
        wire = _CompressedImageWire(self.header, self.format, bytes(self.data))
        return wire.serialize(use_version_2=use_version_2, **kwargs)

    @classmethod
    def deserialize(cls, data: bytes, **kwargs: Any) -> "CompressedImage":
        w = _CompressedImageWire.deserialize(data, **kwargs)
        return cls(w.header, w.format, w.data)


# ros2/common_interfaces: sensor_msgs/msg/JointState.msg
# (std_msgs/Header header, string[] name, float64[] position, float64[] velocity, float64[] effort)
@final
@dataclass
class JointState(IdlStruct, typename=_dds_name("sensor_msgs", "JointState")):
    header: Header = field(default_factory=Header)
    name: t.sequence[str] = field(default_factory=list)
    position: t.sequence[t.float64] = field(default_factory=list)
    velocity: t.sequence[t.float64] = field(default_factory=list)
    effort: t.sequence[t.float64] = field(default_factory=list)


# --- geometry_msgs ------------------------------------------------------------------------------------

# ros2/common_interfaces: geometry_msgs/msg/Vector3.msg (float64 x, y, z)
@final
@dataclass
class Vector3(IdlStruct, typename=_dds_name("geometry_msgs", "Vector3")):
    x: t.float64 = 0.0
    y: t.float64 = 0.0
    z: t.float64 = 0.0


# ros2/common_interfaces: geometry_msgs/msg/Twist.msg (Vector3 linear, Vector3 angular)
@final
@dataclass
class Twist(IdlStruct, typename=_dds_name("geometry_msgs", "Twist")):
    linear: Vector3 = field(default_factory=Vector3)
    angular: Vector3 = field(default_factory=Vector3)


# --- trajectory_msgs ----------------------------------------------------------------------------------

# ros2/common_interfaces: trajectory_msgs/msg/JointTrajectoryPoint.msg (float64[] positions,
# float64[] velocities, float64[] accelerations, float64[] effort, builtin_interfaces/Duration time_from_start)
@final
@dataclass
class JointTrajectoryPoint(IdlStruct, typename=_dds_name("trajectory_msgs", "JointTrajectoryPoint")):
    positions: t.sequence[t.float64] = field(default_factory=list)
    velocities: t.sequence[t.float64] = field(default_factory=list)
    accelerations: t.sequence[t.float64] = field(default_factory=list)
    effort: t.sequence[t.float64] = field(default_factory=list)
    time_from_start: Duration = field(default_factory=Duration)


# ros2/common_interfaces: trajectory_msgs/msg/JointTrajectory.msg (std_msgs/Header header,
# string[] joint_names, JointTrajectoryPoint[] points)
@final
@dataclass
class JointTrajectory(IdlStruct, typename=_dds_name("trajectory_msgs", "JointTrajectory")):
    header: Header = field(default_factory=Header)
    joint_names: t.sequence[str] = field(default_factory=list)
    points: t.sequence[JointTrajectoryPoint] = field(default_factory=list)


# --- diagnostic_msgs ----------------------------------------------------------------------------------

# ros2/common_interfaces: diagnostic_msgs/msg/KeyValue.msg (string key, string value)
@final
@dataclass
class KeyValue(IdlStruct, typename=_dds_name("diagnostic_msgs", "KeyValue")):
    key: str = ""
    value: str = ""


# ros2/common_interfaces: diagnostic_msgs/msg/DiagnosticStatus.msg (byte level, string name, string message,
# string hardware_id, KeyValue[] values; constants OK=0 WARN=1 ERROR=2 STALE=3 are not on the wire)
@final
@dataclass
class DiagnosticStatus(IdlStruct, typename=_dds_name("diagnostic_msgs", "DiagnosticStatus")):
    level: t.byte = 0
    name: str = ""
    message: str = ""
    hardware_id: str = ""
    values: t.sequence[KeyValue] = field(default_factory=list)

    OK = 0
    WARN = 1
    ERROR = 2
    STALE = 3


# ros2/common_interfaces: diagnostic_msgs/msg/DiagnosticArray.msg (std_msgs/Header header,
# DiagnosticStatus[] status)
@final
@dataclass
class DiagnosticArray(IdlStruct, typename=_dds_name("diagnostic_msgs", "DiagnosticArray")):
    header: Header = field(default_factory=Header)
    status: t.sequence[DiagnosticStatus] = field(default_factory=list)
