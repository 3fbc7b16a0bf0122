"""The service on ROS 2 topics: the ros2: config section, its start-up checks (doctor and run share them),
and `vla-edge run` closing the loop with the simulated robot over loopback DDS, the robot's side being a
small ROS 2 graph (simulator/ros2_graph.py) in this process and the service a process of its own."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge.errors import ConfigError
from edge.inference.bundle import Bundle
from edge.service import doctor, startup
from edge.service.config import config_from_dict, load_config
from edge.service.doctor import Status
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[3]
JOINTS = ["left_wheel_joint", "right_wheel_joint"]


def ros2_raw(bundle="/nonexistent/bundle", domain_id=0, **roles) -> dict:
    """A config whose camera and commands are ROS 2 topics (no camera or motor section)."""
    section = {"domain_id": domain_id, "interface_address": "127.0.0.1", "peers": ["127.0.0.1"],
               "camera": {"topic": "/camera/image_raw", "open_timeout_s": 20},
               "command": {"topic": "/joint_trajectory", "kind": "joint_trajectory", "joint_names": JOINTS},
               "telemetry": {"topic": "/joint_states"}}
    section.update(roles)
    return {"bundle": str(bundle), "ros2": {k: v for k, v in section.items() if v is not None}}


# --- the config section -----------------------------------------------------------------------------------


def test_ros2_roles_take_the_place_of_the_camera_and_motor_sections(tmp_path):
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(ros2_raw(estop={}, instruction=True, diagnostics={}, mode={})))
    config = load_config(path)
    assert config.camera is None and config.motor is None
    assert config.ros2.roles == ("camera", "instruction", "command", "telemetry", "estop", "diagnostics", "mode")
    assert config.ros2.peers == ("127.0.0.1",) and config.ros2.command.joint_names == tuple(JOINTS)
    assert config.ros2.camera.open_timeout_s == 20 and config.ros2.diagnostics.period_s == 1.0
    # Only the camera on a topic: the serial link stays, and an e-stop topic may go with it.
    mixed = config_from_dict({"bundle": "/b", "motor": {"port": "/dev/ttyACM0"},
                              "ros2": {"camera": {}, "estop": {"topic": "/robot/estop"}}})
    assert mixed.camera is None and mixed.motor.port == "/dev/ttyACM0" and mixed.ros2.estop.topic == "/robot/estop"
    assert config_from_dict({"bundle": "/b", "camera": {"source": 0}, "motor": {"port": "/dev/x"}}).ros2 is None


@pytest.mark.parametrize(("change", "message"), [
    ({"camera": {"source": 0}}, r"both camera and ros2\.camera are set"),
    ({"motor": {"port": "/dev/ttyACM0"}}, r"both motor and ros2\.command are set"),
    ({"ros2": {"camera": {}, "command": {}}}, r"ros2\.command needs ros2\.telemetry"),
    ({"ros2": {"camera": {}, "telemetry": {}}}, r"ros2\.telemetry goes with ros2\.command"),
    ({"ros2": {"command": {}, "telemetry": {}}}, r"missing required key 'camera' \(or ros2\.camera"),
    ({"ros2": {}}, r"ros2: name at least one role"),
    ({"ros2": {"camera": {}, "topics": []}}, r"unknown key\(s\) ros2\.topics"),
    ({"ros2": {"camera": {"topic": "camera image"}}}, r"ros2\.camera\.topic"),
    ({"ros2": {"domain_id": 300, "camera": {}}}, r"ros2\.domain_id"),
    ({"ros2": {"camera": {}, "command": {"kind": "wheels"}, "telemetry": {}}}, r"ros2\.command\.kind"),
])
def test_a_wrong_ros2_section_is_refused_naming_the_key(change, message):
    raw = ros2_raw()
    if "ros2" in change:
        raw["ros2"] = change["ros2"]
    else:
        raw.update(change)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


# --- the start-up checks run and doctor share -------------------------------------------------------------


def test_ros2_problems_name_the_binding_the_interface_the_topics_and_the_domain(monkeypatch):
    assert startup.ros2_problems(config_from_dict(ros2_raw()), environ={}) == []
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine.
    away = startup.ros2_problems(config_from_dict(ros2_raw(interface_address="192.0.2.1")), environ={})
    assert [(p.key, p.fatal) for p in away] == [("ros2.interface_address", True)] and "ip -4 addr" in away[0].fix
    shared = startup.ros2_problems(config_from_dict(ros2_raw(instruction={"topic": "camera/image_raw"})), environ={})
    assert [(p.key, p.fatal) for p in shared] == [("ros2.instruction.topic", True)]
    other_domain = startup.ros2_problems(config_from_dict(ros2_raw(domain_id=3)), environ={"ROS_DOMAIN_ID": "7"})
    assert [(p.key, p.fatal) for p in other_domain] == [("ros2.domain_id", False)]
    monkeypatch.setitem(sys.modules, "cyclonedds.domain", None)  # as where the binding is not installed
    missing = startup.ros2_problems(config_from_dict(ros2_raw()), environ={})
    assert [(p.key, p.fatal) for p in missing] == [("ros2", True)] and "vla-edge[ros2]" in missing[0].fix


def test_the_ros2_command_must_carry_the_policys_action(reference_bundle):
    bundle = Bundle.load(reference_bundle[0])  # two wheel velocities
    three = ros2_raw(command={"kind": "joint_trajectory", "joint_names": ["a", "b", "c"]})
    problems = startup.policy_problems(bundle, config_from_dict(three))
    assert [p.key for p in problems if p.fatal] == ["ros2.command.joint_names"]
    for fits in (ros2_raw(), ros2_raw(command={"kind": "twist"})):
        assert not [p for p in startup.policy_problems(bundle, config_from_dict(fits)) if p.fatal]


def test_doctor_checks_a_good_and_a_bad_ros2_section(reference_bundle, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(ros2_raw(reference_bundle[0], estop={}, diagnostics={})))
    results = doctor.run_checks(good, environ={})
    lines = "\n".join(r.line() for r in results)
    ros2 = [r for r in results if r.name == "ros2"]
    assert [r.status for r in ros2] == [Status.OK], lines
    assert "DDS domain 0 on 127.0.0.1" in ros2[0].message and "command /joint_trajectory" in ros2[0].message
    assert not [r for r in results if r.name in ("serial", "camera")], lines  # no device to check
    assert doctor.exit_status(results) == 0, lines

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(ros2_raw(reference_bundle[0], interface_address="192.0.2.1",
                                           command={"kind": "joint_trajectory", "joint_names": ["a", "b", "c"]})))
    results = doctor.run_checks(bad, environ={})
    failed = {(r.name, r.message.split(" ")[0]) for r in results if r.status is Status.FAIL}
    assert failed == {("ros2", "ros2.interface_address"), ("bundle", "ros2.command.joint_names")}
    assert doctor.exit_status(results) == 1


# --- vla-edge run over loopback DDS -----------------------------------------------------------------------


def test_vla_edge_run_drives_the_robot_over_ros2_topics(reference_bundle, tmp_path):
    from edge.io.camera import Camera, CameraConfig
    from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
    from edge.io.ros2 import msgs
    from edge.io.ros2.dds import QosProfile, Ros2Config, Ros2Node
    from simulator.controller import SimulatedController
    from simulator.ros2_graph import RobotGraph

    pytest.importorskip("cyclonedds", reason="the ros2 extra (cyclonedds) is not installed")
    bundle_dir = reference_bundle[0]
    threshold = Bundle.load(bundle_dir).uncertainty_threshold("cpu") * 4
    domain = random.randint(1, 200)
    raw = ros2_raw(bundle_dir, domain, instruction={}, estop={}, diagnostics={"period_s": 0.2}, mode={})
    raw.update({"policy": {"target": "cpu", "mc_samples": 8, "threads": 1},
                "uncertainty": {"threshold": threshold, "hard_ceiling": 1.0},
                "safety": {"max_slew_per_s": 4.0, "decel_per_s": 2.0}})
    config_path = tmp_path / "robot.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    controller = SimulatedController(seed=1_234_567, target="blue ball").start()
    camera = Camera(CameraConfig(source=controller.camera_url, open_timeout_s=10))
    link = SerialMotorLink(MotorLinkConfig(port=controller.link_path))
    log = tmp_path / "service.log"
    service = None
    try:
        camera.connect()
        link.connect()
        with Ros2Node(Ros2Config(domain_id=domain)) as node, RobotGraph(node, camera, link) as graph:
            instruction = node.writer("/instruction", msgs.String, QosProfile.DEFAULT)
            estop = node.writer("/estop", msgs.Bool, QosProfile.COMMAND)
            modes = node.reader("/vla_edge/mode", msgs.String, QosProfile.STATUS)
            diagnostics = node.reader("/diagnostics", msgs.DiagnosticArray, QosProfile.STATUS)
            with open(log, "wb") as out:
                service = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config_path)],
                                           cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            seen_modes: list[str] = []
            seen_status: list = []

            def read_status() -> None:
                seen_modes.extend(m.data for m in modes.take(N=16) if isinstance(m, msgs.String))
                seen_status.extend(a.status[0] for a in diagnostics.take(N=16)
                                   if isinstance(a, msgs.DiagnosticArray) and a.status)

            def up() -> bool:
                assert service.poll() is None, log.read_text()
                return instruction.get_matched_subscriptions() != [] and estop.get_matched_subscriptions() != []

            assert wait_until(up, 90.0), log.read_text()
            start = controller.ground_truth()
            instruction.write(msgs.String(start.instruction))

            def moving() -> bool:
                read_status()
                return "nominal" in seen_modes and any(any(t) for t in graph.forwarded)

            assert wait_until(moving, 30.0), (seen_modes, log.read_text())
            assert wait_until(lambda: read_status() or any(s.values and s.level == 0 for s in seen_status), 10.0)
            driving = next(s for s in seen_status if s.level == 0)
            values = {kv.key: kv.value for kv in driving.values}
            assert values["mode"] == "nominal" and values["instruction"] == start.instruction
            assert float(values["score"]) >= 0 and float(values["threshold"]) == pytest.approx(threshold, rel=1e-3)
            # A true on /estop: zeros at once (the link's latch), and the service's loop latches its e-stop.
            estop.write(msgs.Bool(True))

            def stopped() -> bool:
                read_status()
                return ("estop" in seen_modes and graph.forwarded and not any(graph.forwarded[-1])
                        and controller.ground_truth().motors_stopped)

            assert wait_until(stopped, 15.0), (seen_modes, log.read_text())
            assert wait_until(lambda: read_status() or any(s.level == 2 for s in seen_status), 10.0)
            service.send_signal(signal.SIGTERM)
            assert service.wait(timeout=30) == 0, log.read_text()
            assert wait_until(lambda: read_status() or seen_modes[-1:] == ["stopped"], 10.0), seen_modes
            assert not any(graph.forwarded[-1])  # the service left the robot with a zero command
    finally:
        if service is not None and service.poll() is None:
            service.kill()
            service.wait()
        link.disconnect()
        camera.disconnect()
        controller.stop()


# --- the adapter between the bridge's roles and the loop -------------------------------------------------


class _Latch:
    """A stand-in for Ros2EStop: a latch the topic sets and the operator's clear releases."""

    def __init__(self) -> None:
        self.is_latched = False
        self.config = type("Config", (), {"topic": "/estop"})()

    def clear(self) -> None:
        self.is_latched = False


