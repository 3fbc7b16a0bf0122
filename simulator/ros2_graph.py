"""The simulated robot behind a small ROS 2 graph, for `make demo-ros2` and the ROS 2 tests.

A robot that runs ROS 2 has a camera node and a base driver between its hardware and the graph; here
they are threads beside the simulated controller:

    simulator camera (MJPEG)  --camera node-->  sensor_msgs/Image on /camera/image_raw
    trajectory_msgs/JointTrajectory on /joint_trajectory  --base driver-->  serial SetTargets (pty)
    geometry_msgs/Twist on /cmd_vel                       --base driver-->  serial SetTargets (pty)
    serial telemetry (pty)  --base driver-->  sensor_msgs/JointState on /joint_states

The base driver talks to the simulated motor controller over its serial port, as a real base driver talks
to its microcontroller, so the controller's watchdog still stops the wheels when commands stop. A Twist
(linear x m/s, angular z rad/s) becomes wheel targets by differential-drive kinematics with the world's
wheel base and top speed. The runtime sees only the topics.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from edge.io.camera import Camera
from edge.io.motor_link import SerialMotorLink
from edge.io.ros2 import msgs
from edge.io.ros2.dds import QosProfile, Ros2Node
from reference_world.world import WorldConfig

logger = logging.getLogger(__name__)

WHEEL_JOINTS = ("left_wheel_joint", "right_wheel_joint")  # the joints of the simulated differential drive
_WORLD = WorldConfig()


@dataclass(frozen=True)
class GraphTopics:
    image: str = "/camera/image_raw"
    joint_states: str = "/joint_states"
    joint_trajectory: str = "/joint_trajectory"
    cmd_vel: str = "/cmd_vel"


def twist_to_wheels(linear_x_m_s: float, angular_z_rad_s: float, wheel_base_m: float,
                    max_wheel_speed_m_s: float) -> tuple[float, float]:
    """Differential drive: wheel speeds for a body twist, as fractions of the top wheel speed in [-1, 1]."""
    half = angular_z_rad_s * wheel_base_m / 2.0
    left, right = linear_x_m_s - half, linear_x_m_s + half
    return (float(np.clip(left / max_wheel_speed_m_s, -1.0, 1.0)),
            float(np.clip(right / max_wheel_speed_m_s, -1.0, 1.0)))


class RobotGraph:
    """The robot's camera node and base driver on ``node``: ``start()``/``stop()`` or a context manager.

    ``forwarded`` lists the wheel targets the base driver passed to the controller, in order.
    """

    def __init__(self, node: Ros2Node, camera: Camera, link: SerialMotorLink,
                 joints: tuple[str, ...] = WHEEL_JOINTS, topics: GraphTopics = GraphTopics(), *,
                 wheel_base_m: float = _WORLD.wheel_base_m,
                 max_wheel_speed_m_s: float = _WORLD.max_wheel_speed_m_s) -> None:
        self.image = node.writer(topics.image, msgs.Image, QosProfile.SENSOR)
        self.states = node.writer(topics.joint_states, msgs.JointState, QosProfile.SENSOR)
        self.trajectories = node.reader(topics.joint_trajectory, msgs.JointTrajectory, QosProfile.COMMAND)
        self.twists = node.reader(topics.cmd_vel, msgs.Twist, QosProfile.COMMAND)
        self.camera, self.link, self.joints = camera, link, list(joints)
        self.wheel_base_m, self.max_wheel_speed_m_s = wheel_base_m, max_wheel_speed_m_s
        self.forwarded: list[tuple[float, ...]] = []
        self.frames_published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ros2-robot-graph", daemon=True)

    def start(self) -> RobotGraph:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> RobotGraph:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _forward(self, targets: tuple[float, ...]) -> None:
        self.link.send_targets(targets)
        self.forwarded.append(targets)

    def _run(self) -> None:
        frames = telemetry_seen = 0
        while not self._stop.is_set():
            frame, _, count = self.camera.read_latest()
            if frame is not None and count != frames:
                frames = count
                h, w, _ = frame.shape
                self.image.write(msgs.Image(header=msgs.Header(stamp=msgs.Time.from_seconds(time.time()),
                                                               frame_id="camera"),
                                            height=h, width=w, encoding="bgr8", step=w * 3, data=frame.tobytes()))
                self.frames_published += 1
            for message in self.trajectories.take(N=8):
                if isinstance(message, msgs.JointTrajectory) and message.points:
                    self._forward(tuple(message.points[0].velocities))
            for message in self.twists.take(N=8):
                if isinstance(message, msgs.Twist):
                    self._forward(twist_to_wheels(message.linear.x, message.angular.z, self.wheel_base_m,
                                                  self.max_wheel_speed_m_s))
            telemetry, _ = self.link.latest_telemetry()
            if telemetry is not None and telemetry.seq != telemetry_seen:
                telemetry_seen = telemetry.seq
                self.states.write(msgs.JointState(header=msgs.Header(stamp=msgs.Time.from_seconds(time.time())),
                                                  name=self.joints, velocity=list(telemetry.velocities),
                                                  position=list(telemetry.positions)))
            self._stop.wait(0.005)
