"""Closed-loop fault-injection harness: the simulator and the real robot service, each its own process.

The service under test is the real entry point (``python -m edge.cli run --config FILE``) talking to the
simulated robot only through a real pty and a real MJPEG stream, as it talks to hardware. The simulator
(``python -m simulator ... --ground-truth-port 0``) answers ground truth (pose, measured wheel speeds,
watchdog, command sequence numbers) and runs fault hooks over its JSON-lines TCP port; the service is
driven and inspected over its UNIX control socket.

Both processes stamp times with ``time.monotonic()`` on this machine, so the simulator's ground-truth
times and the times taken here are on one clock: a time-to-stop is ``motors_stopped_since_s`` (the first
physics step of the stopped stretch) minus the test's time just before it injected the fault.

Every wait is bounded (a hang guard, never a timing assertion); every process is killed on teardown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edge.errors import EdgeError
from edge.io.protocol import WATCHDOG_TIMEOUT_S
from edge.service.control_protocol import send_request
from reference_world.world import WorldConfig
from simulator.controller import MOTOR_STOPPED_EPSILON
from simulator.process import (
    GroundTruthClient,
    SimulatorConfig,
    SimulatorError,
    SimulatorProcess,
    child_env,
    die_with_parent,
    log_tail,
    stop_process,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_ENV = "VLA_EDGE_FAULTS_JSON"  # path of the JSON results file; a Markdown table is written beside it

# -- how long things may take ------------------------------------------------------------------------------
# Hang guards only: a wait that runs out fails the test with what it last saw. They are generous because
# a loaded 2-core CI machine runs the simulator, the service, the test and whatever else at once.
START_TIMEOUT_S = 90.0  # service start: bundle hashes, ONNX Runtime sessions, warm-up, first tick
SIMULATOR_START_TIMEOUT_S = 30.0
MOVE_TIMEOUT_S = 20.0  # instruction said (or fault cleared) -> the wheels turn
EXIT_TIMEOUT_S = 15.0
POLL_S = 0.02  # ground-truth polling period: well under the 100 ms physics step

# A wheel counts as driving above this normalised speed (the simulator's "stopped" is below 0.02).
MOVING_SPEED = 0.1

# -- bounds on time-to-stop, from the parts docs/architecture.md names (decision 8) --------------------------
_WORLD = WorldConfig()
CONTROL_PERIOD_S = 0.1  # loop.rate_hz 10 (the config's default, which the suite keeps)
STALE_AFTER_S = 2 * CONTROL_PERIOD_S  # safety.stale_after_periods 2 (default)
# The simulated motors lag their targets (first order, motor_time_constant_s) and the ground truth is
# published once per physics step: from full speed, the measured speed falls below the "stopped"
# threshold after tau * ln(1 / eps), rounded up to whole steps, plus one step of publication delay.
MOTOR_SETTLE_S = (math.ceil(_WORLD.motor_time_constant_s * math.log(1.0 / MOTOR_STOPPED_EPSILON) / _WORLD.dt_s)
                  + 1) * _WORLD.dt_s
# Scheduling slack on a busy 2-core machine (three Python processes plus ONNX Runtime). The bounds are
# meant to catch a stop that does not happen or takes several times its budget, not to time the machine.
SLACK_S = 0.8
# Fault the runtime detects (stale frame or telemetry): detection, the next tick (which commands zero at
# once: safety.input_loss_stop immediate, the default), the motors settling.
CONTROLLED_STOP_BOUND_S = STALE_AFTER_S + CONTROL_PERIOD_S + MOTOR_SETTLE_S + SLACK_S
# Commands stop reaching the controller (unplug, SIGSTOP, SIGKILL): its watchdog, then the motors settle.
WATCHDOG_STOP_BOUND_S = WATCHDOG_TIMEOUT_S + 0.01 + MOTOR_SETTLE_S + SLACK_S
# SIGTERM/SIGINT: the current tick ends, the service commands zero at once (no ramp), the motors settle.
COMMANDED_STOP_BOUND_S = CONTROL_PERIOD_S + MOTOR_SETTLE_S + SLACK_S

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A bounded wait ran out; the message says what was awaited and what was seen last."""


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, *, interval_s: float = POLL_S,
             describe: Callable[[], str] | None = None) -> T:
    """Call ``probe`` until it returns something other than None/False; raise WaitTimeout after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = probe()
        if last is not None and last is not False:
            return last
        if time.monotonic() >= deadline:
            extra = f"\n{describe()}" if describe is not None else ""
            raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}{extra}")
        time.sleep(interval_s)


def max_wheel_speed(ground_truth: dict) -> float:
    return max(abs(v) for v in ground_truth["wheel_velocities"])


def is_driving(ground_truth: dict) -> bool:
    return not ground_truth["motors_stopped"] and max_wheel_speed(ground_truth) > MOVING_SPEED


def seq_delta(earlier: int, later: int) -> int:
    """Commands between two 16-bit sequence numbers (the protocol's wrap-around)."""
    return (later - earlier) % 0x10000


# -- the simulator -------------------------------------------------------------------------------------------
class SimulatedRobot:
    """The simulator process (simulator.process) and a client for its ground-truth port and fault hooks."""

    def __init__(self, workdir: Path, seed: int, target: str) -> None:
        self.seed = seed
        self.target = target
        config = SimulatorConfig(seed=seed, target=target, log_level="INFO", ready_timeout_s=SIMULATOR_START_TIMEOUT_S)
        self.process = SimulatorProcess(config, workdir / f"simulator-{seed}.log")
        self._client: GroundTruthClient | None = None

    @property
    def serial(self) -> str:
        return self.process.paths.serial

    @property
    def camera_url(self) -> str:
        return self.process.paths.camera_url

    def start(self) -> SimulatedRobot:
        self.process.start()
        try:
            self._client = GroundTruthClient(self.process.paths.ground_truth)
        except BaseException:
            self.process.stop()
            raise
        return self

    def request(self, payload: str) -> dict:
        assert self._client is not None, "simulator not started"
        try:
            return self._client.ask(payload)
        except SimulatorError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from exc

    def ground_truth(self) -> dict:
        reply = self.request("ground_truth")
        assert reply["ok"], reply
        return reply["ground_truth"]

    def command(self, name: str, **args: Any) -> dict:
        """Run reset_episode or a fault hook; fails the test if the simulator refuses it."""
        reply = self.request(json.dumps({"cmd": name, "args": args}))
        assert reply["ok"], f"simulator refused {name}({args}): {reply}"
        return reply

    def reset_episode(self) -> None:
        """Put the robot back at its start, far from the target, so that it has a long way to drive."""
        self.command("reset_episode", seed=self.seed, target=self.target)

    def clear_faults(self) -> None:
        """Undo every fault hook, whatever the last test left behind."""
        if not self.ground_truth()["plugged"]:
            self.command("replug")
        self.command("flip_bits", probability=0.0)
        self.command("resume_telemetry")
        self.command("revive_camera")
        self.command("unfreeze_camera")
        self.command("set_fault", on=False)
        self.command("report")

    def log_tail(self, lines: int = 30) -> str:
        return self.process.log_tail(lines)

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self.process.stop()


# -- the robot service ---------------------------------------------------------------------------------------
def write_robot_config(path: Path, *, bundle: Path, serial_port: str, camera_url: str, socket_path: Path,
                       overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """A robot.yaml for the simulated robot: the shipped defaults except where the robot differs.

    The default safety, loop, motor and camera timings are kept on purpose: they are what the suite
    measures. The policy runs the CPU INT8 graphs on one ONNX Runtime thread (CI has two cores to share
    between the service, the simulator and the test).
    """
    config: dict[str, Any] = {
        "bundle": str(bundle),
        "camera": {"source": camera_url},
        "motor": {"port": serial_port, "channels": 2},
        "policy": {"target": "cpu", "backend": "onnxruntime", "device": "cpu", "threads": 1},
        "realtime": {"freeze_gc": True},
        "instruction": {"initial": None, "socket": str(socket_path)},
    }
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class ServiceProcess:
    """``python -m edge.cli run --config FILE`` as a child process, driven over its control socket."""

    def __init__(self, workdir: Path, config_path: Path, socket_path: Path, name: str = "service") -> None:
        self.workdir = workdir
        self.config_path = config_path
        self.socket_path = socket_path
        self.log_path = workdir / f"{name}.log"
        self.name = name
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServiceProcess:
        cmd = [sys.executable, "-m", "edge.cli", "run", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            # SIGKILL if the test run dies: a service stopped by SIGSTOP would never act on SIGTERM.
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True,
                                         preexec_fn=die_with_parent(signal.SIGKILL))
        try:
            wait_for(self._ticking, timeout_s, f"{self.name} to answer status with a completed tick",
                     interval_s=0.1, describe=self.log_tail)
        except BaseException:
            self.stop()
            raise
        logger.info("%s pid %d ready", self.name, self.proc.pid)
        return self

    def _ticking(self) -> bool:
        self.check_alive()
        if not self.socket_path.exists():
            return False
        try:
            reply = self.request({"cmd": "status"})
        except EdgeError:
            return False  # bound but not accepting yet, or mid-start
        return bool(reply.get("ok")) and reply.get("counters", {}).get("ticks", 0) > 0

    def check_alive(self) -> None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None:
            raise AssertionError(f"{self.name} exited with rc {rc}\n{self.log_tail()}")

    def request(self, request: dict[str, Any], timeout_s: float = 5.0) -> dict:
        return send_request(self.socket_path, request, timeout_s=timeout_s)

    def status(self) -> dict:
        reply = self.request({"cmd": "status"})
        assert reply["ok"], reply
        return reply

    def say(self, text: str) -> None:
        reply = self.request({"cmd": "say", "text": text})
        assert reply["ok"], f"say {text!r} refused: {reply}"

    def send_raw(self, payload: bytes, timeout_s: float = 5.0) -> list[dict]:
        """Write raw bytes on one connection, half-close, and return every reply line (decoded)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.socket_path))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = bytearray()
            while chunk := sock.recv(65536):
                data += chunk
        return [json.loads(line) for line in bytes(data).splitlines() if line.strip()]

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise WaitTimeout(f"{self.name} did not exit within {timeout_s:g} s\n{self.log_tail()}") from exc

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines, self.name)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, self.name)


def short_tempdir(prefix: str = "vla-faults-") -> Path:
    """A short directory path: a UNIX socket path is limited to 107 bytes, pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix=prefix))


