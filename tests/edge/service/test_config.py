"""The robot config: the shipped example loads, documents every option, and bad values name their key."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from edge.errors import ConfigError
from edge.io.camera import SourceKind
from edge.service.config import (
    _SECTIONS,
    FROM_BUNDLE,
    ChunkConfig,
    RobotConfig,
    config_from_dict,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "systemd" / "robot.example.yaml"


@pytest.fixture(scope="module")
def example_raw() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def section_fields(name: str, cls) -> tuple[dataclasses.Field, ...]:
    """The keys of one section: its dataclass's fields; the policy section also holds the chunk keys."""
    fields = dataclasses.fields(cls) + (dataclasses.fields(ChunkConfig) if name == "policy" else ())
    return tuple(f for f in fields if f.name not in FROM_BUNDLE.get(name, {}))


def write_config(tmp_path: Path, raw) -> Path:
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def load_modified(tmp_path: Path, example_raw: dict, section: str, key: str, value) -> RobotConfig:
    raw = copy.deepcopy(example_raw)
    raw[section][key] = value
    return load_config(write_config(tmp_path, raw))


# --- the example -----------------------------------------------------------------------------------------

def test_example_loads_for_a_jetson_with_csi_camera_and_usb_motor_controller():
    config = load_config(EXAMPLE)
    assert config.bundle == "/var/lib/vla-edge/bundle"
    assert config.camera.source_kind is SourceKind.GSTREAMER
    assert config.camera.source.startswith("nvarguscamerasrc ") and config.camera.source.endswith(" sync=false")
    assert "appsink" in config.camera.source and "\n" not in config.camera.source
    assert config.motor.port == "/dev/vla-motor"
    assert config.instruction.socket == "/run/vla-edge/control.sock"
    assert config.loop.period_s == pytest.approx(0.1)
    assert (config.policy.target, config.policy.backend) == ("tensorrt", "tensorrt")
    assert config.camera.reconnect_backoff_s == (0.2, 2.0)  # YAML list -> the dataclass's tuple


def test_example_sets_every_option_of_every_section(example_raw):
    assert set(example_raw) == {"bundle", *_SECTIONS}
    for name, cls in _SECTIONS.items():
        fields = {f.name for f in section_fields(name, cls)}
        assert set(example_raw[name]) == fields, f"section {name}: example differs from {cls.__name__}"


def test_example_keeps_the_defaults_where_it_does_not_mean_to_differ(example_raw):
    # A changed default in the code must not be silently contradicted by a stale example.
    intended = {("policy", "target"), ("policy", "backend"), ("instruction", "socket")}
    for name, cls in _SECTIONS.items():
        for f in section_fields(name, cls):
            if f.default is dataclasses.MISSING or (name, f.name) in intended:
                continue
            value = example_raw[name][f.name]
            value = tuple(value) if isinstance(value, list) else value
            assert value == f.default, f"{name}.{f.name}: example {value!r}, default {f.default!r}"


def example_option_docs() -> dict[str, str]:
    """Each option line of the example with the comment block directly above it ("" when none)."""
    docs: dict[str, str] = {}
    section = ""
    comment: list[str] = []
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        header = re.match(r"^([a-z_]+):\s*$", line)
        key = re.match(r"^(?: {2})?([a-z_]+):", line)
        if not stripped:
            comment = []
        elif stripped.startswith("#"):
            comment.append(stripped)
        elif header:
            section, comment = header.group(1), []
        elif key:
            name = key.group(1)
            docs[f"{section}.{name}" if line.startswith(" ") else name] = " ".join(comment)
            comment = []
    return docs


def test_every_option_in_the_example_is_commented_with_its_default_or_required():
    docs = example_option_docs()
    expected = {"bundle"} | {f"{name}.{f.name}" for name, cls in _SECTIONS.items() for f in section_fields(name, cls)}
    assert set(docs) == expected
    undocumented = [key for key, doc in docs.items() if not doc]
    assert undocumented == []
    no_default = [key for key, doc in docs.items() if "Default" not in doc and "Required" not in doc]
    assert no_default == []


def test_commented_usb_camera_alternative_loads(example_raw):
    text = EXAMPLE.read_text()
    alternative = "\n".join(m.group(1) for m in re.finditer(r"^ {2}#([a-z_]+: .*)$", text, flags=re.M))
    usb = yaml.safe_load(alternative)
    assert set(usb) == {"source", "width_px", "height_px", "fps", "backend"}
    raw = copy.deepcopy(example_raw)
    raw["camera"].update(usb)
    config = config_from_dict(raw)
    assert config.camera.source_kind is SourceKind.V4L2_DEVICE
    assert (config.camera.width_px, config.camera.height_px, config.camera.backend) == (640, 480, "v4l2")


