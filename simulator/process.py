"""`python -m simulator` as a child process: one lifecycle for the demo, the comparison, the benchmark and
the tests.

    config = SimulatorConfig(seed=3, target="red block")
    with SimulatorProcess(config, log_path=out / "simulator.log") as sim:
        sim.paths.serial, sim.paths.camera_url        # what the runtime is given as its robot
        with GroundTruthClient(sim.paths.ground_truth) as truth:
            truth.ground_truth()                      # pose, success, motors stopped, ...

``start()`` returns once the simulator has printed its paths (``--print-paths``: one JSON line on
stdout, written after the pty and the camera are up); that line is what "ready" means. Its logs
(stderr) go to the file the caller names; if it dies or says nothing during start-up, the error
carries the log's last lines. ``stop()`` sends SIGTERM, then SIGKILL after ``stop_timeout_s``, and
always reaps. The child gets its own session (a terminal's Ctrl-C reaches only the parent, which then
stops it in order) and SIGTERM when the thread that started it dies, so a killed parent leaves no
simulated robot behind.

``stop_process``, ``child_env`` and ``die_with_parent`` are the same steps for the other children the
callers start beside the simulator (``vla-edge run``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_MAX_PATHS_LINE_BYTES = 65536


class SimulatorError(RuntimeError):
    """The simulator did not start, died, or its ground-truth port refused or dropped a request."""


@dataclass(frozen=True)
class SimulatorConfig:
    seed: int = 0  # episode seed: layout, target, lighting
    target: str | None = None  # target object; None: chosen by the seed
    ground_truth: bool = True  # serve ground truth and the fault hooks on a free 127.0.0.1 port
    # The controller's command watchdog; None: the simulator's default (the protocol's 0.3 s).
    watchdog_timeout_s: float | None = None
    log_level: str = "WARNING"
    ready_timeout_s: float = 30.0  # start -> paths printed; generous for a loaded 2-core machine
    stop_timeout_s: float = 10.0  # SIGTERM -> exit, before SIGKILL

    def __post_init__(self) -> None:
        for name in ("ready_timeout_s", "stop_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SimulatorConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.watchdog_timeout_s is not None and not self.watchdog_timeout_s > 0:
            raise ValueError(f"SimulatorConfig.watchdog_timeout_s must be > 0 or None, got {self.watchdog_timeout_s!r}")

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "simulator", "--seed", str(self.seed), "--print-paths",
               "--log-level", self.log_level]
        if self.target is not None:
            cmd += ["--target", self.target]
        if self.ground_truth:
            cmd += ["--ground-truth-port", "0"]
        if self.watchdog_timeout_s is not None:
            cmd += ["--watchdog-timeout-s", repr(self.watchdog_timeout_s)]
        return cmd


@dataclass(frozen=True)
class SimulatorPaths:
    """What `python -m simulator --print-paths` printed."""

    serial: str  # stable symlink to the pty: the runtime's motor port
    pty: str
    camera_url: str
    ground_truth: str | None  # "127.0.0.1:PORT", or None when not served


class SimulatorProcess:
    """`python -m simulator` as a child process: ``start`` (returns once ready), ``paths``, ``is_running``,
    ``stop``; a context manager."""

    def __init__(self, config: SimulatorConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = Path(log_path)
        self._process: subprocess.Popen | None = None
        self._paths: SimulatorPaths | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> SimulatorProcess:
        if self._process is not None:
            raise SimulatorError("simulator already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            # stdout carries the one JSON line with the paths; the logs go to stderr (the file).
            self._process = subprocess.Popen(self.config.command(), cwd=REPO_ROOT, env=child_env(),
                                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                             start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
        try:
            self._paths = self._read_paths()
        except BaseException:
            self.stop()
            raise
        logger.info("simulator pid %d: serial %s, camera %s", self.pid, self._paths.serial, self._paths.camera_url)
        return self

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after ``stop_timeout_s``; reaps. The exit code, or None if never started."""
        process, self._process = self._process, None
        if process is None:
            return None
        try:
            return stop_process(process, "simulator", self.config.stop_timeout_s)
        finally:
            if process.stdout is not None:
                process.stdout.close()

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------------------
    @property
    def paths(self) -> SimulatorPaths:
        if self._paths is None:
            raise SimulatorError("simulator not started")
        return self._paths

    @property
    def pid(self) -> int:
        if self._process is None:
            raise SimulatorError("simulator not started")
        return self._process.pid

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def send_signal(self, signum: int) -> None:
        if self._process is None:
            raise SimulatorError("simulator not started")
        self._process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Its exit code once it has exited by itself (or on a signal sent to it); reaps it."""
        if self._process is None:
            raise SimulatorError("simulator not started")
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise SimulatorError(f"simulator did not exit within {timeout_s:g} s\n{self.log_tail()}") from exc

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines, "simulator")

    # -- start-up -------------------------------------------------------------------------------------
    def _read_paths(self) -> SimulatorPaths:
        assert self._process is not None and self._process.stdout is not None
        timeout_s = self.config.ready_timeout_s
        line = _read_line(self._process.stdout.fileno(), timeout_s)
        if line is None:
            raise SimulatorError(f"the simulator printed no paths within {timeout_s:g} s\n{self.log_tail()}")
        if not line.strip():
            try:
                code = self._process.wait(5.0)  # stdout closed: it is exiting
            except subprocess.TimeoutExpired:
                code = None
            raise SimulatorError(f"the simulator exited (code {code}) before printing its paths\n{self.log_tail()}")
        try:
            raw = json.loads(line)
            return SimulatorPaths(serial=raw["serial"], pty=raw["pty"], camera_url=raw["camera_url"],
                                  ground_truth=raw.get("ground_truth"))
        except (ValueError, KeyError, TypeError) as exc:
            raise SimulatorError(f"the simulator printed {line!r}, not its paths ({exc})\n{self.log_tail()}") from exc


def _read_line(fd: int, timeout_s: float) -> str | None:
    """One line from a pipe within ``timeout_s``: the line, "" at end of file, None on time-out."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
        if len(data) > _MAX_PATHS_LINE_BYTES:
            break
    return data.split(b"\n", 1)[0].decode(errors="replace")