# -- measurements --------------------------------------------------------------------------------------------
def wait_driving(sim: SimulatedRobot, what: str, timeout_s: float = MOVE_TIMEOUT_S,
                 describe: Callable[[], str] | None = None) -> dict:
    """Wait until the wheels turn; returns that ground-truth sample."""

    def probe() -> dict | None:
        gt = sim.ground_truth()
        return gt if is_driving(gt) else None

    return wait_for(probe, timeout_s, f"the robot to drive ({what})", describe=describe)


def wait_stopped_since(sim: SimulatedRobot, since_s: float, timeout_s: float,
                       describe: Callable[[], str] | None = None) -> dict:
    """Wait for a stopped stretch that began after ``since_s``; returns that ground-truth sample."""

    def probe() -> dict | None:
        gt = sim.ground_truth()
        stopped_since = gt["motors_stopped_since_s"]
        return gt if gt["motors_stopped"] and stopped_since is not None and stopped_since >= since_s else None

    return wait_for(probe, timeout_s, "the motors to stop", describe=describe)


@dataclass
class FaultResult:
    """One row of the results table."""

    fault: str
    time_to_stop_s: float | None = None  # fault injected -> every wheel below 2 % of full speed
    bound_s: float | None = None  # what the test asserts time_to_stop_s against
    stopped_by: str = ""  # which layer stopped the motors
    recovery_s: float | None = None  # fault cleared -> the robot drives again
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # fault injected -> every target the controller applies is 0 (the host's reaction, or the watchdog's)
    time_to_zero_command_s: float | None = None


