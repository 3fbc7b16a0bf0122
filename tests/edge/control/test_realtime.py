"""Real-time setup. Settings that change the process run in a child process, so the test
runner itself never becomes SCHED_FIFO, pinned, memory-locked or gc-frozen."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.control.realtime import (
    RealtimeConfig,
    collect_in_slack,
    configure_realtime,
    freeze_gc_after_warmup,
)
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
NOBODY = 65534
CAP_IPC_LOCK, CAP_SYS_NICE = 14, 23

CHILD = r"""
import dataclasses, gc, json, logging, os, resource, sys
# Import everything first: once the child is "nobody" it may not be able to read the
# interpreter's own library folder (e.g. a pyenv under /root).
from edge.control.realtime import RealtimeConfig, configure_realtime
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
drop = sys.argv[1] == "unprivileged"
if drop:
    # Lowering limits is always allowed; then leave root, which clears every capability.
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    small = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (small, small))
    if os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError as exc:
            print(f"cannot drop privileges: {exc}", file=sys.stderr)
            sys.exit(3)
cfg = json.loads(sys.argv[2])
if cfg.get("cpu_affinity") is not None:
    cfg["cpu_affinity"] = tuple(cfg["cpu_affinity"])
report = configure_realtime(RealtimeConfig(**cfg))
status = open("/proc/self/status").read()
cap_eff = int(status.split("CapEff:")[1].split()[0], 16)
vm_lck_kb = int(status.split("VmLck:")[1].split()[0])
print(json.dumps({
    "report": dataclasses.asdict(report),
    "policy": os.sched_getscheduler(0),
    "priority": os.sched_getparam(0).sched_priority,
    "affinity": sorted(os.sched_getaffinity(0)),
    "gc_enabled": gc.isenabled(),
    "freeze_count": gc.get_freeze_count(),
    "cap_eff": cap_eff,
    "vm_lck_kb": vm_lck_kb,
}))
""".replace("NOBODY", str(NOBODY))


def run_child(mode, **config):
    if not sys.platform.startswith("linux"):
        pytest.skip("real-time setup is Linux-only")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/",
    )
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr  # never raises for missing permission
    return json.loads(proc.stdout), proc.stderr


def has_cap(cap_eff, bit):
    return bool(cap_eff >> bit & 1)


def test_unprivileged_refusals_are_reported_with_one_warning_and_no_error():
    cpu = min(os.sched_getaffinity(0))
    out, stderr = run_child(
        "unprivileged", sched_fifo_priority=10, cpu_affinity=[cpu], lock_memory=True, freeze_gc=True
    )
    if has_cap(out["cap_eff"], CAP_SYS_NICE) or has_cap(out["cap_eff"], CAP_IPC_LOCK):
        pytest.skip("child still holds CAP_SYS_NICE/CAP_IPC_LOCK; cannot test refusals here")
    report = out["report"]
    assert report["sched_fifo_priority"] is None
    assert report["memory_locked"] is False
    assert any(r.startswith("SCHED_FIFO priority 10 (EPERM") for r in report["refused"])
    assert any(r.startswith("mlockall") and "RLIMIT_MEMLOCK" in r for r in report["refused"])
    # What is permitted is still applied.
    assert report["cpu_affinity"] == [cpu] and out["affinity"] == [cpu]
    assert report["gc_frozen"] is True and out["gc_enabled"] is False and out["freeze_count"] > 0
    assert any(a.startswith("cpu affinity") for a in report["applied"])
    # The process really stayed SCHED_OTHER and unlocked.
    assert out["policy"] == os.SCHED_OTHER
    assert out["vm_lck_kb"] == 0
    warnings = [line for line in stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, stderr
    for grant in (
        "CPUSchedulingPolicy=fifo",
        "CPUSchedulingPriority=10",
        "LimitRTPRIO=10",
        "LimitMEMLOCK=infinity",
    ):
        assert grant in warnings[0]
        assert grant in report["grant_hint"]


def test_nothing_requested_changes_nothing_and_warns_nothing():
    out, stderr = run_child("unprivileged", freeze_gc=False)
    assert out["report"]["applied"] == [] and out["report"]["refused"] == []
    assert out["report"]["grant_hint"] is None
    assert out["gc_enabled"] is True
    assert "WARNING" not in stderr


def test_privileged_settings_are_really_applied():
    if os.geteuid() != 0 and not has_cap(_own_cap_eff(), CAP_SYS_NICE):
        pytest.skip("needs root or CAP_SYS_NICE + CAP_IPC_LOCK")
    out, stderr = run_child("privileged", sched_fifo_priority=10, lock_memory=True, freeze_gc=False)
    report = out["report"]
    if report["refused"]:
        pytest.skip(f"refused even with privileges here: {report['refused']}")
    assert report["sched_fifo_priority"] == 10
    assert out["policy"] == os.SCHED_FIFO and out["priority"] == 10
    assert report["memory_locked"] is True and out["vm_lck_kb"] > 0
    assert "WARNING" not in stderr


def _own_cap_eff():
    with open("/proc/self/status") as status:
        return int(status.read().split("CapEff:")[1].split()[0], 16)


@pytest.mark.parametrize("prio", [0, 100, -5, True, 10.5, "50"])
def test_priority_outside_1_to_99_is_a_config_error(prio):
    with pytest.raises(ConfigError, match=r"realtime\.sched_fifo_priority .*1\.\.99"):
        RealtimeConfig(sched_fifo_priority=prio)


@pytest.mark.parametrize("cpus", [(), (-1,), ("0",), (True,), "0,1"])
def test_malformed_cpu_affinity_is_a_config_error(cpus):
    with pytest.raises(ConfigError, match=r"realtime\.cpu_affinity"):
        RealtimeConfig(cpu_affinity=cpus)


def test_cpu_not_present_is_a_config_error_and_nothing_is_applied():
    before = os.sched_getaffinity(0)
    absent = max(before) + 1000
    with pytest.raises(ConfigError, match=rf"CPU\(s\) \[{absent}\].*available CPUs"):
        configure_realtime(RealtimeConfig(cpu_affinity=(absent,), freeze_gc=False))
    assert os.sched_getaffinity(0) == before


def test_config_normalises_cpu_list():
    cfg = RealtimeConfig(cpu_affinity=[1, 0, 1])
    assert cfg.cpu_affinity == (0, 1)
    with pytest.raises(ConfigError, match=r"realtime\.lock_memory"):
        RealtimeConfig(lock_memory="yes")


@pytest.fixture
def gc_starts():
    seen = []

    def callback(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def test_collect_in_slack_runs_only_with_enough_slack(gc_starts):
    assert collect_in_slack(0.004, min_slack_s=0.005) is False
    assert collect_in_slack(float("nan"), min_slack_s=0.005) is False
    assert gc_starts == []
    assert collect_in_slack(0.02, min_slack_s=0.005) is True
    assert collect_in_slack(0.02, min_slack_s=0.005, generation=1) is True
    assert gc_starts[-2:] == [0, 1]
    with pytest.raises(ConfigError, match="0 or 1"):
        collect_in_slack(1.0, min_slack_s=0.0, generation=2)


def test_freeze_gc_after_warmup_freezes_and_disables(gc_starts):
    was_enabled = gc.isenabled()
    try:
        frozen = freeze_gc_after_warmup()
        assert gc_starts and gc_starts[0] == 2  # warm-up garbage collected in full first
        assert frozen == gc.get_freeze_count() > 0
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
