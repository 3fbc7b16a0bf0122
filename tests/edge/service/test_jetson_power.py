"""The doctor's Jetson power check against the outputs nvpmodel and jetson_clocks print (AGX Orin,
JetPack 6), through an injected runner; skipped where there is no /etc/nv_tegra_release."""

from __future__ import annotations

import pytest

from edge.service.checks import Status
from edge.service.jetson_power import check_jetson_power, run_command

NVPMODEL_MAXN = "NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n"
NVPMODEL_15W = "NV Power Mode: 15W\n2\n"
_CPUS = "".join(f"cpu{i}: Online=1 Governor=schedutil MinFreq={{low}} MaxFreq=2201600 CurrentFreq=1728000 "
                f"IdleStates: WFI=1 c7=1\n" for i in range(4))
_SHOW = ("SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit\nOnline CPUs: 0-3\n" + _CPUS
         + "GPU MinFreq={gpu_low} MaxFreq=1300500000 CurrentFreq=1300500000\n"
         "EMC MinFreq=3199000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1\n"
         "DLA0_CORE:   Online=1 MinFreq=0 MaxFreq=1600000000 CurrentFreq=1600000000\n"
         "NV Power Mode: MAXN\n")
CLOCKS_LOCKED = _SHOW.format(low=2201600, gpu_low=1300500000)
CLOCKS_DYNAMIC = _SHOW.format(low=115200, gpu_low=306000000)


@pytest.fixture
def jetson(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    return release


def runner_for(outputs):
    calls = []

    def run(argv):
        calls.append(argv[0])
        return outputs[argv[0]]

    run.calls = calls
    return run


def test_skipped_off_a_jetson(tmp_path):
    run = runner_for({})
    assert check_jetson_power(run, tmp_path / "absent") == [] and run.calls == []


def test_maxn_with_locked_clocks_is_ok(jetson):
    results = check_jetson_power(runner_for({"nvpmodel": (0, NVPMODEL_MAXN), "jetson_clocks": (0, CLOCKS_LOCKED)}),
                                 jetson)
    assert [r.status for r in results] == [Status.OK, Status.OK]
    assert "MAXN" in results[0].message and "6 domains" in results[1].message


def test_a_lower_power_mode_and_dynamic_clocks_warn_with_the_fix(jetson):
    results = check_jetson_power(runner_for({"nvpmodel": (0, NVPMODEL_15W), "jetson_clocks": (0, CLOCKS_DYNAMIC)}),
                                 jetson)
    assert [r.status for r in results] == [Status.WARN, Status.WARN]
    assert "nvpmodel 15W is not the maximum-performance mode" in results[0].message
    assert "nvpmodel -m" in results[0].fix
    assert "GPU, cpu0, cpu1, cpu2, cpu3 scale" in results[1].message and results[1].fix.startswith("sudo jetson_clocks")


def test_tools_that_cannot_run_warn_instead_of_failing(jetson):
    results = check_jetson_power(runner_for({"nvpmodel": (127, ""), "jetson_clocks": (1, "Permission denied\n")}),
                                 jetson)
    assert [r.status for r in results] == [Status.WARN, Status.WARN]
    assert "exited 127" in results[0].message and "needs root" in results[1].message


def test_the_default_runner_reports_a_missing_command():
    assert run_command(["vla-edge-no-such-command"]) == (127, "")
