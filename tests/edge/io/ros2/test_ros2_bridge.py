"""The ROS 2 bridge over loopback DDS: wire encoding, QoS, and a second process publishing to the roles."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the ros2 extra (cyclonedds) is not installed")

from cyclonedds.idl import IdlStruct  # noqa: E402

from edge.errors import CameraError, ConfigError, InputError  # noqa: E402
from edge.io.ros2 import msgs  # noqa: E402
from edge.io.ros2.dds import QosProfile, Ros2Config, Ros2Node, cyclone_config_xml, dds_topic_name  # noqa: E402
from edge.io.ros2.outputs import (  # noqa: E402
    DiagnosticReport,
    Ros2CommandConfig,
    Ros2CommandSink,
    Ros2Diagnostics,
    Ros2DiagnosticsConfig,  # noqa: E402
)
from edge.io.ros2.sources import (  # noqa: E402
    Ros2Camera,
    Ros2CameraConfig,
    Ros2EStop,
    Ros2InstructionSource,
    Ros2TopicConfig,
    decode_image,
    stamp_to_monotonic,
)
from tests.waiting import wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[4]
PEER = Path(__file__).with_name("peer.py")


def free_domain() -> int:
    # Other test runs may share this machine's loopback: a random domain keeps their graphs apart.
    return random.randint(1, 200)


# --- encoding -----------------------------------------------------------------------------------------

def test_type_and_topic_names_follow_ros2_dds_naming():
    assert msgs.String.__idl_typename__ == "std_msgs::msg::dds_::String_"
    assert msgs.Image.__idl_typename__ == "sensor_msgs::msg::dds_::Image_"
    assert msgs.JointTrajectoryPoint.__idl_typename__ == "trajectory_msgs::msg::dds_::JointTrajectoryPoint_"
    assert msgs.DiagnosticArray.__idl_typename__ == "diagnostic_msgs::msg::dds_::DiagnosticArray_"
    assert dds_topic_name("/camera/image_raw") == "rt/camera/image_raw"
    assert dds_topic_name("cmd_vel") == "rt/cmd_vel"


def test_fast_image_encoding_is_the_same_cdr_as_the_sequence_declaration():
    data = bytes(range(7)) * 3
    fast = msgs.Image(header=msgs.Header(stamp=msgs.Time(5, 6), frame_id="cam"), height=3, width=7,
                      encoding="mono8", step=7, data=data)
    # The binding's own encoder for the declared sequence<uint8> (a list of ints, packed one by one).
    declared = msgs.Image(fast.header, 3, 7, "mono8", 0, 7, list(data))
    assert fast.serialize() == IdlStruct.serialize(declared)
    assert fast.serialize()[:4] == b"\x00\x01\x00\x00"  # XCDR1 little-endian encapsulation (CDR_LE)
    back = msgs.Image.deserialize(fast.serialize())
    assert back.data == data and back.header.frame_id == "cam" and back.header.stamp == msgs.Time(5, 6)
    compressed = msgs.CompressedImage(format="jpeg", data=b"\xff\xd8xyz")
    assert compressed.serialize() == IdlStruct.serialize(msgs.CompressedImage(format="jpeg", data=list(b"\xff\xd8xyz")))


def test_plain_cdr_layout_of_a_string_matches_the_cdr_rules():
    # CDR: uint32 length including the terminating NUL, then the bytes and the NUL.
    assert msgs.String(data="hi").serialize() == b"\x00\x01\x00\x00" + b"\x03\x00\x00\x00hi\x00"


def test_image_decoding_handles_encodings_and_row_padding():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = rgb.reshape(2, 9)
    bgr = decode_image(msgs.Image(height=2, width=3, encoding="rgb8", step=12, data=padded.tobytes()))
    np.testing.assert_array_equal(bgr, rgb[..., ::-1])
    with pytest.raises(InputError, match="encoding '16UC1'"):
        decode_image(msgs.Image(height=2, width=3, encoding="16UC1", step=6, data=bytes(12)))
    with pytest.raises(InputError, match="step"):
        decode_image(msgs.Image(height=2, width=3, encoding="bgr8", step=9, data=bytes(10)))


def test_header_stamps_map_onto_the_monotonic_clock_never_into_the_future():
    assert stamp_to_monotonic(99.5, now_wall_s=100.0, now_mono_s=10.0) == pytest.approx(9.5)
    assert stamp_to_monotonic(101.0, now_wall_s=100.0, now_mono_s=10.0) == 10.0  # clocks apart
    assert stamp_to_monotonic(0.0, now_wall_s=100.0, now_mono_s=10.0) == 10.0  # unset stamp


def test_config_refuses_bad_values_naming_the_key():
    with pytest.raises(ConfigError, match="ros2.domain_id"):
        Ros2Config(domain_id=233)
    with pytest.raises(ConfigError, match="ros2.peers"):
        Ros2Config(peers=("localhost:7400",))
    with pytest.raises(ConfigError, match="ros2.camera.topic"):
        Ros2CameraConfig(topic="/camera/9bad")
    with pytest.raises(ConfigError, match="joint_names"):
        Ros2CommandConfig(kind="joint_trajectory")
    xml = cyclone_config_xml(Ros2Config(domain_id=3))
    assert '<NetworkInterface address="127.0.0.1"/>' in xml and "<AllowMulticast>false</AllowMulticast>" in xml
    assert '<Peer address="127.0.0.1"/>' in xml


def test_qos_profiles_state_every_policy_ros2_users_expect():
    from cyclonedds.core import Policy
    from cyclonedds.util import duration

    from edge.io.ros2.dds import make_qos

    reliable = Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=100))
    expected = {  # (reliability, durability, history) per profile
        QosProfile.SENSOR: (Policy.Reliability.BestEffort, Policy.Durability.Volatile, Policy.History.KeepLast(1)),
        QosProfile.COMMAND: (reliable, Policy.Durability.Volatile, Policy.History.KeepLast(1)),
        QosProfile.STATUS: (reliable, Policy.Durability.TransientLocal, Policy.History.KeepLast(1)),
        QosProfile.DEFAULT: (reliable, Policy.Durability.Volatile, Policy.History.KeepLast(10)),
    }
    for profile, (reliability, durability, history) in expected.items():
        qos = make_qos(profile)
        assert (qos[Policy.Reliability], qos[Policy.Durability], qos[Policy.History]) == \
            (reliability, durability, history), profile
        assert qos[Policy.DataRepresentation] == Policy.DataRepresentation(use_cdrv0_representation=True)


# --- over loopback DDS --------------------------------------------------------------------------------

@pytest.fixture
def node():
    with Ros2Node(Ros2Config(domain_id=free_domain())) as n:
        yield n


def test_second_process_feeds_camera_and_instruction_and_receives_commands(node):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    peer = subprocess.Popen([sys.executable, str(PEER), str(node.config.domain_id)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: [lines.append(json.loads(line)) for line in peer.stdout],
                              daemon=True)
    reader.start()
    try:
        camera = Ros2Camera(node, Ros2CameraConfig(topic="/camera/image_raw", open_timeout_s=10))
        instructions = Ros2InstructionSource(node, Ros2TopicConfig("/instruction"))
        sink = Ros2CommandSink(node, Ros2CommandConfig(topic="/cmd_vel", max_abs=(0.5, 2.0)))
        with camera, instructions, sink:
            assert camera.frame_shape == (48, 64, 3)
            out = np.empty(camera.frame_shape, np.uint8)
            stamp, count = camera.read_into(out)
            assert count >= 1 and camera.frame_age_s() >= 0
            # The peer's pattern in BGR: blue = counter, green = row, red = column.
            np.testing.assert_array_equal(out[..., 2], np.tile(np.arange(64, dtype=np.uint8), (48, 1)))
            np.testing.assert_array_equal(out[..., 1], np.tile(np.arange(48, dtype=np.uint8)[:, None], (1, 64)))
            assert wait_until(lambda: instructions.latest()[0] == "pick up the red cube")
            sent = sink.send_velocity([0.9, -0.25])
            assert sent.targets == (0.5, -0.25) and sent.delivered
            assert wait_until(lambda: {"linear_x": 0.5, "angular_z": -0.25} in lines)
            assert wait_until(lambda: camera.read_into(out)[1] > count)  # frames keep coming
        # disconnect leaves a stop command
        assert wait_until(lambda: lines and lines[-1] == {"linear_x": 0.0, "angular_z": 0.0})
    finally:
        peer.stdin.close()
        peer.wait(timeout=10)
    assert peer.returncode == 0


def test_estop_latches_and_diagnostics_reach_a_late_subscriber(node):
    estop = Ros2EStop(node, Ros2TopicConfig("/estop"))
    clock = [0.0]
    diagnostics = Ros2Diagnostics(node, Ros2DiagnosticsConfig(), clock=lambda: clock[0])
    with estop:
        writer = node.writer("/estop", msgs.Bool, QosProfile.COMMAND)
        assert wait_until(lambda: writer.get_matched_subscriptions() != [])
        writer.write(msgs.Bool(data=True))
        assert wait_until(lambda: estop.is_latched)
        writer.write(msgs.Bool(data=False))
        assert wait_until(lambda: estop.latest()[2] == 2)
        assert estop.is_latched  # a False never clears the latch
        estop.clear()
        assert not estop.is_latched
    diagnostics.connect()
    assert diagnostics.publish(DiagnosticReport(1, "held: uncertain", {"mode": "hold"}))
    assert not diagnostics.publish(DiagnosticReport(0, "running"))  # within the 1 s period
    clock[0] = 1.0
    assert diagnostics.publish(DiagnosticReport(2, "stopped", {"mode": "stop", "score": "0.9"}))
    # Transient local: a reader that joins after the write still gets the newest status.
    late = node.reader("/diagnostics", msgs.DiagnosticArray, QosProfile.STATUS)
    received = []
    assert wait_until(lambda: received.extend(late.take(N=4)) or received)
    status = received[-1].status[0]
    assert (status.level, status.message) == (2, "stopped")
    assert {kv.key: kv.value for kv in status.values} == {"mode": "stop", "score": "0.9"}


def _feed(writer, message, stop: threading.Event) -> threading.Thread:
    """Publish ``message`` every 20 ms until ``stop`` (a camera publishes continuously too)."""
    def run():
        while not stop.is_set():
            writer.write(message)
            stop.wait(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_compressed_camera_decodes_jpeg_and_refuses_a_corrupt_frame(node):
    import cv2

    bgr = np.zeros((24, 32, 3), np.uint8)
    bgr[:, :16] = (255, 0, 0)  # left half blue, right half red: survives jpeg
    bgr[:, 16:] = (0, 0, 255)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    writer = node.writer("/camera/image_raw/compressed", msgs.CompressedImage, QosProfile.SENSOR)
    camera = Ros2Camera(node, Ros2CameraConfig(topic="/camera/image_raw/compressed", compressed=True,
                                               open_timeout_s=10))
    stop = threading.Event()
    bad = msgs.CompressedImage(format="jpeg", data=b"not a jpeg")
    feeder = _feed(writer, bad, stop)
    try:
        refusing = Ros2Camera(node, Ros2CameraConfig(topic="/camera/image_raw/compressed", compressed=True,
                                                     open_timeout_s=0.5))
        with pytest.raises(CameraError, match="no CompressedImage"):
            refusing.connect()
        assert refusing.open_failures == 1 and refusing.read_failures > 0 and refusing.frame_shape is None
        stop.set()
        feeder.join()
        stop.clear()
        feeder = _feed(writer, msgs.CompressedImage(format="jpeg", data=jpeg.tobytes()), stop)
        with camera:
            frame, _, _ = camera.read_latest()
            assert frame.shape == (24, 32, 3)
            assert frame[12, 4, 0] > 200 and frame[12, 4, 2] < 60  # blue stays blue (BGR kept)
            assert frame[12, 28, 2] > 200 and frame[12, 28, 0] < 60
            with pytest.raises(InputError, match="allocate it from frame_shape"):
                camera.read_into(np.empty((2, 2, 3), np.uint8))
    finally:
        stop.set()
        feeder.join()


def test_joint_states_in_and_joint_trajectory_out(node):
    from edge.io.ros2.sources import Ros2JointStateSource

    states = Ros2JointStateSource(node, Ros2TopicConfig("/joint_states"))
    config = Ros2CommandConfig(topic="/arm/joint_trajectory", kind="joint_trajectory",
                               joint_names=("shoulder", "elbow", "wrist"), max_abs=(1.0, 1.0, 0.5),
                               time_from_start_s=0.1)
    sink = Ros2CommandSink(node, config)
    downstream = node.reader("/arm/joint_trajectory", msgs.JointTrajectory, QosProfile.COMMAND)
    writer = node.writer("/joint_states", msgs.JointState, QosProfile.SENSOR)
    stop = threading.Event()
    with states, sink:
        feeder = _feed(writer, msgs.JointState(name=["shoulder", "elbow"], position=[0.1, -0.2],
                                               velocity=[0.0, 0.5], effort=[]), stop)
        try:
            assert wait_until(lambda: states.latest()[0] is not None)
        finally:
            stop.set()
            feeder.join()
        sample = states.latest()[0]
        assert sample.names == ("shoulder", "elbow") and sample.position == (0.1, -0.2)
        assert states.telemetry_age_s() >= 0  # unset stamp: counted from receipt
        with pytest.raises(InputError, match="takes 3"):
            sink.send_velocity([0.1, 0.2])
        sent = sink.send_velocity([0.3, -2.0, float("nan")])
        assert sent.targets == (0.0, 0.0, 0.0)  # a NaN anywhere: a stop, never NaN on the wire
        sent = sink.send_velocity([0.3, -2.0, 0.9])
        assert sent.targets == (0.3, -1.0, 0.5) and sent.delivered
        received = []
        assert wait_until(lambda: received.extend(downstream.take(N=8)) or
                          any(m.points and m.points[0].velocities == [0.3, -1.0, 0.5] for m in received))
        message = received[-1]
        assert message.joint_names == ["shoulder", "elbow", "wrist"]
        assert (message.points[0].time_from_start.sec, message.points[0].time_from_start.nanosec) == (0, 100_000_000)


def test_camera_reports_a_stalled_stream_and_counts_its_return(node):
    writer = node.writer("/cam", msgs.Image, QosProfile.SENSOR)
    image = msgs.Image(height=2, width=2, encoding="mono8", step=2, data=bytes([1, 2, 3, 4]))
    camera = Ros2Camera(node, Ros2CameraConfig(topic="/cam", open_timeout_s=10, stale_after_s=0.2))
    stop = threading.Event()
    feeder = _feed(writer, image, stop)
    try:
        with camera:
            assert camera.is_streaming and camera.reconnects == 0
            stop.set()
            feeder.join()
            assert wait_until(lambda: not camera.is_streaming)  # the publisher went quiet
            age = camera.frame_age_s()
            assert camera.frame_age_s() >= age  # the last frame stays readable and ages
            stop.clear()
            feeder = _feed(writer, image, stop)
            assert wait_until(lambda: camera.is_streaming)
            assert camera.reconnects == 1
            frame, _, _ = camera.read_latest()
            np.testing.assert_array_equal(frame[..., 0], [[1, 2], [3, 4]])  # mono8 spread to BGR
    finally:
        stop.set()
        feeder.join()


def test_an_interface_that_is_not_on_this_machine_is_a_clear_error():
    from edge.io.ros2.dds import Ros2Error

    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never a local address, and nothing is sent to it.
    node = Ros2Node(Ros2Config(domain_id=free_domain(), interface_address="192.0.2.1"))
    with pytest.raises(Ros2Error, match=r"ros2.interface_address .*ip -4 addr"):
        node.connect()
    assert not node.is_connected
    with pytest.raises(Ros2Error, match="not connected"):
        node.writer("/cmd_vel", msgs.Twist, QosProfile.COMMAND)


def test_without_the_binding_the_error_names_the_extra(monkeypatch):
    from edge.io.ros2.dds import Ros2Error, require_cyclonedds

    monkeypatch.setitem(sys.modules, "cyclonedds", None)  # what `import cyclonedds` sees when it is absent
    with pytest.raises(Ros2Error, match=r"vla-edge\[ros2\]"):
        require_cyclonedds()
