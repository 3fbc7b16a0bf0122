"""The competing CPU load's process: `python -m benchmarks.burn MAX_SECONDS` (started by cpu_load.CpuBurner).

It asks to be killed when its parent dies (PR_SET_PDEATHSIG, so even while stopped), stops itself at
once (the benchmark resumes it with SIGCONT for the loaded rounds) and exits by itself after
MAX_SECONDS, whatever happens to the benchmark.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SPINS_PER_CLOCK_READ = 20000


def burn(max_seconds: float) -> None:
    end = time.monotonic() + max_seconds
    x = 0
    while time.monotonic() < end:
        for _ in range(_SPINS_PER_CLOCK_READ):
            x += 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.burn MAX_SECONDS", file=sys.stderr)
        return 2
    max_seconds = float(args[0])
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError) as exc:
        print(f"cpu load: no PR_SET_PDEATHSIG ({exc}); relying on the time bound", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGSTOP)  # paused until the benchmark resumes it
    burn(max_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
