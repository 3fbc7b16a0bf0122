"""Part 3: start-up and memory: the runtime alone in a subprocess (benchmarks.runtime_child), and
`vla-edge run` against the simulator until the controller has seen its first command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.configs import PipelineSpec
from benchmarks.settings import REPO_ROOT
from edge.errors import BackendError
from simulator.process import GroundTruthClient, SimulatorPaths, child_env, stop_process


def measure_runtime_process(bundle_dir: Path, spec: PipelineSpec, samples: int, iterations: int = 20,
                            timeout_s: float = 120.0) -> dict:
    """RSS and start-up pieces of the runtime alone, in a subprocess that imports only edge."""
    policy = spec.policy(samples)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "benchmarks.runtime_child", str(bundle_dir.resolve()),
                           json.dumps(policy), str(iterations)], cwd=REPO_ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise BackendError(f"the runtime subprocess failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Both processes stamp with CLOCK_MONOTONIC: this includes the interpreter's own start-up.
    result["spawn_to_first_infer_s"] = result.pop("first_infer_monotonic_s") - started
    result.update({"config": spec.key, "target": spec.target, "samples": samples,
                   "process_wall_s": time.monotonic() - started})
    return result


def _cli_command() -> list[str]:
    found = shutil.which("vla-edge")
    return [found] if found else [sys.executable, "-m", "edge.cli"]


def measure_start_to_first_command(bundle_dir: Path, spec: PipelineSpec, samples: int, robot: SimulatorPaths,
                                   truth: GroundTruthClient, work_dir: Path, timeout_s: float = 90.0) -> dict:
    """Start `vla-edge run` on the simulator; time until the controller has seen its first command."""
    import yaml

    instruction = truth.ground_truth()["instruction"]
    policy = spec.policy(samples)
    config = {
        "bundle": str(bundle_dir.resolve()),
        "camera": {"source": robot.camera_url, "open_timeout_s": 15.0},
        "motor": {"port": robot.serial},
        "policy": policy,
        "instruction": {"initial": instruction},
        "loop": {"summary_every_s": 3600.0},
    }
    config_path = work_dir / "robot.benchmark.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = work_dir / "vla-edge-run.log"
    command = [*_cli_command(), "run", "--config", str(config_path)]
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
        first_command = None
        try:
            deadline = started + timeout_s
            while time.monotonic() < deadline and process.poll() is None:
                seen = truth.ground_truth()["last_valid_command_s"]
                # Both sides stamp with CLOCK_MONOTONIC, which all processes of a machine share.
                if seen is not None and seen > started:
                    first_command = seen - started
                    break
                time.sleep(0.02)
        finally:
            exit_code = stop_process(process, "vla-edge run", timeout_s=15.0)
    text = log_path.read_text(errors="replace")
    ready = re.search(r"ready ([0-9.]+) s after start", text)
    # Program names only: the report is shared, the paths of this machine mean nothing elsewhere.
    shown = " ".join([Path(command[0]).name, *command[1:3]])
    result = {"method": f"`vla-edge run` ({shown}) until the simulator saw its first command",
              "exit_code": exit_code, "log": str(log_path),
              "start_to_first_command_s": first_command,
              "service_ready_s": float(ready.group(1)) if ready else None}
    if first_command is None:
        result["error"] = (f"no command reached the controller within {timeout_s:.0f} s; last log lines: "
                           + " | ".join(text.strip().splitlines()[-3:]))
    return result

