"""Real-time setup of the control process, done once at start-up (docs/architecture.md, "Decisions: 9.
Real-time hygiene").

``configure_realtime`` applies, each only when asked for:

- CPU affinity (``os.sched_setaffinity``) and SCHED_FIFO (``os.sched_setscheduler``). On
  Linux both act on the *calling thread*; threads started afterwards inherit them. Call it
  from the control thread, after starting helper threads that should stay at normal
  priority (camera, serial reader) or accept that they inherit it.
- ``mlockall(MCL_CURRENT | MCL_FUTURE)``, so no page of the loop is ever paged out.
- Garbage collection: a full collection, ``gc.freeze()`` (start-up objects move to a
  permanent generation no later collection walks) and ``gc.disable()``. Call
  ``configure_realtime`` after the warm-up (engines loaded, buffers allocated, a few
  inferences run), or set ``freeze_gc=False`` and call ``freeze_gc_after_warmup`` yourself.
  During the loop, ``collect_in_slack`` runs a young-generation collection only when the
  tick has slack to spare.

A setting the process is not permitted to make (no CAP_SYS_NICE or RLIMIT_RTPRIO, no
CAP_IPC_LOCK or too small RLIMIT_MEMLOCK) is not an error: the robot still runs, just with
more jitter. All refusals are logged together as ONE warning naming the systemd unit lines
that grant them, and the report lists what was applied and what was refused. Invalid values
(priority outside 1..99, a CPU this process cannot use) raise ConfigError.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import sys
from dataclasses import dataclass

from edge.errors import ConfigError
from edge.validation import check_bool, check_range, check_sequence

logger = logging.getLogger(__name__)

SCHED_FIFO_MIN_PRIORITY = 1
SCHED_FIFO_MAX_PRIORITY = 99
# <sys/mman.h> values on x86-64 and aarch64 (Jetson); a few other architectures differ.
_MCL_CURRENT = 1
_MCL_FUTURE = 2
_CAP_IPC_LOCK = 14  # bit in /proc/self/status CapEff
_SOFT_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOMEM, errno.EAGAIN)


@dataclass(frozen=True)
class RealtimeConfig:
    """What real-time settings to ask for; each is optional. Also the ``realtime:`` section of the config."""

    sched_fifo_priority: int | None = None  # 1..99; None keeps SCHED_OTHER; needs LimitRTPRIO= or CAP_SYS_NICE
    cpu_affinity: tuple[int, ...] | None = None  # CPU indices to pin the control thread to; None: all CPUs
    lock_memory: bool = False  # mlockall(MCL_CURRENT | MCL_FUTURE); needs LimitMEMLOCK=infinity
    freeze_gc: bool = True  # collect, gc.freeze() and gc.disable() at the end of configure_realtime

    def __post_init__(self) -> None:
        prio = check_range("realtime.sched_fifo_priority", self.sched_fifo_priority, SCHED_FIFO_MIN_PRIORITY,
                           SCHED_FIFO_MAX_PRIORITY, integer=True, nullable=True, dotted=True)
        object.__setattr__(self, "sched_fifo_priority", prio)
        if self.cpu_affinity is not None:
            cpus = check_sequence("realtime.cpu_affinity", self.cpu_affinity,
                                  lambda key, cpu: check_range(key, cpu, 0, integer=True), noun="CPU indices")
            object.__setattr__(self, "cpu_affinity", tuple(sorted(set(cpus))))
        check_bool("realtime.lock_memory", self.lock_memory)
        check_bool("realtime.freeze_gc", self.freeze_gc)


@dataclass(frozen=True)
class RealtimeReport:
    """What ``configure_realtime`` did."""

    applied: tuple[str, ...] = ()  # e.g. "SCHED_FIFO priority 50", "cpu affinity {2, 3}"
    refused: tuple[str, ...] = ()  # e.g. "SCHED_FIFO priority 50 (EPERM)"
    grant_hint: str | None = None  # the systemd unit lines that would grant the refusals
    sched_fifo_priority: int | None = None  # priority in effect if SCHED_FIFO was applied
    cpu_affinity: tuple[int, ...] | None = None  # affinity in effect if it was applied
    memory_locked: bool = False
    gc_frozen: bool = False

    @property
    def fully_applied(self) -> bool:
        return not self.refused


def configure_realtime(config: RealtimeConfig) -> RealtimeReport:
    """Apply ``config`` to the calling thread/process; never raises for missing permission."""
    applied: list[str] = []
    refused: list[str] = []
    grants: list[str] = []
    fifo_applied: int | None = None
    affinity_applied: tuple[int, ...] | None = None
    memory_locked = False

    if config.cpu_affinity is not None:
        affinity_applied = _apply_affinity(config.cpu_affinity, applied, refused, grants)

    if config.sched_fifo_priority is not None:
        prio = config.sched_fifo_priority
        item = f"SCHED_FIFO priority {prio}"
        if not hasattr(os, "sched_setscheduler"):
            _refuse(item, "not supported on this platform", refused)
        else:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
            except OSError as exc:
                _refuse_or_raise(item, exc, refused)
                grants += [
                    "CPUSchedulingPolicy=fifo",
                    f"CPUSchedulingPriority={prio}",
                    f"LimitRTPRIO={prio}",
                ]
            else:
                applied.append(item)
                fifo_applied = prio

    if config.lock_memory:
        memory_locked = _lock_memory(applied, refused, grants)

    gc_frozen = False
    if config.freeze_gc:
        frozen = freeze_gc_after_warmup()
        applied.append(f"gc frozen ({frozen} objects) and disabled")
        gc_frozen = True

    hint = None
    if refused:
        hint = " ".join(dict.fromkeys(grants)) or None
        logger.warning(
            "real-time settings refused: %s. The control loop runs, with more jitter. To grant them, "
            "add to the [Service] section of the systemd unit: %s (in a container: --cap-add=SYS_NICE "
            "--cap-add=IPC_LOCK --ulimit rtprio=99 --ulimit memlock=-1)",
            "; ".join(refused),
            hint or "nothing available",
        )
    if applied:
        logger.info("real-time settings applied: %s", "; ".join(applied))
    return RealtimeReport(
        applied=tuple(applied),
        refused=tuple(refused),
        grant_hint=hint,
        sched_fifo_priority=fifo_applied,
        cpu_affinity=affinity_applied,
        memory_locked=memory_locked,
        gc_frozen=gc_frozen,
    )


def freeze_gc_after_warmup() -> int:
    """Collect the warm-up garbage, freeze what survives and disable automatic collection.

    Returns how many objects are now frozen. From here on only explicit collections run
    (``collect_in_slack``), and they never walk the frozen start-up objects.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    return gc.get_freeze_count()


