"""The robot service as systemd runs it: the real entry point (`python -m edge.cli run --config FILE`) in
its own process, the simulator in another (motor controller on a pty, MJPEG camera), and the systemd
side played by the test: a SOCK_DGRAM notify socket bound here and passed as NOTIFY_SOCKET, with
WATCHDOG_USEC, RUNTIME_DIRECTORY and STATE_DIRECTORY as the unit sets them.

Every wait has a timeout that only guards against a hang; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from simulator.process import GroundTruthClient, SimulatorConfig, SimulatorProcess, stop_process

REPO = Path(__file__).resolve().parents[3]
EX_CONFIG = 78


# --- the systemd side -----------------------------------------------------------------------------------


class NotifySocket:
    """What systemd listens on: datagrams of newline-separated KEY=VALUE assignments."""

    def __init__(self) -> None:
        # sun_path holds 107 bytes: a short directory of its own rather than pytest's long tmp_path.
        self.directory = Path(tempfile.mkdtemp(prefix="vla-notify-", dir="/tmp"))
        self.path = str(self.directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def receive(self, timeout_s: float) -> str | None:
        self.sock.settimeout(timeout_s)
        try:
            message = self.sock.recv(4096).decode()
        except (TimeoutError, BlockingIOError):  # BlockingIOError: nothing queued with timeout 0
            return None
        self.messages.append(message)
        return message

    def wait_for(self, assignment: str, timeout_s: float, process: subprocess.Popen | None = None) -> str:
        """The next datagram holding `assignment` (e.g. "READY=1"); fails after timeout_s (a hang guard)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self.receive(min(0.5, max(0.01, deadline - time.monotonic())))
            if message is not None and assignment in message.split("\n"):
                return message
            if process is not None and process.poll() is not None and message is None:
                raise AssertionError(f"service exited with {process.returncode} before {assignment}")
        raise AssertionError(f"no {assignment} within {timeout_s} s; got {self.messages[-5:]}")

    def drain(self) -> list[str]:
        drained = []
        while (message := self.receive(0.0 if drained else 0.05)) is not None:
            drained.append(message)
        return drained

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture()
def notify():
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.fixture()
def unit_dirs():
    """RUNTIME_DIRECTORY and STATE_DIRECTORY (short paths: the control socket lives in the first)."""
    runtime = Path(tempfile.mkdtemp(prefix="vla-run-", dir="/tmp"))
    state = Path(tempfile.mkdtemp(prefix="vla-state-", dir="/tmp"))
    yield runtime, state
    shutil.rmtree(runtime, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)


def service_env(notify: NotifySocket, runtime: Path | None = None, state: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="2000000", PYTHONUNBUFFERED="1")
    if runtime is not None:
        env["RUNTIME_DIRECTORY"] = str(runtime)
    if state is not None:
        env["STATE_DIRECTORY"] = str(state)
    return env