class _Instructions:
    def __init__(self) -> None:
        self.value, self.count = None, 0
        self.config = type("Config", (), {"topic": "/instruction"})()

    def say(self, text: str) -> None:
        self.value, self.count = text, self.count + 1

    def latest(self):
        return self.value, 0.0, self.count


class _Loop:
    """Records the calls the adapter makes; its e-stop state is what a loop's status would show."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def emergency_stop(self) -> None:
        self.calls.append(("emergency_stop",))

    def set_instruction(self, text: str) -> None:
        self.calls.append(("set_instruction", text))

    def status(self) -> None:
        return None  # no status roles on the bridge: the snapshot is not published


def test_the_adapter_hands_each_estop_and_instruction_to_the_loop_once():
    from edge.service.ros2_roles import Ros2LoopAdapter

    latch, instructions, loop = _Latch(), _Instructions(), _Loop()
    bridge = type("Bridge", (), {"estop": latch, "instructions": instructions, "mode": None, "diagnostics": None})()
    adapter = Ros2LoopAdapter(bridge, loop)
    adapter.step()
    assert loop.calls == []
    latch.is_latched = True
    instructions.say("go to the red block")
    adapter.step()
    adapter.step()  # the latch was handed to the loop: no second e-stop, the same instruction not again
    assert loop.calls == [("emergency_stop",), ("set_instruction", "go to the red block")]
    assert not latch.is_latched and adapter.estops == 1 and adapter.instructions == 1
    latch.is_latched = True  # a later true on the topic latches again (after the operator's clear)
    instructions.say("go to the red block")  # the same text again is a new instruction
    adapter.step()
    assert loop.calls[2:] == [("emergency_stop",), ("set_instruction", "go to the red block")]


def test_the_demo_config_over_ros2_loads_without_camera_or_motor(tmp_path):
    from simulator.demo import write_config
    from simulator.ros2_graph import WHEEL_JOINTS

    path = tmp_path / "robot.yaml"
    write_config(path, tmp_path / "bundle", "/dev/unused", "http://unused", tmp_path / "control.sock", ros2_domain=17)
    config = load_config(path)
    assert config.camera is None and config.motor is None and config.ros2.domain_id == 17
    assert config.ros2.command.joint_names == WHEEL_JOINTS and config.ros2.command.kind == "joint_trajectory"
    assert startup.ros2_problems(config, environ={}) == []
    serial = tmp_path / "serial.yaml"
    write_config(serial, tmp_path / "bundle", "/dev/ttyACM0", "http://127.0.0.1:8080/", tmp_path / "control.sock")
    assert load_config(serial).ros2 is None and load_config(serial).motor.port == "/dev/ttyACM0"


def test_a_twist_becomes_wheel_speeds_of_the_differential_drive():
    from simulator.ros2_graph import twist_to_wheels

    assert twist_to_wheels(0.1, 0.0, 0.12, 0.25) == pytest.approx((0.4, 0.4))
    left, right = twist_to_wheels(0.0, 1.0, 0.12, 0.25)  # turning left on the spot: right wheel forward
    assert left == pytest.approx(-0.24) and right == pytest.approx(0.24)
    assert twist_to_wheels(1.0, 0.0, 0.12, 0.25) == (1.0, 1.0)  # clamped to the top wheel speed
