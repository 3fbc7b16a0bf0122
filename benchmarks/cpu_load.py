"""The competing CPU load: a separate process that burns one core while resumed (benchmarks.burn).

The side-by-side rounds and the closed loop switch it on for their loaded halves (``load_state``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.settings import REPO_ROOT
from edge.errors import ConfigError
from simulator.process import child_env

logger = logging.getLogger(__name__)


def proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces; fields after it are space-separated.
    return text[text.rindex(")") + 2 :].split()


class CpuBurner:
    """A separate process that burns one core while resumed and is stopped (SIGSTOP) otherwise.

    ``start()`` leaves it paused; ``resume()``/``pause()`` switch the load on and off and return only
    once the kernel shows the new state; ``stop()`` kills it. It is bounded in time three ways: it
    exits by itself after ``max_seconds``, it is killed when this process dies, and ``stop()``.
    """

    def __init__(self, max_seconds: float, state_timeout_s: float = 5.0):
        if not max_seconds > 0:
            raise ConfigError(f"cpu load max_seconds must be > 0, got {max_seconds!r}")
        self.max_seconds = float(max_seconds)
        self.state_timeout_s = state_timeout_s
        self._process: subprocess.Popen | None = None
        self._resumed_at: float | None = None
        self.loaded_wall_s = 0.0

    def start(self) -> CpuBurner:
        if self._process is not None:
            raise RuntimeError("cpu load already started")
        self._process = subprocess.Popen([sys.executable, "-m", "benchmarks.burn", repr(self.max_seconds)],
                                         cwd=REPO_ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL)
        self._wait_state(lambda state: state == "T", "stopped")
        logger.info("cpu load process %d ready (paused; exits by itself after %.0f s)", self.pid, self.max_seconds)
        return self

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("cpu load not started")
        return self._process.pid

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def is_loading(self) -> bool:
        return self._resumed_at is not None

    def resume(self) -> None:
        if self._resumed_at is not None:
            return
        self._require_alive()
        os.kill(self.pid, signal.SIGCONT)
        self._wait_state(lambda state: state != "T", "running")
        self._resumed_at = time.monotonic()

    def pause(self) -> None:
        if self._resumed_at is None:
            return
        self._require_alive()
        os.kill(self.pid, signal.SIGSTOP)
        self._wait_state(lambda state: state == "T", "stopped")
        self.loaded_wall_s += time.monotonic() - self._resumed_at
        self._resumed_at = None

    def cpu_seconds(self) -> float:
        """User + system CPU time the load process has burnt so far."""
        fields = proc_stat(self.pid)
        if fields is None:
            return math.nan
        # utime and stime are fields 14 and 15 of /proc/PID/stat; the list starts at field 3 (state).
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._resumed_at is not None:
            self.loaded_wall_s += time.monotonic() - self._resumed_at
            self._resumed_at = None
        if process.poll() is None:
            process.kill()  # SIGKILL also ends a stopped process
        process.wait(timeout=self.state_timeout_s)

    def __enter__(self) -> CpuBurner:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _require_alive(self) -> None:
        if not self.is_running:
            raise RuntimeError(f"cpu load process exited (code {self._process and self._process.returncode}); "
                               f"its time bound of {self.max_seconds:.0f} s may be too short for this run")

    def _wait_state(self, wanted: Callable[[str], bool], what: str) -> None:
        deadline = time.monotonic() + self.state_timeout_s
        while time.monotonic() < deadline:
            fields = proc_stat(self.pid)
            if fields is None or self._process.poll() is not None:
                raise RuntimeError(f"cpu load process {self.pid} exited while waiting for it to be {what}")
            if wanted(fields[0]):
                return
            time.sleep(0.002)
        raise RuntimeError(f"cpu load process {self.pid} did not become {what} within {self.state_timeout_s} s")


@contextlib.contextmanager
def load_state(burner: CpuBurner | None, loaded: bool) -> Iterator[None]:
    if burner is not None and loaded:
        burner.resume()
        try:
            yield
        finally:
            burner.pause()
    else:
        yield

