"""The start-up check of the controller's Capabilities against the bundle's action spec
(edge/service/startup.py; docs/serial-protocol.md, section 6a, rules 14 and 17), against the simulated
controller on a real pty: what `vla-edge run` calls once the link is open, before the first command."""

from __future__ import annotations

import pytest

from edge.errors import ConfigError
from edge.inference.spec import ActionSpec
from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
from edge.io.protocol import Capabilities, ChannelCapability
from edge.service.startup import capabilities_problems, controller_problems, raise_if_fatal
from simulator.channels import ChannelLayout
from simulator.controller import SimulatedController

V, P = "velocity", "position"


def action(kinds, low=None, high=None) -> ActionSpec:
    n = len(kinds)
    return ActionSpec.from_dict({"names": [f"joint{i}" for i in range(n)], "kinds": list(kinds),
                                 "low": list(low or [-1.0] * n), "high": list(high or [1.0] * n),
                                 "max_slew_per_s": [1.0] * n}, "spec.action")


def capabilities(*channels: ChannelCapability) -> Capabilities:
    return Capabilities(seq=1, firmware_version=(2, 0, 0), channels=channels, watchdog_timeout_ms=300,
                        telemetry_period_ms=20)


ARM = capabilities(ChannelCapability((P,), -2.0, 2.0), ChannelCapability((P,), -1.0, 1.0),
                   ChannelCapability((V, P), 0.0, 0.08))


def test_a_controller_that_carries_the_action_has_no_problem():
    assert capabilities_problems(ARM, action([P, P, P], [-2.0, -0.5, 0.0], [2.0, 0.5, 0.08])) == []
    assert capabilities_problems(ARM, action([P, P, V], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0])) == []


def test_every_mismatch_is_named_by_channel():
    count = capabilities_problems(ARM, action([V, V]))
    assert len(count) == 1 and "3 channel(s)" in count[0].message and "has 2 (joint0, joint1)" in count[0].message
    problems = capabilities_problems(ARM, action([V, P, P], [-1.0, -1.5, 0.0], [1.0, 1.0, 0.1]))
    messages = [p.message for p in problems]
    assert len(messages) == 3 and all(p.fatal and p.fix for p in problems)
    assert "channel 0 (joint0): the policy commands a velocity, the controller supports only position" in messages[0]
    assert "channel 1 (joint1)" in messages[1] and "[-1.5, 1]" in messages[1] and "[-1, 1]" in messages[1]
    assert "channel 2 (joint2)" in messages[2] and "[0, 0.1]" in messages[2] and "[0, 0.08]" in messages[2]
    with pytest.raises(ConfigError) as caught:
        raise_if_fatal(problems)  # run's exit 78
    assert all(m in str(caught.value) for m in messages)


def test_the_check_runs_against_a_connected_link_and_the_simulated_arm():
    layout = ChannelLayout(kinds=(P, P, V), position_limits=((-2.0, 2.0), (-1.0, 1.0), (0.0, 0.0)))
    with SimulatedController(seed=3, layout=layout) as sim:
        config = MotorLinkConfig(port=sim.link_path, channels=3, kinds=(P, P, V), reconnect_backoff_s=(0.02, 0.1))
        with SerialMotorLink(config) as link:
            assert controller_problems(link, action([P, P, V], [-2.0, -1.0, -1.0], [2.0, 1.0, 1.0])) == []
            wide = controller_problems(link, action([P, P, V], [-3.0, -1.0, -1.0], [2.0, 1.0, 1.0]))
            assert [p.message.split(":")[0] for p in wide] == ["channel 0 (joint0)"]


def test_a_v1_controller_is_refused_with_what_to_flash():
    with SimulatedController(seed=3, protocol_version=1) as sim:
        with SerialMotorLink(MotorLinkConfig(port=sim.link_path, reconnect_backoff_s=(0.02, 0.1))) as link:
            problems = controller_problems(link, action([V, V]), timeout_s=1.0)
            assert not link.send_targets([0.5, 0.5]).delivered  # never arms
            truth = sim.ground_truth()
    assert len(problems) == 1 and problems[0].fatal
    text = problems[0].text()
    assert "speaks serial protocol v1; this runtime speaks v2 only" in text
    assert "flash firmware that implements protocol v2" in text
    assert truth.last_valid_command_s is None and truth.applied_targets == (0.0, 0.0)
    assert truth.rejections["rejected_framing"] >= 1  # it dropped our v2 frames at its version check


def test_no_answer_at_all_is_named():
    link = SerialMotorLink(MotorLinkConfig(port="loop://", reconnect_backoff_s=(0.02, 0.1)))
    with link:  # a loopback: our GetCapabilities come back, nobody answers
        problems = controller_problems(link, action([V, V]), timeout_s=0.3)
    assert len(problems) == 1
    assert "no capabilities within 0.3 s" in problems[0].message
    assert "did not answer GetCapabilities" in problems[0].message