def start_service(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def process_state(pid: int) -> str:
    """The scheduler state letter from /proc (R, S, T for stopped, ...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- the simulated robot ----------------------------------------------------------------------------------


@pytest.fixture()
def simulator(tmp_path):
    """`python -m simulator` with a 60 s controller watchdog, so that within this test motors stop only when
    commanded to; yields (paths, ground_truth())."""
    config = SimulatorConfig(seed=11, watchdog_timeout_s=60.0, log_level="WARNING", ready_timeout_s=60.0)
    with SimulatorProcess(config, log_path=tmp_path / "simulator.log") as sim:
        paths = {"serial": sim.paths.serial, "camera_url": sim.paths.camera_url}

        def ground_truth() -> dict:
            with GroundTruthClient(sim.paths.ground_truth, timeout_s=10.0) as truth:
                return truth.ground_truth()

        yield paths, ground_truth


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s  # a hang guard only
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the notifier on its own --------------------------------------------------------------------------


def test_notifier_reads_the_watchdog_interval_meant_for_this_process(notify):
    from edge.service.sdnotify import SystemdNotifier

    mine = SystemdNotifier(environ={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000",
                                    "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval_s == 2.0
    other = SystemdNotifier(environ={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None  # systemd meant it for another process
    assert SystemdNotifier(environ={}).watchdog_interval_s is None and not SystemdNotifier(environ={}).enabled
    assert mine.status("mode nominal\nREADY=1") and mine.watchdog()
    assert notify.receive(5.0) == "STATUS=mode nominal READY=1", "a STATUS= line cannot smuggle in a READY=1"
    assert notify.receive(5.0) == "WATCHDOG=1"
    mine.close()
    other.close()


def test_notifier_to_an_abstract_socket_and_a_vanished_one(caplog):
    from edge.service.sdnotify import SystemdNotifier

    name = f"vla-edge-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5.0)
        notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up")
        assert listener.recv(4096) == b"READY=1\nSTATUS=up"
    # The listener is gone: every ping fails, the loop goes on, and the journal gets one warning, not fifty.
    with caplog.at_level("WARNING", logger="edge.service.sdnotify"):
        assert not any(notifier.watchdog() for _ in range(50))
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1
    notifier.close()


# --- the tests ------------------------------------------------------------------------------------------


def test_service_under_systemd_notify_watchdog_and_commanded_stop(reference_bundle, simulator, notify, unit_dirs,
                                                                   tmp_path):
    paths, ground_truth = simulator
    runtime, state = unit_dirs
    (state / "bundle").symlink_to(reference_bundle[0])  # the bundle where the unit keeps it
    instruction = ground_truth()["instruction"]
    metrics_port = free_port()
    config = write_config(tmp_path / "robot.yaml", {
        "bundle": "${STATE_DIRECTORY}/bundle",
        "camera": {"source": paths["camera_url"], "open_timeout_s": 30.0},
        "motor": {"port": paths["serial"]},
        "policy": {"target": "cpu", "mc_samples": 8, "threads": 1},
        # A calm gate: this test is about the service around the loop, not about uncertainty.
        "uncertainty": {"threshold": 5.0, "hard_ceiling": 10.0},
        "loop": {"warmup_ticks": 2},
        "instruction": {"initial": instruction, "socket": "${RUNTIME_DIRECTORY}/control.sock"},
        "metrics": {"enabled": True, "port": metrics_port},
    })
    log = tmp_path / "service.log"
    service = start_service(config, service_env(notify, runtime, state), log)
    try:
        ready = notify.wait_for("READY=1", timeout_s=120.0, process=service)
        before_ready = notify.messages[:-1]
        assert any(m.startswith("STATUS=starting: verifying bundle") for m in before_ready), before_ready
        assert any("connecting motor link" in m for m in before_ready)
        assert not any("WATCHDOG=1" in m.split("\n") for m in before_ready), "no ping before READY=1"
        assert "STATUS=running cpu policy at 10 Hz" in ready.split("\n")

        for _ in range(3):  # the loop pings the watchdog from ticks that met their deadline
            notify.wait_for("WATCHDOG=1", timeout_s=10.0, process=service)
        assert any(m.startswith("STATUS=") and "ticks" in m for m in notify.messages), "running STATUS= line"

        # The control socket in RUNTIME_DIRECTORY and the metrics endpoint on 127.0.0.1 are served.
        from edge.service.control_protocol import send_request

        reply = send_request(runtime / "control.sock", {"cmd": "status"}, timeout_s=10.0)
        assert reply["ok"] and reply["instruction"] == instruction
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10.0) as response:
            assert b"vla_edge_ticks_total" in response.read()

        # The container's HEALTHCHECK: the doctor asks the running service over its control socket.
        from edge.service import doctor

        health = doctor.run_checks(config, running=True, environ=service_env(notify, runtime, state))
        assert [r.status.value for r in health] == ["OK"] * 4, [r.line() for r in health]

        def moving():
            return any(abs(v) > 0.05 for v in ground_truth()["applied_targets"])

        wait_until(moving, 60.0, "the policy drives the robot")

        # A hung loop: the whole process stopped. No WATCHDOG=1 can come from it while it is stopped.
        service.send_signal(signal.SIGSTOP)
        wait_until(lambda: process_state(service.pid) == "T", 10.0, "the service is stopped")
        notify.drain()  # pings sent before the stop took effect
        assert notify.receive(1.0) is None, "a stopped service sent a notification"
        service.send_signal(signal.SIGCONT)
        notify.wait_for("WATCHDOG=1", timeout_s=10.0, process=service)
        notify.wait_for("WATCHDOG=1", timeout_s=10.0, process=service)

        wait_until(moving, 30.0, "the robot moves again before the stop")
        service.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING=1", timeout_s=10.0)
        assert "STATUS=commanded stop" in stopping.split("\n")
        assert service.wait(timeout=15.0) == 0
    finally:
        stop_process(service, "vla-edge run")
    output = log.read_text()
    assert "commanded stop sent (zero velocity)" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (runtime / "control.sock").exists(), "the control socket is removed at exit"
    # The controller's watchdog (60 s here) did not do it: the service commanded zero, and the motors stopped.
    truth = wait_until(lambda: (t := ground_truth())["motors_stopped"] and t, 10.0, "motors stopped")
    assert truth["applied_targets"] == [0.0, 0.0]
    assert not truth["watchdog_tripped"]


def _linked_bundle_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _run_to_exit(config: Path, notify: NotifySocket, log: Path, timeout_s: float = 120.0) -> tuple[int, str]:
    service = start_service(config, service_env(notify), log)
    try:
        code = service.wait(timeout=timeout_s)
    finally:
        stop_process(service, "vla-edge run")
    notify.drain()
    return code, log.read_text()


def _devices_never_reached(tmp_path: Path) -> dict:
    # The start fails before the camera or the port are touched; these paths exist nowhere.
    return {"camera": {"source": str(tmp_path / "no-camera.mp4")}, "motor": {"port": str(tmp_path / "no-port")}}


def test_tampered_bundle_exits_78_naming_the_rebuild_command(reference_bundle, notify, tmp_path):
    copy = _linked_bundle_copy(reference_bundle[0], tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    graph = manifest["graphs"]["vision"]["files"][manifest["targets"]["cpu"]["vision"]]
    data = bytearray((copy / graph).read_bytes())
    data[-100] ^= 0x01
    (copy / graph).unlink()  # a new file: the hard link to the session's bundle stays intact
    (copy / graph).write_bytes(bytes(data))
    config = write_config(tmp_path / "robot.yaml", {"bundle": str(copy), **_devices_never_reached(tmp_path)})
    code, output = _run_to_exit(config, notify, tmp_path / "service.log")
    assert code == EX_CONFIG, output
    assert f"{graph} does not match its sha256" in output
    assert f"build-engines --int8 --out {copy} --force" in output
    assert not any("READY=1" in m.split("\n") for m in notify.messages)
    assert any(m.startswith("STATUS=failed: bundle") for m in notify.messages), notify.messages


def test_config_rejected_at_start_exits_78_naming_the_key(reference_bundle, notify, tmp_path):
    # Valid YAML, but more Monte-Carlo samples than the bundle's engines take: found while starting.
    config = write_config(tmp_path / "robot.yaml", {"bundle": str(reference_bundle[0]),
                                                    "policy": {"mc_samples": 256}, **_devices_never_reached(tmp_path)})
    code, output = _run_to_exit(config, notify, tmp_path / "service.log")
    assert code == EX_CONFIG, output
    assert "policy.mc_samples" in output


@pytest.mark.parametrize(("section", "key"), [({"loop": {"rate_hz": 500}}, "loop.rate_hz"),
                                              ({"metrics": {"host": "0.0.0.0"}}, "metrics.host"),
                                              ({"policy": {"mc_sample": 8}}, "policy.mc_sample")])
def test_bad_config_file_exits_78_naming_the_key(notify, tmp_path, section, key):
    config = write_config(tmp_path / "robot.yaml", {"bundle": str(tmp_path / "bundle"), **_devices_never_reached(tmp_path),
                                                    **section})
    code, output = _run_to_exit(config, notify, tmp_path / "service.log")
    assert code == EX_CONFIG, output
    assert key in output


def test_unreachable_camera_exits_2_so_systemd_restarts(reference_bundle, notify, tmp_path):
    config = write_config(tmp_path / "robot.yaml", {
        "bundle": str(reference_bundle[0]), "camera": {"source": f"http://127.0.0.1:{free_port()}/video",
                                                       "open_timeout_s": 1.0},
        "motor": {"port": "loop://"}, "policy": {"mc_samples": 4, "threads": 1}})
    code, output = _run_to_exit(config, notify, tmp_path / "service.log")
    assert code == 2, output
    assert "delivered no frame" in output
    assert any("STOPPING=1" in m.split("\n") for m in notify.messages)
