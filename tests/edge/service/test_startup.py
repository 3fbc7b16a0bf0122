"""The start-up validation doctor and run share (edge/service/startup.py): what doctor calls ready, runs.

Config-only checks load real YAML files; the config-against-bundle checks use the session's reference
bundle and hard-linked copies of it with an edited manifest (a policy of another action size); the
permission check drops to an unprivileged user in a forked child when the tests run as root. The last
test runs `vla-edge run` against the simulated robot for every case and checks that doctor's verdict
and run's outcome agree, and that a refused start never reached the camera or the motor controller.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edge.errors import BundleError, ConfigError
from edge.inference.bundle import Bundle, write_manifest_digest
from edge.service import doctor, startup, wiring
from edge.service.config import config_from_dict, load_config
from edge.service.doctor import Status
from simulator.process import GroundTruthClient, SimulatorConfig, SimulatorProcess, stop_process
from tests.edge.service.test_service import NotifySocket, service_env

REPO = Path(__file__).resolve().parents[3]
EX_CONFIG = 78
DEVICES = {"camera": {"source": "http://127.0.0.1:9/video"}, "motor": {"port": "/dev/null"}}


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_config(bundle, **sections):
    return config_from_dict({"bundle": str(bundle), **DEVICES, **sections})


def linked_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").unlink()  # a new file: the hard link to the session's bundle stays intact
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_manifest_digest(root)  # an edit on purpose: the manifest's own digest follows it


# --- the config on its own ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key", "lines"), [
    # finding 8: a second safety section replaced the first one's slew limit
    ("safety:\n  max_slew_per_s: 0.5\nsafety:\n  max_slew_per_s: 4.0\n", "'safety'", (5, 3)),
    ("safety:\n  max_slew_per_s: 0.5\n  decel_per_s: 2.0\n  max_slew_per_s: 4.0\n", "'max_slew_per_s'", (6, 4)),
])
def test_duplicate_yaml_key_is_refused_naming_the_key_and_both_lines(tmp_path, text, key, lines):
    path = write_text(tmp_path / "robot.yaml", "bundle: /b\ncamera: {source: 0}\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"duplicate key {key} on line {lines[0]} (first on line {lines[1]})" in message, message
    assert str(path) in message


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    text = ("bundle: /b\ncamera: &cam {source: 0, fps: 10}\nmotor: {port: /p}\n"
            "safety: {max_slew_per_s: 0.5}\n")
    assert load_config(write_text(tmp_path / "a.yaml", text)).safety.max_slew_per_s == 0.5
    merged = text.replace("camera: &cam {source: 0, fps: 10}", "camera: {<<: {source: 0, fps: 10}, fps: 15}")
    assert load_config(write_text(tmp_path / "b.yaml", merged)).camera.fps == 15


@pytest.mark.parametrize(("section", "expected"), [
    ("instruction: {socket: 123}", "instruction.socket must be the path of a UNIX socket"),  # finding 9
    ("instruction: {socket: /run/" + "x" * 120 + "}", "instruction.socket is 125 bytes long"),
    ("realtime: {freeze_gc: 'no'}", "realtime.freeze_gc must be true or false, got 'no'"),  # finding 10
    ("realtime: {sched_fifo_priority: 120}", "realtime.sched_fifo_priority must be an integer within 1..99"),
])
def test_config_values_refused_at_load_naming_the_key(tmp_path, section, expected):
    path = write_text(tmp_path / "robot.yaml", f"bundle: /b\ncamera: {{source: 0}}\nmotor: {{port: /p}}\n{section}\n")
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_config(path)
    result, config = doctor.check_config(path)
    assert config is None and result.status is Status.FAIL and expected in result.message


# --- the config against the bundle --------------------------------------------------------------------


def problems_by_key(bundle_dir, **sections):
    bundle = wiring.load_bundle(make_config(bundle_dir))
    return {(p.key, p.fatal): p for p in startup.policy_problems(bundle, make_config(bundle_dir, **sections))}


def test_reference_config_has_no_problem(reference_bundle):
    assert problems_by_key(reference_bundle[0]) == {}


def test_channels_must_match_the_action_dimension(reference_bundle, tmp_path):
    dim = len(json.loads((reference_bundle[0] / "manifest.json").read_text())["spec"]["action"]["names"])
    problem = problems_by_key(reference_bundle[0], motor={"port": "/p", "channels": dim + 1})[("motor.channels", True)]
    assert f"motor.channels is {dim + 1} but the policy's action has {dim}" in problem.message
    assert f"set motor.channels: {dim}" in problem.fix
    # A policy of another size: the check follows the bundle, not the reference policy.
    copy = linked_copy(reference_bundle[0], tmp_path / "seven")

    def seven(manifest):
        action = manifest["spec"]["action"]
        action.update(names=[f"joint_{i}" for i in range(7)], kinds=["velocity"] * 7, low=[-1.0] * 7,
                      high=[1.0] * 7, max_slew_per_s=[4.0] * 7)

    edit_manifest(copy, seven)
    assert ("motor.channels", True) not in problems_by_key(copy, motor={"port": "/p", "channels": 7})
    assert ("motor.channels", True) in problems_by_key(copy, motor={"port": "/p", "channels": 2})


def test_a_proprio_channel_beyond_the_telemetry_is_a_start_up_problem(reference_bundle, tmp_path):
    # Found in issue 13: the mismatch was a controlled stop on every tick at run time, not a start-up error.
    dim = len(json.loads((reference_bundle[0] / "manifest.json").read_text())["spec"]["action"]["names"])
    copy = linked_copy(reference_bundle[0], tmp_path / "far")

    def far(manifest):
        manifest["spec"]["proprio"]["sources"][-1] = f"velocities[{dim}]"

    edit_manifest(copy, far)
    serial = problems_by_key(copy, motor={"port": "/p", "channels": dim})
    problem = serial[("motor.channels", True)]
    assert f"velocities[{dim}]" in problem.message and f"channels 0..{dim - 1}" in problem.message
    assert "rebuild the bundle" in problem.fix
    ros2 = problems_by_key(copy, motor=None, ros2={"command": {"kind": "twist", "topic": "/cmd_vel"},
                                                   "telemetry": {"topic": "/joint_states"}})
    assert ("ros2.telemetry", True) in ros2, ros2
    # Within the channels: no problem (the reference bundle's own sources).
    assert not any(key == "motor.channels" for key, _ in problems_by_key(reference_bundle[0]))


def test_one_sample_is_refused_because_its_spread_is_zero(reference_bundle):
    problem = problems_by_key(reference_bundle[0], policy={"mc_samples": 1})[("policy.mc_samples", True)]
    assert "spread of a single dropout sample is always 0" in problem.message
    assert "at least 2" in problem.fix


def test_another_T_than_the_calibrated_one_warns_unless_a_threshold_is_set(reference_bundle, tmp_path):
    manifest = json.loads((reference_bundle[0] / "manifest.json").read_text())
    calibrated = startup.calibrated_mc_samples(manifest)
    assert calibrated is not None, manifest["uncertainty"]
    other = 4 if calibrated != 4 else 8
    problem = problems_by_key(reference_bundle[0], policy={"mc_samples": other})[("policy.mc_samples", False)]
    assert f"calibrated at T={calibrated}" in problem.message and f"policy.mc_samples: {calibrated}" in problem.fix
    assert problems_by_key(reference_bundle[0], policy={"mc_samples": other}, uncertainty={"threshold": 0.5}) == {}
    # A threshold calibrated at this T too (schema v2's by_samples) removes the warning.
    copy = linked_copy(reference_bundle[0], tmp_path / "recorded")

    def record(m):
        by_target = m["uncertainty"]["by_samples"]["cpu"]
        by_target[str(other)] = by_target[str(calibrated)]

    edit_manifest(copy, record)
    assert problems_by_key(copy, policy={"mc_samples": other}) == {}


def test_tensorrt_target_on_onnxruntime_cpu_warns(reference_bundle, tmp_path):
    copy = linked_copy(reference_bundle[0], tmp_path / "trt")

    def with_trt_target(m):  # the layout a --tensorrt build adds, here pointing at the CPU graphs
        m["targets"].setdefault("tensorrt", dict(m["targets"]["cpu-fp32"]))

    edit_manifest(copy, with_trt_target)
    problem = problems_by_key(copy, policy={"target": "tensorrt"})[("policy.target", False)]
    assert "laid out for TensorRT" in problem.message and "policy.target: cpu" in problem.fix
    results, _ = doctor.check_bundle(make_config(copy, policy={"target": "tensorrt"}))
    assert [r.status for r in results] == [Status.OK, Status.WARN]


def test_doctor_prints_every_problem_on_its_own_line_and_run_refuses_them_all(reference_bundle):
    config = make_config(reference_bundle[0], policy={"mc_samples": 1}, motor={"port": "/p", "channels": 5})
    results, _ = doctor.check_bundle(config)
    fails = [r for r in results if r.status is Status.FAIL]
    assert len(fails) == 2 and all(r.fix for r in fails)
    assert {r.message.split()[0] for r in fails} == {"policy.mc_samples", "motor.channels"}
    with pytest.raises(ConfigError) as caught:
        wiring.check_startup(wiring.load_bundle(config), config)
    assert "policy.mc_samples 1" in str(caught.value) and "motor.channels is 5" in str(caught.value)


# --- file permissions for the service user ---------------------------------------------------------------


def _as_unprivileged(function):
    """`function()` in a forked child that runs as `nobody` when this process is root (root reads
    everything); its return value (JSON) comes back through a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read_fd)
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            os.write(write_fd, json.dumps(function()).encode())
        except BaseException as exc:  # reported to the parent, which fails the test
            os.write(write_fd, json.dumps({"child error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_a_bundle_file_the_service_user_cannot_read_is_named_with_the_fix(reference_bundle):
    # finding 3: graphs written 0600 by the build's user; doctor and run crashed with a PermissionError.
    place = Path(tempfile.mkdtemp(prefix="vla-perm-", dir="/tmp"))
    try:
        place.chmod(0o755)
        copy = place / "bundle"
        shutil.copytree(reference_bundle[0], copy)  # real copies: chmod must not touch the session's bundle
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        manifest = json.loads((copy / "manifest.json").read_text())
        secret = copy / manifest["graphs"]["head"]["files"]["fp32"]
        secret.chmod(0o600)
        config = make_config(copy)

        def check():
            results, bundle = doctor.check_bundle(config)
            try:
                wiring.load_bundle(config)
                raised = None
            except BundleError as exc:
                raised = str(exc)
            return {"results": [r.to_dict() for r in results], "loaded": bundle is not None, "raised": raised}

        seen = _as_unprivileged(check)
        assert "child error" not in seen, seen
        assert not seen["loaded"]
        assert [r["status"] for r in seen["results"]] == ["FAIL"]
        assert str(secret) in seen["results"][0]["message"] and "-rw-------" in seen["results"][0]["message"]
        assert f"chmod -R a+rX {copy}" in seen["results"][0]["fix"]
        assert seen["raised"] and str(secret) in seen["raised"] and "chmod -R a+rX" in seen["raised"]
        secret.chmod(0o644)
        seen = _as_unprivileged(check)
        assert seen["loaded"] and seen["raised"] is None, seen
    finally:
        shutil.rmtree(place, ignore_errors=True)


# --- doctor's verdict and run's outcome agree --------------------------------------------------------------


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    """One simulated robot for every case (its watchdog long, so only commands move it)."""
    log = tmp_path_factory.mktemp("sim") / "simulator.log"
    config = SimulatorConfig(seed=5, watchdog_timeout_s=60.0, log_level="WARNING", ready_timeout_s=60.0)
    with SimulatorProcess(config, log_path=log) as sim:
        yield sim


def devices_touched(sim) -> dict:
    with GroundTruthClient(sim.paths.ground_truth, timeout_s=10.0) as truth:
        gt = truth.ground_truth()
    return {"camera_connections": gt["camera_connections"], "last_command_seq": gt["last_command_seq"],
            "last_valid_command_s": gt["last_valid_command_s"], "framing_errors": gt["framing_errors"]}


# (name, YAML lines after the devices, doctor passes). Each refused case is one finding of issue 13.
CASES = [
    ("reference", "", True),
    ("another T (a warning)", "policy: {mc_samples: 4, threads: 1}\n", True),
    ("channels vs action (finding 1)", "motor: {port: PORT, channels: 3}\n", False),
    ("one sample (finding 6)", "policy: {mc_samples: 1}\n", False),
    ("duplicate section (finding 8)", "safety: {max_slew_per_s: 0.5}\nsafety: {max_slew_per_s: 4.0}\n", False),
    ("socket 123 (finding 9)", "instruction: {socket: 123}\n", False),
    ("realtime 'no' (finding 10)", "realtime: {freeze_gc: 'no'}\n", False),
    ("T over the profile", "policy: {mc_samples: 256}\n", False),
]


def case_config(path: Path, bundle: Path, sim, extra: str) -> Path:
    motor = f"motor: {{port: {sim.paths.serial}}}\n"
    if "motor:" in extra:
        motor, extra = extra.replace("PORT", sim.paths.serial), ""
    text = (f"bundle: {bundle}\ncamera: {{source: '{sim.paths.camera_url}', open_timeout_s: 30.0}}\n{motor}"
            f"loop: {{warmup_ticks: 1}}\nuncertainty: {{}}\n" + extra)
    if "uncertainty" in extra:
        text = text.replace("uncertainty: {}\n", "")
    return write_text(path, text)


def test_every_config_doctor_passes_runs_and_every_one_it_fails_exits_78_before_any_device(
        reference_bundle, robot, tmp_path):
    verdicts = []
    for index, (name, extra, expected_ready) in enumerate(CASES):
        config = case_config(tmp_path / f"robot{index}.yaml", reference_bundle[0], robot, extra)
        results = doctor.run_checks(config)
        ready = doctor.exit_status(results) == 0
        assert ready is expected_ready, (name, [r.line() for r in results])
        before = devices_touched(robot)
        notify = NotifySocket()
        log = tmp_path / f"service{index}.log"
        try:
            with open(log, "wb") as out:
                service = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
                                           cwd=REPO, env=service_env(notify), stdout=out, stderr=subprocess.STDOUT)
            try:
                if ready:
                    notify.wait_for("READY=1", timeout_s=120.0, process=service)
                    service.terminate()
                    assert service.wait(timeout=30.0) == 0, log.read_text()[-2000:]
                else:
                    assert service.wait(timeout=120.0) == EX_CONFIG, (name, log.read_text()[-2000:])
            finally:
                stop_process(service, "vla-edge run")
        finally:
            notify.close()
        after = devices_touched(robot)
        output = log.read_text()
        assert "Traceback" not in output, output[-3000:]
        if ready:
            assert after["camera_connections"] > before["camera_connections"], name
            assert after["last_valid_command_s"] != before["last_valid_command_s"], (name, "no command arrived")
        else:
            assert after == before, (name, "a refused start opened the camera or wrote to the controller")
            failed = [r for r in results if r.status is Status.FAIL]
            key = failed[0].message.split()[0] if failed[0].name == "bundle" else None
            assert key is None or key in output, (name, key, output[-2000:])
        verdicts.append((name, ready))
    assert [v for _, v in verdicts] == [c[2] for c in CASES]


def test_the_gate_takes_the_threshold_calibrated_at_the_configured_T(reference_bundle, tmp_path):
    copy = linked_copy(reference_bundle[0], tmp_path / "per_t")

    def two_thresholds(m):
        m["uncertainty"]["by_samples"]["cpu"]["8"] = 0.0123

    edit_manifest(copy, two_thresholds)
    bundle = Bundle.load(copy)
    base = {"bundle": str(copy), "camera": {"source": 0}, "motor": {"port": "/p"}}
    # The thresholds are the cpu target's: with target auto the gate takes the chosen target's (build_loop).
    at_8 = wiring.gate_config(bundle, config_from_dict({**base, "policy": {"mc_samples": 8, "target": "cpu"}}))
    at_16 = wiring.gate_config(bundle, config_from_dict({**base, "policy": {"mc_samples": 16, "target": "cpu"}}))
    assert at_8.threshold == 0.0123
    assert at_16.threshold == bundle.manifest["uncertainty"]["by_samples"]["cpu"]["16"]
    assert ("policy.mc_samples", False) not in problems_by_key(copy, policy={"mc_samples": 8})
