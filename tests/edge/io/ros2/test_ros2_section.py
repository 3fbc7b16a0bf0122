"""The ros2: config section and the bridge it builds, end to end over loopback DDS in one process."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import yaml

pytest.importorskip("cyclonedds", reason="the ros2 extra (cyclonedds) is not installed")

from edge.errors import ConfigError  # noqa: E402
from edge.io.ros2 import bridge as bridge_module  # noqa: E402
from edge.io.ros2 import msgs  # noqa: E402
from edge.io.ros2.bridge import Ros2Bridge, Ros2Section  # noqa: E402
from edge.io.ros2.dds import QosProfile, Ros2Config, Ros2Error, Ros2Node  # noqa: E402
from edge.io.ros2.outputs import DiagnosticReport  # noqa: E402
from tests.waiting import wait_until  # noqa: E402


def section_from_yaml(text: str) -> Ros2Section:
    raw = yaml.safe_load(text)["ros2"]
    # As the service's loader passes a section: top-level lists as tuples, nested mappings as they are.
    return Ros2Section(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def test_the_documented_example_loads():
    doc = bridge_module.__doc__
    example = doc[doc.index("    ros2:"):doc.index("``Ros2Section`` validates")]
    section = section_from_yaml("\n".join(line[4:] for line in example.splitlines()))
    assert section.roles == ("camera", "instruction", "command", "telemetry", "estop", "diagnostics", "mode")
    assert section.command.max_abs == (0.5, 1.5) and section.command.kind == "twist"
    assert section.telemetry.topic == "/joint_states" and section.diagnostics.period_s == 1.0
    assert section.node == Ros2Config()


def test_roles_left_out_stay_off_and_errors_name_the_key():
    assert Ros2Section(camera=True).roles == ("camera",)
    assert Ros2Section(estop={}).estop.topic == "/estop"
    with pytest.raises(ConfigError, match=r"ros2\.camera\.fps"):
        Ros2Section(camera={"fps": 30})
    with pytest.raises(ConfigError, match=r"ros2\.estop\.topic"):
        Ros2Section(estop={"topic": "no spaces allowed"})
    with pytest.raises(ConfigError, match=r"ros2\.command must be a mapping"):
        Ros2Section(command="/cmd_vel")
    with pytest.raises(ConfigError, match=r"ros2\.domain_id"):
        Ros2Section(domain_id=-1)


def test_nodes_of_one_process_share_a_domain_only_with_the_same_network():
    domain = random.randint(1, 200)
    with Ros2Node(Ros2Config(domain_id=domain)), Ros2Node(Ros2Config(domain_id=domain)):
        with pytest.raises(Ros2Error, match="another network configuration"):
            Ros2Node(Ros2Config(domain_id=domain, allow_multicast=True)).connect()


def test_bridge_runs_every_role_against_a_ros2_graph_of_this_process():
    section = Ros2Section(domain_id=random.randint(1, 200), camera={"open_timeout_s": 10}, instruction=True,
                          command={"max_abs": [0.5, 1.0]}, estop=True, diagnostics=True, mode=True)
    graph = Ros2Node(section.node)  # the robot's other nodes
    with graph:
        image_writer = graph.writer("/camera/image_raw", msgs.Image, QosProfile.SENSOR)
        text_writer = graph.writer("/instruction", msgs.String, QosProfile.DEFAULT)
        estop_writer = graph.writer("/estop", msgs.Bool, QosProfile.COMMAND)
        commands = graph.reader("/cmd_vel", msgs.Twist, QosProfile.COMMAND)
        stop = threading.Event()

        def camera_node():
            while not stop.is_set():
                image_writer.write(msgs.Image(height=1, width=3, encoding="bgr8", step=9, data=bytes(range(9))))
                stop.wait(0.02)

        feeder = threading.Thread(target=camera_node, daemon=True)
        feeder.start()
        bridge = Ros2Bridge(section)
        try:
            with bridge:
                assert bridge.telemetry is None and bridge.is_connected
                frame, _, _ = bridge.camera.read_latest()
                np.testing.assert_array_equal(frame.reshape(-1), np.arange(9))
                assert wait_until(lambda: text_writer.get_matched_subscriptions() != [])
                text_writer.write(msgs.String("stack the blocks"))
                assert wait_until(lambda: bridge.instructions.latest()[0] == "stack the blocks")
                assert wait_until(lambda: estop_writer.get_matched_subscriptions() != [])
                estop_writer.write(msgs.Bool(True))
                assert wait_until(lambda: bridge.estop.is_latched)
                assert bridge.command.send_velocity([2.0, 0.5]).targets == (0.5, 0.5)
                sent = msgs.Twist(linear=msgs.Vector3(x=0.5), angular=msgs.Vector3(z=0.5))
                received = []
                assert wait_until(lambda: received.extend(commands.take(N=8)) or sent in received)
                assert bridge.diagnostics.publish(DiagnosticReport(0, "running"))
                assert bridge.mode.publish("hold") and not bridge.mode.publish("hold")  # only on change
                assert bridge.mode.publish("running")
                late = graph.reader("/vla_edge/mode", msgs.String, QosProfile.STATUS)  # transient local
                modes = []
                assert wait_until(lambda: modes.extend(late.take(N=4)) or modes)
                assert modes == [msgs.String("running")]
            # The last command left on the topic when the bridge stopped is a zero.
            assert wait_until(lambda: received.extend(commands.take(N=8)) or
                              (received and received[-1] == msgs.Twist()))
            assert not bridge.is_connected
        finally:
            stop.set()
            feeder.join()


def test_ros2_link_latches_the_estop_and_reads_joint_states_like_the_serial_link():
    from edge.io.ros2.link import Ros2MotorLink

    section = Ros2Section(domain_id=random.randint(1, 200), command={"max_abs": [1.0, 1.0]}, telemetry=True,
                          estop=True)
    graph = Ros2Node(section.node)
    with graph:
        commands = graph.reader("/cmd_vel", msgs.Twist, QosProfile.COMMAND)
        estop_writer = graph.writer("/estop", msgs.Bool, QosProfile.COMMAND)
        states = graph.writer("/joint_states", msgs.JointState, QosProfile.SENSOR)
        bridge = Ros2Bridge(section)
        with bridge:
            link = Ros2MotorLink(bridge.command, bridge.telemetry, bridge.estop)
            link.connect()  # the bridge connected the parts already: nothing is connected twice
            assert link.latest_telemetry() == (None, -np.inf) and link.telemetry_age_s() == np.inf
            assert wait_until(lambda: (states.write(msgs.JointState(name=["l", "r"], velocity=[0.25, -0.5]))
                                       or link.latest_telemetry()[0] is not None))
            telemetry, stamp = link.latest_telemetry()
            assert telemetry.velocities == (0.25, -0.5) and stamp > -np.inf and link.telemetry_age_s() >= 0
            assert link.send_targets([0.5, 0.5]).targets == (0.5, 0.5)
            assert link.emergency_stop().targets == (0.0, 0.0)
            assert link.send_targets([0.5, 0.5]).targets == (0.0, 0.0)  # latched: zeros, whatever is asked
            link.clear_emergency_stop()
            assert link.send_targets([0.5, 0.5]).targets == (0.5, 0.5)
            # A true on the e-stop topic latches the link the same way.
            assert wait_until(lambda: estop_writer.get_matched_subscriptions() != [])
            estop_writer.write(msgs.Bool(True))
            assert wait_until(lambda: link.is_latched)
            assert link.send_targets([0.5, 0.5]).targets == (0.0, 0.0)
            link.clear_emergency_stop()
            assert not link.is_latched
            stats = link.stats
            assert stats.commands_sent == 7 and stats.write_failures == 0 and stats.telemetry_frames >= 1
            assert stats.bad_frames == 0 and link.last_round_trip_s is None
            received = []
            assert wait_until(lambda: received.extend(commands.take(N=8)) or
                              (received and received[-1] == msgs.Twist()))  # the clear's zero