def collect_in_slack(remaining_s: float, min_slack_s: float, generation: int = 0) -> bool:
    """Run ``gc.collect(generation)`` only if the tick has at least ``min_slack_s`` left.

    ``generation`` is 0 or 1: a full collection does not belong in a tick. Returns whether
    a collection ran.
    """
    if generation not in (0, 1):
        raise ConfigError(f"gc generation for in-loop collection must be 0 or 1, got {generation!r}")
    if not remaining_s >= min_slack_s:  # also False for NaN
        return False
    gc.collect(generation)
    return True


# -- helpers -------------------------------------------------------------------------------


def _apply_affinity(
    cpus: tuple[int, ...],
    applied: list[str],
    refused: list[str],
    grants: list[str],
) -> tuple[int, ...] | None:
    item = f"cpu affinity {list(cpus)}"
    if not hasattr(os, "sched_setaffinity"):
        _refuse(item, "not supported on this platform", refused)
        return None
    available = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - available)
    if missing:
        raise ConfigError(
            f"realtime.cpu_affinity lists CPU(s) {missing} that this process cannot run on; "
            f"available CPUs: {sorted(available)}"
        )
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        _refuse_or_raise(item, exc, refused)
        grants.append(f"CPUAffinity={' '.join(map(str, cpus))}")
        return None
    applied.append(item)
    return tuple(sorted(os.sched_getaffinity(0)))


def _lock_memory(applied: list[str], refused: list[str], grants: list[str]) -> bool:
    item = "mlockall(MCL_CURRENT|MCL_FUTURE)"
    if not sys.platform.startswith("linux"):
        _refuse(item, "not supported on this platform", refused)
        return False
    import resource  # POSIX only; imported here so the module loads everywhere

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and not _has_capability(_CAP_IPC_LOCK):
        # With a finite limit, MCL_FUTURE makes every later allocation past the limit fail
        # (numpy, CUDA, ONNX Runtime arenas): worse than not locking at all.
        _refuse(item, f"RLIMIT_MEMLOCK is {soft} bytes, not unlimited", refused)
        grants.append("LimitMEMLOCK=infinity")
        return False
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc's mlockall
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        _refuse_or_raise(item, OSError(err, os.strerror(err)), refused)
        grants.append("LimitMEMLOCK=infinity")
        return False
    applied.append(item)
    return True


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError as exc:
        logger.debug("cannot read capabilities from /proc/self/status: %s", exc)
    return False


def _refuse(item: str, why: str, refused: list[str]) -> None:
    refused.append(f"{item} ({why})")


def _refuse_or_raise(item: str, exc: OSError, refused: list[str]) -> None:
    if exc.errno not in _SOFT_ERRNOS:
        # EINVAL and the like mean the request itself is wrong, not that it is forbidden.
        raise ConfigError(f"{item} failed: {exc}") from exc
    name = errno.errorcode.get(exc.errno or 0, "error")
    refused.append(f"{item} ({name}: {exc.strerror})")