# --- validation errors name the key and its range -----------------------------------------------------------

@pytest.mark.parametrize(("section", "key", "value", "fragments"), [
    ("loop", "rate_hz", 500, ["loop.rate_hz", "[1.0, 200.0] Hz", "500"]),
    ("loop", "rate_hz", 0.5, ["loop.rate_hz", "[1.0, 200.0]"]),
    ("loop", "rate_hz", "fast", ["loop.rate_hz", "a number"]),
    ("loop", "record_ticks", 5, ["loop.record_ticks", "an integer in [10, 1000000]"]),
    ("policy", "target", "gpu", ["policy.target", "'cpu', 'cpu-fp32', 'cpu-qoperator', 'cpu-reduce-range', 'tensorrt', 'fp16'", "'gpu'"]),
    ("policy", "backend", "pytorch", ["policy.backend", "'onnxruntime', 'tensorrt'"]),
    ("policy", "mc_samples", 0, ["policy.mc_samples", "[1, 256]"]),
    ("policy", "threads", True, ["policy.threads", "integer"]),
    ("uncertainty", "enter_ticks", 0, ["uncertainty.enter_ticks", "[1, 100]"]),
    ("uncertainty", "threshold", -1.0, ["uncertainty.threshold", "[1e-06, 10.0]"]),
    ("safety", "damping", 1.5, ["safety.damping", "[0.0, 1.0]"]),
    ("safety", "fallback_behaviour", "brake", ["safety.fallback_behaviour", "controlled_stop", "'brake'"]),
    ("safety", "stale_after_periods", 50, ["safety.stale_after_periods", "[1.0, 20.0] periods"]),
    ("camera", "fps", 0, ["camera.fps", "(0, 1000]", "frames/s"]),
    ("camera", "backend", "directshow", ["camera.backend", "gstreamer"]),
    ("camera", "reconnect_backoff_s", [3.0, 1.0], ["camera.reconnect_backoff_s", "first_s <= longest_s"]),
    # MotorLinkConfig names its keys motor_link.*, while the config section is `motor`.
    ("motor", "baudrate", 5, ["baudrate", "[300, 12000000]"]),
    ("motor", "channels", 9, ["channels", "[1, 8]"]),
    ("instruction", "initial", "   ", ["instruction.initial", "non-empty"]),
])
def test_out_of_range_values_name_the_key_and_range(tmp_path, example_raw, section, key, value, fragments):
    with pytest.raises(ConfigError) as err:
        load_modified(tmp_path, example_raw, section, key, value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path, example_raw):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) loop\.rat_hz; allowed keys in loop: .*rate_hz"):
        load_modified(tmp_path, example_raw, "loop", "rat_hz", 10)


def test_unknown_top_level_key_is_named(tmp_path, example_raw):
    raw = copy.deepcopy(example_raw)
    raw["saftey"] = {"damping": 0.1}
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['saftey'\]; allowed: bundle, camera"):
        load_config(write_config(tmp_path, raw))


def test_missing_camera_section_is_named(tmp_path, example_raw):
    raw = copy.deepcopy(example_raw)
    del raw["camera"]
    with pytest.raises(ConfigError, match="missing required key 'camera'"):
        load_config(write_config(tmp_path, raw))


def test_missing_camera_source_is_named(tmp_path, example_raw):
    raw = copy.deepcopy(example_raw)
    del raw["camera"]["source"]
    with pytest.raises(ConfigError, match=r"^camera: .*'source'"):
        load_config(write_config(tmp_path, raw))


def test_section_that_is_not_a_mapping_is_named(tmp_path, example_raw):
    raw = copy.deepcopy(example_raw)
    raw["loop"] = 10
    with pytest.raises(ConfigError, match="loop must be a mapping of keys, got int"):
        load_config(write_config(tmp_path, raw))


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "robot.yaml"
    path.write_text("bundle: /var/lib/vla-edge/bundle\ncamera:\n  source: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} is not valid YAML"):
        load_config(path)


