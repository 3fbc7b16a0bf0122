"""The control loop closed over ROS 2 topics: the simulated robot's camera and motor controller sit behind
a small ROS 2 graph (a camera node republishing its frames as sensor_msgs/Image, a controller node that
takes trajectory_msgs/JointTrajectory to the serial controller and publishes sensor_msgs/JointState), and
the loop sees them only through the bridge (Ros2Camera, Ros2MotorLink), wired by edge.service.wiring."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the ros2 extra (cyclonedds) is not installed")

from edge.control.loop import Mode  # noqa: E402
from edge.inference.bundle import Bundle  # noqa: E402
from edge.io.camera import Camera  # noqa: E402
from edge.io.motor_link import SerialMotorLink  # noqa: E402
from edge.io.ros2 import msgs  # noqa: E402
from edge.io.ros2.bridge import Ros2Bridge, Ros2Section  # noqa: E402
from edge.io.ros2.dds import QosProfile, Ros2Node  # noqa: E402
from edge.io.ros2.link import Ros2MotorLink  # noqa: E402
from edge.service import wiring  # noqa: E402
from simulator.controller import SimulatedController  # noqa: E402
from tests.edge.control.closed_loop import PERIOD_S, robot_config, run_for  # noqa: E402
from tests.waiting import wait_until  # noqa: E402


class RobotGraph:
    """The robot's own ROS 2 nodes, in threads: camera -> Image, JointTrajectory -> serial, serial -> JointState."""

    def __init__(self, node: Ros2Node, camera: Camera, link: SerialMotorLink, joints: list[str]) -> None:
        self.image = node.writer("/camera/image_raw", msgs.Image, QosProfile.SENSOR)
        self.states = node.writer("/joint_states", msgs.JointState, QosProfile.SENSOR)
        self.trajectories = node.reader("/joint_trajectory", msgs.JointTrajectory, QosProfile.COMMAND)
        self.camera, self.link, self.joints = camera, link, joints
        self.forwarded: list[tuple[float, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RobotGraph:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        frames = telemetry_seen = 0
        while not self._stop.is_set():
            frame, _, count = self.camera.read_latest()
            if frame is not None and count != frames:
                frames = count
                h, w, _ = frame.shape
                self.image.write(msgs.Image(header=msgs.Header(stamp=msgs.Time.from_seconds(time.time())),
                                            height=h, width=w, encoding="bgr8", step=w * 3, data=frame.tobytes()))
            for message in self.trajectories.take(N=8):
                if isinstance(message, msgs.JointTrajectory) and message.points:
                    velocities = tuple(message.points[0].velocities)
                    self.link.send_targets(velocities)
                    self.forwarded.append(velocities)
            telemetry, _ = self.link.latest_telemetry()
            if telemetry is not None and telemetry.seq != telemetry_seen:
                telemetry_seen = telemetry.seq
                self.states.write(msgs.JointState(header=msgs.Header(stamp=msgs.Time.from_seconds(time.time())),
                                                  name=self.joints, velocity=list(telemetry.velocities),
                                                  position=list(telemetry.positions)))
            self._stop.wait(0.005)


def test_policy_drives_the_robot_over_ros2_topics_and_the_estop_topic_stops_it(reference_bundle):
    bundle_dir = reference_bundle[0]
    bundle = Bundle.load(bundle_dir)
    joints = [f"joint{i}" for i in range(int(bundle.action["dim"]))]  # as many as the policy commands
    controller = SimulatedController(seed=1_234_567, target="blue ball").start()
    threshold = bundle.uncertainty_threshold("cpu") * 4
    config = robot_config(bundle_dir, controller, {"threshold": threshold, "hard_ceiling": 1.0})
    section = Ros2Section(domain_id=random.randint(1, 200), camera={"open_timeout_s": 10},
                          command={"topic": "/joint_trajectory", "kind": "joint_trajectory",
                                   "joint_names": joints, "time_from_start_s": PERIOD_S},
                          telemetry=True, estop=True)
    sim_camera, sim_link = Camera(config.camera), SerialMotorLink(config.motor)
    pipeline = wiring.build_pipeline(bundle, config)
    graph_node = Ros2Node(section.node)
    try:
        sim_camera.connect()
        sim_link.connect()
        pipeline.activate()
        with graph_node, RobotGraph(graph_node, sim_camera, sim_link, joints) as graph, Ros2Bridge(section) as bridge:
            link = Ros2MotorLink(bridge.command, bridge.telemetry, bridge.estop)
            loop = wiring.build_loop(pipeline, bridge.camera, link, bundle, config)
            start = controller.ground_truth()
            loop.set_instruction(start.instruction)
            run_for(loop, 20.0, until=lambda: controller.ground_truth().success)
            truth = controller.ground_truth()
            records = loop.recorder.latest()
            assert (records["mode"] == Mode.NOMINAL).sum() > 5
            assert records["delivered"].all()
            assert truth.success or truth.distance_to_target_m < 0.5 * start.distance_to_target_m
            assert link.telemetry_age_s() < np.inf and not truth.watchdog_tripped
            # A true on /estop latches the bridge's link: the robot gets zeros and stops.
            estop = graph_node.writer("/estop", msgs.Bool, QosProfile.COMMAND)
            assert wait_until(lambda: estop.get_matched_subscriptions() != [])
            estop.write(msgs.Bool(True))
            assert wait_until(lambda: link.is_latched)
            loop.set_instruction(start.instruction)
            run_for(loop, 3.0, until=lambda: controller.ground_truth().motors_stopped and len(graph.forwarded) > 3
                 and not any(graph.forwarded[-1]))
            assert not any(graph.forwarded[-1]) and controller.ground_truth().motors_stopped
    finally:
        pipeline.close()
        sim_link.disconnect()
        sim_camera.disconnect()
        controller.stop()