# -- the ground-truth port -----------------------------------------------------------------------------
class GroundTruthClient:
    """JSON-lines client of the simulator's ground-truth port (tests, demo and benchmark only; the runtime
    never uses it). One request/reply at a time on one connection; safe to share between threads."""

    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        host, port = address.rsplit(":", 1)  # "127.0.0.1:PORT", as the simulator prints it
        self._sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self._reader = self._sock.makefile("rb")
        self._lock = threading.Lock()

    def ask(self, payload: dict[str, Any] | str = "ground_truth") -> dict[str, Any]:
        """The simulator's reply, whether it accepted the request or not."""
        line = payload if isinstance(payload, str) else json.dumps(payload)
        with self._lock:
            self._sock.sendall(line.encode() + b"\n")
            reply = self._reader.readline()
        if not reply:
            raise SimulatorError("the simulator closed its ground-truth port (did it exit?)")
        return json.loads(reply)

    def request(self, payload: dict[str, Any] | str) -> dict[str, Any]:
        """The reply to a request the simulator must accept; SimulatorError if it refuses."""
        reply = self.ask(payload)
        if not reply.get("ok"):
            raise SimulatorError(f"simulator refused {payload}: {reply.get('error')}")
        return reply

    def ground_truth(self) -> dict[str, Any]:
        return self.request("ground_truth")["ground_truth"]

    def command(self, name: str, **args: Any) -> dict[str, Any]:
        """reset_episode or a fault hook (unplug, freeze_camera, ...), see `python -m simulator --help`."""
        return self.request({"cmd": name, "args": args})

    def close(self) -> None:
        for closable in (self._reader, self._sock):
            with contextlib.suppress(OSError):
                closable.close()

    def __enter__(self) -> GroundTruthClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- steps shared with the other child processes --------------------------------------------------------
def stop_process(process: subprocess.Popen, name: str, timeout_s: float = 10.0) -> int:
    """SIGTERM (after SIGCONT: a stopped process acts on nothing else), SIGKILL if it is still there after
    ``timeout_s``; always reaps. Returns the exit code (negative: the signal that ended it)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGTERM for %g s; killing it", name, process.pid, timeout_s)
            process.kill()
    return process.wait()


def child_env() -> dict[str, str]:
    """This environment for a child that runs this source tree's modules (`python -m ...`)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # its log lines reach the file as they happen
    # A child must never talk to a systemd that may be supervising the parent.
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def die_with_parent(signum: int) -> Callable[[], None] | None:
    """A preexec_fn: the child gets ``signum`` when the thread that started it dies (PR_SET_PDEATHSIG),
    so even a SIGKILLed parent leaves no child running. None where the platform has no prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError) as exc:
        logger.debug("no prctl here (%s): children outlive a killed parent", exc)
        return None

    def set_death_signal() -> None:
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    return set_death_signal


def log_tail(path: Path, lines: int, name: str) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({name} log {path} does not exist)"
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])
