"""Whether a WATCHDOG_TRIPPED the controller reports has a cause the host knows (docs/faults.md, "Watchdog
trips").

The controller's watchdog stops the motors when no valid SetTargets reached it for 300 ms. The host can
know why that happened, or not:

- **explained**: the host itself left a gap in its commands and saw it: its loop stalled past the
  watchdog (a tick started, or finished computing its command, more than the watchdog timeout late), or
  a command did not reach the link (the port was down or being reopened, a write failed, a command was
  held back until the controller's Capabilities arrived, no position to hold yet). The cause is known
  and over once a command sent after the gap is confirmed; the trip needs no operator. The next motion
  ramps from a stop (never from the command sent before the trip) and the robot carries on its task.
- **unexplained**: the host believed its commands were arriving (ticks on time, every write delivered),
  yet the controller stopped the motors for want of them, or the controller restarted on its own (its
  clock went back). Commands are being lost or the controller misbehaves, and nothing says it is over:
  the loop commands a controlled stop and holds, as after an e-stop clear, until `vla-edge resume` or a
  new instruction.

No I/O and no clock: the loop tells it about gaps and sent commands and asks it about each trip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("edge.control.loop")


UNEXPLAINED_TRIP_HOLD = ("controller watchdog tripped while commands were sent on time (commands lost or a "
                         "controller reset): holding until `vla-edge resume` or a new instruction")


class WatchdogTrips:
    """The host's own gaps in commanding, as far as they can explain a watchdog trip."""

    def __init__(self) -> None:
        self._gap: str | None = None  # why the host's commands did not reach the controller, until it is over
        self._first_after = None  # the first delivered command after that gap (a SentCommand)
        self.explained = 0  # trips the host caused and recovered from
        self.unexplained = 0  # trips that put the robot into a hold

    def host_gap(self, why: str) -> None:
        """The host's commands stopped reaching the controller for a while (a stall), or this tick's did."""
        self._gap = why
        self._first_after = None

    def sent(self, sent: Any) -> None:
        """What this tick's send returned (None: nothing was sent)."""
        if sent is None or not getattr(sent, "delivered", True):
            self.host_gap("a command did not reach the controller (link down, reopening, or held back)")
        elif self._gap is not None and self._first_after is None:
            self._first_after = sent

    def settle(self, tripped_now: bool, is_confirmed: Callable[[Any], bool]) -> None:
        """A new telemetry sample: once it shows no trip and confirms a command sent after the gap, the
        controller has the host's commands again and the gap is over."""
        if self._gap is not None and self._first_after is not None and not tripped_now \
                and is_confirmed(self._first_after):
            self._gap = None
            self._first_after = None

    def trip(self, *, restarted: bool = False) -> str | None:
        """A trip was just read (the motors are stopped): the hold reason when the host did not cause it,
        None when it did (the next motion ramps from a stop and the robot drives on).

        `restarted`: the controller's clock went back on a live connection. The host never causes that,
        and a gap it saw meanwhile is the restart's own consequence (the link holds commands until the
        restarted controller's Capabilities arrive), so it explains nothing."""
        if restarted:
            self._gap = None
            self._first_after = None
        elif self._gap is not None:
            self.explained += 1
            logger.warning("the controller reports WATCHDOG_TRIPPED after the host's own gap (%s): it stopped "
                           "the motors; commands ramp up from zero", self._gap)
            return None
        self.unexplained += 1
        logger.error("the controller reports WATCHDOG_TRIPPED (or restarted) although every command was sent on "
                     "time: commands are lost on the way or the controller misbehaves; controlled stop, holding "
                     "until `vla-edge resume` or a new instruction")
        return UNEXPLAINED_TRIP_HOLD
