"""The control thread's scheduling in the closed loop: SCHED_FIFO as the systemd unit starts the
service, and the same load at normal priority for comparison."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

NORMAL_PRIORITY = "normal priority"


@contextlib.contextmanager
def thread_scheduling(fifo_priority: int | None) -> Iterator[str]:
    """The calling thread (the control loop) at SCHED_FIFO ``fifo_priority``, as the systemd unit starts
    the service, and back to SCHED_OTHER afterwards. Yields what is in effect; raises OSError where
    the kernel refuses FIFO. Threads started earlier (camera, serial reader) keep normal priority,
    as under the unit (CPUSchedulingResetOnFork=yes)."""
    if fifo_priority is None:
        yield "SCHED_OTHER"
        return
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo_priority))
    try:
        yield f"SCHED_FIFO {fifo_priority}"
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def fifo_refusal(priority: int | None) -> str | None:
    """None where this process may run a thread at SCHED_FIFO ``priority``; otherwise why not."""
    if priority is None:
        return "not asked for (--no-fifo)"
    if not hasattr(os, "SCHED_FIFO"):
        return "this platform has no SCHED_FIFO"
    try:
        with thread_scheduling(priority):
            pass
    except OSError as exc:
        return (f"SCHED_FIFO {priority} refused ({errno.errorcode.get(exc.errno, exc.errno)}): run as root or "
                f"with LimitRTPRIO={priority}, as the systemd unit does")
    return None


def closed_loop_conditions(loads: tuple[str, ...], fifo_refused: str | None,
                           fifo_priority: int | None) -> list[tuple[str, str, int | None]]:
    """(run key, load, FIFO priority or None) in run order. The plain load keys are the deployed
    scheduling (FIFO where granted), which the ratios use; "<load>, normal priority" runs follow."""
    if fifo_refused is not None:
        return [(load, load, None) for load in loads]
    return [*[(load, load, fifo_priority) for load in loads],
            *[(f"{load}, {NORMAL_PRIORITY}", load, None) for load in loads]]

