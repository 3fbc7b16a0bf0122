"""The policy spec: every shape a user may bring round-trips, and every bad field is named."""

from __future__ import annotations

import pytest

from edge.errors import ConfigError
from edge.inference.spec import PolicySpec


def arm_spec(**changes):
    raw = {
        "name": "arm-7dof",
        "cameras": [{"name": "wrist", "height": 96, "width": 96}, {"name": "scene", "height": 192, "width": 256,
                                                                    "channel_order": "rgb"}],
        "language": None,
        "proprio": {"names": [f"j{i}" for i in range(7)], "sources": [f"positions[{i}]" for i in range(7)]},
        "action": {"names": [f"j{i}" for i in range(6)] + ["gripper"], "horizon": 8,
                   "kinds": ["position"] * 7, "low": [-3.0] * 7, "high": [3.0] * 7, "max_slew_per_s": [1.5] * 7},
        "dropout_rate": 0.1,
    }
    raw.update(changes)
    return raw


def test_a_seven_dof_chunking_policy_with_two_cameras_and_no_language_round_trips():
    spec = PolicySpec.from_dict(arm_spec())
    assert spec.action.dim == 7 and spec.action.horizon == 8 and spec.language is None
    assert [c.name for c in spec.cameras] == ["wrist", "scene"] and spec.cameras[1].channel_order == "rgb"
    assert spec.camera_input(spec.cameras[0]) == "image_wrist"
    assert spec.proprio.dim == 7 and spec.proprio.sources[3] == ("positions", 3)
    assert PolicySpec.from_dict(spec.to_dict()) == spec


def test_one_camera_is_the_graph_input_image_and_defaults_fill_in():
    spec = PolicySpec.from_dict({
        "name": "mobile", "cameras": [{"name": "front", "height": 224, "width": 224}],
        "language": {"tokenizer": "tokenizer.json", "max_tokens": 32},
        "action": {"names": ["left", "right"], "low": [-1, -1], "high": [1, 1], "max_slew_per_s": [4, 4]}})
    assert spec.camera_input(spec.cameras[0]) == "image"
    assert spec.action.kinds == ("velocity", "velocity") and spec.action.horizon == 1
    assert spec.proprio.dim == 0 and spec.dropout_rate is None and spec.cameras[0].channel_order == "bgr"


@pytest.mark.parametrize("changes, message", [
    ({"cameras": []}, "spec.cameras must have at least one entry"),
    ({"cameras": [{"name": "a", "height": 4, "width": 96}]}, r"spec.cameras\[0\].height must be an integer"),
    ({"cameras": [{"name": "a", "height": 96, "width": 96}] * 2}, "distinct names"),
    ({"dropout_rate": 1.0}, "dropout_rate must be below 1"),
    ({"proprio": {"names": ["a"], "sources": ["torques[0]"]}}, r"spec.proprio.sources\[0\] must be velocities"),
    ({"proprio": {"names": ["a", "b"], "sources": ["positions[0]"]}}, "spec.proprio.sources must have 2 entries"),
    ({"language": {"tokenizer": "t.json"}}, "missing key.*spec.language.max_tokens"),
    ({"colour": "red"}, "unknown key.*spec.colour"),
])
def test_a_bad_field_is_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        PolicySpec.from_dict(arm_spec(**changes))


@pytest.mark.parametrize("action, message", [
    ({"kinds": ["torque"] * 7}, r"spec.action.kinds\[0\] must be one of"),
    ({"low": [3.0] * 7}, r"spec.action.low\[0\] must be below spec.action.high\[0\]"),
    ({"max_slew_per_s": ["fast"] * 7}, r"spec.action.max_slew_per_s\[0\] must be a number"),
    ({"high": [1.0] * 6}, "spec.action.high must have 7 entries"),
    ({"horizon": 0}, "spec.action.horizon must be an integer"),
])
def test_a_bad_action_field_is_named(action, message):
    raw = arm_spec()
    raw["action"] = {**raw["action"], **action}
    with pytest.raises(ConfigError, match=message):
        PolicySpec.from_dict(raw)


def test_the_documented_yaml_example_loads():
    import yaml

    from edge.inference import spec as module

    doc = module.__doc__
    example = doc[doc.index("form::") + len("form::"):doc.index("Every field is checked")]
    spec = PolicySpec.from_dict(yaml.safe_load(example))
    assert spec.action.dim == 2 and spec.proprio.sources == (("velocities", 0), ("velocities", 1))


def test_proprio_is_filled_from_the_telemetry_fields_the_spec_names():
    import numpy as np

    from edge.errors import InputError
    from edge.inference.spec import ProprioSpec

    spec = ProprioSpec.from_dict({"names": ["grip_pos", "j0_vel", "j0_pos", "j2_vel"],
                                  "sources": ["positions[6]", "velocities[0]", "positions[0]", "velocities[2]"]},
                                 "spec.proprio")
    out = np.full(4, np.nan, np.float32)
    positions = np.arange(7, dtype=np.float32) / 10  # 0.0 .. 0.6
    velocities = -np.arange(7, dtype=np.float32)
    assert spec.fill(out, velocities, positions) is True
    np.testing.assert_allclose(out, [0.6, -0.0, 0.0, -2.0])
    assert spec.fill(out, velocities, positions[:6]) is False  # positions[6] missing from a 6-channel sample
    assert spec.fill(out, None, positions) is False  # a sample without velocities
    with pytest.raises(InputError, match=r"proprio buffer has 3 values; the policy's proprio has 4 \(grip_pos"):
        spec.fill(np.zeros(3, np.float32), velocities, positions)
    empty = ProprioSpec()
    assert empty.fill(np.zeros(0, np.float32), velocities, None) is True  # nothing to read
