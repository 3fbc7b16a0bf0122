"""Doctor's Jetson performance check: the power mode (`nvpmodel -q`) and whether `jetson_clocks` has
locked the clocks at their maximum (`jetson_clocks --show`).

A Jetson in a lower power mode, or with dynamic clocks, runs the policy slower and with more jitter than
the benchmark measured; the 10 Hz tick then misses its deadline under load. Not an error: a WARN with
the command that fixes it. Off a Jetson (no /etc/nv_tegra_release) the check is skipped: it returns
nothing.

The commands are run through an injectable ``runner`` (argv -> (exit status, output)), so the parsing is
tested with the outputs the tools print.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from edge.service.checks import CheckResult, ok, warn

Runner = Callable[[list[str]], tuple[int, str]]

RELEASE_FILE = Path("/etc/nv_tegra_release")
_TIMEOUT_S = 5.0
_POWER_MODE = re.compile(r"^NV Power Mode:\s*(\S.*?)\s*$", re.MULTILINE)
# jetson_clocks --show: "GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=..." and one
# "cpuN: Online=1 Governor=... MinFreq=... MaxFreq=... CurrentFreq=..." per core.
_FREQS = re.compile(r"^(GPU|EMC|cpu\d+)\b.*?MinFreq=(\d+)\s+MaxFreq=(\d+)", re.MULTILINE)


def run_command(argv: list[str]) -> tuple[int, str]:
    """Run a command for its output; 127 when it is not installed, 124 when it hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return 127, ""
    except subprocess.TimeoutExpired:
        return 124, ""
    return done.returncode, (done.stdout or "") + (done.stderr or "")


def check_jetson_power(runner: Runner = run_command, release_file: Path = RELEASE_FILE) -> list[CheckResult]:
    if not release_file.is_file():
        return []  # not a Jetson
    return [_power_mode(runner), _clocks(runner)]


def _power_mode(runner: Runner) -> CheckResult:
    status, output = runner(["nvpmodel", "-q"])
    found = _POWER_MODE.search(output)
    if status != 0 or found is None:
        return warn("power mode", f"cannot read the power mode (`nvpmodel -q` exited {status})",
                    "install JetPack's nvpmodel (package nvidia-l4t-nvpmodel) and run `nvpmodel -q`")
    mode = found.group(1)
    if mode.upper().startswith("MAXN"):
        return ok("power mode", f"nvpmodel {mode}: maximum performance")
    return warn("power mode", f"nvpmodel {mode} is not the maximum-performance mode (MAXN): the policy runs "
                "slower than benchmarked", "sudo nvpmodel -m <id of the MAXN mode in /etc/nvpmodel.conf> "
                "(0 on AGX Orin and Orin NX/Nano), then check with `nvpmodel -q`")


def _clocks(runner: Runner) -> CheckResult:
    status, output = runner(["jetson_clocks", "--show"])
    freqs = {name: (int(low), int(high)) for name, low, high in _FREQS.findall(output)}
    if status != 0 or "GPU" not in freqs:
        return warn("jetson_clocks", f"cannot read the clock state (`jetson_clocks --show` exited {status}; it "
                    "needs root)", "run `sudo jetson_clocks --show` to see it, `sudo jetson_clocks` to lock the "
                    "clocks at their maximum")
    unlocked = sorted(name for name, (low, high) in freqs.items() if low != high)
    if unlocked:
        return warn("jetson_clocks", f"clocks are not locked at their maximum ({', '.join(unlocked)} scale "
                    "between MinFreq and MaxFreq): inference latency varies with load",
                    "sudo jetson_clocks (a systemd unit or rc.local can run it at boot)")
    return ok("jetson_clocks", f"clocks locked at their maximum ({len(freqs)} domains)")
