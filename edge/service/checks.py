"""One pre-flight check's result (OK / WARN / FAIL with what to do), and the permission helpers the
checks share. Used by doctor (edge/service/doctor.py) and its device checks."""

from __future__ import annotations

import enum
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Status(str, enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    name: str  # what was checked: config, bundle, tensorrt, engine, onnxruntime, serial, camera, ...
    status: Status
    message: str  # what was found
    fix: str | None = None  # what to do about a WARN or FAIL

    def line(self) -> str:
        text = f"{self.status.value:<5} {self.name}: {self.message}"
        return text + (f" -> {self.fix}" if self.fix else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "message": self.message, "fix": self.fix}


def ok(name: str, message: str) -> CheckResult:
    return CheckResult(name, Status.OK, message)


def warn(name: str, message: str, fix: str | None = None) -> CheckResult:
    return CheckResult(name, Status.WARN, message, fix)


def fail(name: str, message: str, fix: str | None = None) -> CheckResult:
    return CheckResult(name, Status.FAIL, message, fix)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _access_problem(path: Path, st: os.stat_result, mode: int, role_group: str) -> str | None:
    """None when this process may open `path` with `mode`; otherwise a sentence on who may."""
    if os.access(path, mode, effective_ids=os.access in os.supports_effective_ids):
        return None
    group = _group_name(st.st_gid)
    member = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    rights = stat.filemode(st.st_mode)
    owner = st.st_uid
    if member:
        why = f"the group {group!r} has no {'read/write' if mode & os.W_OK else 'read'} permission ({rights})"
    else:
        why = (f"it is {rights}, owner uid {owner}, group {group!r}, and user {_user_name()!r} is not in "
               f"group {group!r}")
    return (f"{why}. Add the user to the group (`sudo usermod -aG {group} {_user_name()}`, then log in again; "
            f"the systemd unit's SupplementaryGroups= lists {role_group})")