def zero_command_s(ground_truth: dict, t0: float) -> float | None:
    """From `t0` to when the controller's applied targets became all zero (None if they were before t0)."""
    since = ground_truth.get("targets_zero_since_s")
    return None if since is None or since < t0 else since - t0


class ResultsBook:
    """Collects FaultResults; ``write`` puts them in JSON and a Markdown table (when RESULTS_ENV is set)."""

    def __init__(self) -> None:
        self.rows: list[FaultResult] = []

    def add(self, row: FaultResult) -> FaultResult:
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1e3:.0f} ms"

        lines = ["| fault | zero command at the controller | standstill | bound (standstill) | stopped by | "
                 "recovery | notes |",
                 "|---|---:|---:|---:|---|---:|---|"]
        for row in self.rows:
            lines.append(f"| {row.fault} | {ms(row.time_to_zero_command_s)} | {ms(row.time_to_stop_s)} | "
                         f"{ms(row.bound_s)} | {row.stopped_by} | {ms(row.recovery_s)} | {row.notes} |")
        return "\n".join(lines) + "\n"

    def write(self, json_path: Path) -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"generated_by": "tests/faults/test_faults.py", "machine_cpus": os.cpu_count(),
                   "results": [asdict(row) for row in self.rows]}
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
        json_path.with_suffix(".md").write_text(self.markdown())