def test_a_yaml_list_is_not_a_config(tmp_path):
    path = tmp_path / "robot.yaml"
    path.write_text("- bundle\n- camera\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)


def test_missing_file_points_at_the_example(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist \(see systemd/robot.example.yaml\)"):
        load_config(tmp_path / "nope.yaml")


def test_empty_bundle_is_refused_and_a_relative_one_is_resolved_next_to_the_file(tmp_path, example_raw):
    raw = copy.deepcopy(example_raw)
    raw["bundle"] = ""
    with pytest.raises(ConfigError, match="bundle must be the path of a policy bundle directory"):
        load_config(write_config(tmp_path, raw))
    raw["bundle"] = "bundles/reference"
    assert load_config(write_config(tmp_path, raw)).bundle == str(tmp_path / "bundles" / "reference")


# --- chunk execution and several cameras (issue 15) ------------------------------------------------------


def test_chunk_keys_of_the_policy_section_load_beside_the_pipelines(tmp_path, example_raw):
    raw = copy.deepcopy(example_raw)
    raw["policy"].update(replan_every=4, temporal_ensemble=0.01)
    config = load_config(write_config(tmp_path, raw))
    assert config.chunks == ChunkConfig(replan_every=4, temporal_ensemble=0.01)
    assert config.policy.target == "tensorrt", "the pipeline's keys are untouched"
    assert load_config(EXAMPLE).chunks == ChunkConfig()


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("replan_every", 0, "policy.replan_every must be an integer in [1, 1024] ticks or null, got 0"),
    ("replan_every", 2.5, "policy.replan_every must be an integer"),
    ("temporal_ensemble", -0.1, "policy.temporal_ensemble must be a number in [0.0, 10.0]"),
    ("temporal_ensemble", "yes", "policy.temporal_ensemble must be a number"),
])
def test_bad_chunk_keys_name_the_key_and_range(tmp_path, example_raw, key, value, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_modified(tmp_path, example_raw, "policy", key, value)


def test_an_unknown_policy_key_lists_the_chunk_keys_too(tmp_path, example_raw):
    with pytest.raises(ConfigError, match=r"policy\.replan_evry.*replan_every.*temporal_ensemble"):
        load_modified(tmp_path, example_raw, "policy", "replan_evry", 4)


def test_a_cameras_section_maps_spec_camera_names_to_camera_configs(tmp_path, example_raw):
    raw = copy.deepcopy(example_raw)
    del raw["camera"]
    raw["cameras"] = {"wrist": {"source": "/dev/video0"}, "top": {"source": "/dev/video2", "fps": 30}}
    config = load_config(write_config(tmp_path, raw))
    assert list(config.cameras) == ["wrist", "top"] and config.cameras["top"].fps == 30
    assert config.camera is config.cameras["wrist"], "the first camera serves the one-camera checks"
    assert config.camera_configs(["top", "wrist"]) == {"top": config.cameras["top"], "wrist": config.cameras["wrist"]}
    assert config.camera_configs(["top", "side"]) == {"top": config.cameras["top"]}


def test_one_camera_section_serves_a_one_camera_policy_only():
    config = load_config(EXAMPLE)
    assert config.camera_configs(["front"]) == {"front": config.camera}
    assert config.camera_configs(["wrist", "top"]) == {}


@pytest.mark.parametrize(("cameras", "fragment"), [
    ({}, "cameras must map each of the policy's camera names"),
    ([{"source": "/dev/video0"}], "cameras must map each of the policy's camera names"),
    ({"wrist": {"source": "/dev/video0", "colour": "rgb"}}, "unknown key(s) cameras.wrist.colour"),
    ({"wrist": {"fps": 30}}, "cameras.wrist"),
])
def test_a_bad_cameras_section_is_named(tmp_path, example_raw, cameras, fragment):
    raw = copy.deepcopy(example_raw)
    del raw["camera"]
    raw["cameras"] = cameras
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(write_config(tmp_path, raw))


def test_camera_and_cameras_together_are_refused(tmp_path, example_raw):
    raw = copy.deepcopy(example_raw)
    raw["cameras"] = {"wrist": {"source": "/dev/video0"}}
    with pytest.raises(ConfigError, match="either `camera:`.*or `cameras:`"):
        load_config(write_config(tmp_path, raw))


def test_motor_kinds_come_from_the_bundle_not_the_file(tmp_path, example_raw):
    with pytest.raises(ConfigError, match=r"motor.kinds is not a config key: .*spec.action.kinds"):
        load_modified(tmp_path, example_raw, "motor", "kinds", ["position", "velocity"])
