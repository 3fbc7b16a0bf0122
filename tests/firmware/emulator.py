"""The AVR image in simavr (firmware/sim/avr_pty_runner.c): its pty, and what its pins did, in emulated time.

``AvrEmulator(runner, elf).start()`` runs the chip on the wall clock; a reader thread collects the
runner's lines: each host frame delimiter reaching the UART (``rx_us``) and each change of the motor
outputs (``pwm``), stamped with the chip's own time in microseconds since reset.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PWM_TOP = 799  # firmware/avr/board_config.h
STBY = 0x10


@dataclass(frozen=True)
class PwmSample:
    t_us: int
    compare: tuple[int, int]
    top: int
    porta: int

    @property
    def duties(self) -> tuple[float, float]:
        """Signed duty per motor as the driver sees it: PWM / TOP, sign from IN1/IN2, 0 when off or braking."""
        duties = []
        for k in (0, 1):
            in1, in2 = self.porta >> (2 * k) & 1, self.porta >> (2 * k + 1) & 1
            if not self.porta & STBY or in1 == in2 or not self.top:
                duties.append(0.0)
            else:
                duties.append((1.0 if in1 else -1.0) * self.compare[k] / self.top)
        return tuple(duties)

    @property
    def stopped(self) -> bool:
        return self.duties == (0.0, 0.0)


class AvrEmulator:
    def __init__(self, runner: Path, elf: Path, log_path: Path) -> None:
        self._cmd = [str(runner), str(elf)]
        self._log_path = log_path
        self._lock = threading.Lock()
        self.pwm: list[PwmSample] = []
        self.rx_us: list[int] = []
        self.lag_us: list[int] = []
        self.port: str | None = None
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self, timeout_s: float = 30.0) -> AvrEmulator:
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, name="avr-emulator", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise AssertionError(f"the simavr runner printed no pty within {timeout_s:g} s:\n{self.log_tail()}")
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with open(self._log_path, "w") as log:
            for line in self._proc.stdout:
                log.write(line)
                log.flush()
                words = line.split()
                with self._lock:
                    if words[:1] == ["pty"]:
                        self.port = words[1]
                        self._ready.set()
                    elif words[:1] == ["rx"]:
                        self.rx_us.append(int(words[1]))
                    elif words[:1] == ["pwm"]:
                        t, a, b, top, porta = map(int, words[1:6])
                        self.pwm.append(PwmSample(t, (a, b), top, porta))
                    elif words[:1] == ["lag"]:
                        self.lag_us.append(int(words[2]))

    def snapshot(self) -> tuple[list[PwmSample], list[int]]:
        with self._lock:
            return list(self.pwm), list(self.rx_us)

    def wait_for(self, probe, timeout_s: float, what: str):
        """Poll ``probe(pwm, rx)`` until it returns something other than None (a hang guard, not a timing)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            result = probe(*self.snapshot())
            if result is not None:
                return result
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}:\n{self.log_tail()}")

    def check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise AssertionError(f"the simavr runner exited with rc {self._proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no runner output)"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5.0)
        if self._reader is not None:
            self._reader.join(5.0)
