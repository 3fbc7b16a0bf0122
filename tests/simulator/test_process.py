"""The simulator launcher: ready means paths printed, stop always reaps, a failed start says why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from simulator.process import (
    GroundTruthClient,
    SimulatorConfig,
    SimulatorError,
    SimulatorProcess,
    stop_process,
)


def test_start_is_ready_with_paths_and_stop_reaps_and_cleans_up(tmp_path):
    log = tmp_path / "simulator.log"
    sim = SimulatorProcess(SimulatorConfig(seed=5, target="blue ball", log_level="INFO"), log)
    with sim:
        assert sim.is_running
        assert os.path.islink(sim.paths.serial) and os.path.realpath(sim.paths.serial) == sim.paths.pty
        assert sim.paths.camera_url.startswith("http://127.0.0.1:")
        with GroundTruthClient(sim.paths.ground_truth) as truth:
            assert truth.ground_truth()["target"] == "blue ball"
            assert truth.ask({"cmd": "format_disk"})["ok"] is False
            with pytest.raises(SimulatorError, match="format_disk"):
                truth.command("format_disk")
        pid = sim.pid
    assert not sim.is_running
    assert not os.path.exists(f"/proc/{pid}")  # reaped, not a zombie
    assert not os.path.lexists(sim.paths.serial)  # SIGTERM let it remove its symlink
    assert "simulator running" in log.read_text()  # its logs went to the named file
    assert sim.stop() is None  # a second stop is harmless


def test_a_simulator_that_dies_at_start_up_raises_with_its_log(tmp_path):
    sim = SimulatorProcess(SimulatorConfig(target="purple cube"), tmp_path / "simulator.log")
    with pytest.raises(SimulatorError, match="exited") as raised:
        sim.start()
    assert "invalid choice" in str(raised.value)  # the log's last lines, as argparse wrote them
    assert not sim.is_running


def test_a_silent_start_times_out_and_leaves_no_process(tmp_path):
    sim = SimulatorProcess(SimulatorConfig(ready_timeout_s=0.01), tmp_path / "simulator.log")
    with pytest.raises(SimulatorError, match="no paths within"):
        sim.start()
    assert not sim.is_running


def test_stop_process_kills_a_child_that_ignores_sigterm():
    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\ntime.sleep(60)"],
                             stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # SIGTERM is ignored from here on
        assert stop_process(child, "stubborn", timeout_s=0.2) == -signal.SIGKILL
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
