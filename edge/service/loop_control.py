"""The control socket's handler for a running robot: commands go to the control loop, status comes
from the loop's one snapshot (`ControlLoop.status()`), never from its internals."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from edge.control.safety import reason_names
from edge.control.status import LoopStatus


class LoopControl:
    """Implements the control socket's commands against a running ControlLoop.

    Every call only sets a field or reads the published snapshot, so it is safe from the socket thread
    and never waits on the loop.
    """

    def __init__(self, loop) -> None:
        self.loop = loop

    def say(self, text: str) -> None:
        self.loop.set_instruction(text)

    def stop(self) -> None:
        self.loop.set_instruction(None)

    def estop(self) -> None:
        self.loop.emergency_stop()

    def clear(self) -> None:
        self.loop.clear_emergency_stop()

    def resume(self) -> None:
        self.loop.resume()

    def status(self) -> dict[str, Any]:
        return status_reply(self.loop.status())


def status_reply(status: LoopStatus) -> dict[str, Any]:
    """The control socket's status reply (and `vla-edge status --json`) from one loop snapshot."""
    tick = status.tick
    tick_reply = None
    policy = None
    if tick is not None:
        stages = tick.stages_ms
        tick_reply = {"index": tick.index, "policy_ms": tick.policy_ms, "tick_ms": tick.tick_ms,
                      "resize_ms": stages["resize"], "vision_ms": stages["vision"], "head_ms": stages["head"],
                      "stages_ms": dict(stages), "samples": tick.samples, "reasons": tick.reasons,
                      "reason_names": reason_names(tick.reasons),
                      "command": list(tick.command), "delivered": tick.delivered}
        if tick.action is not None:
            policy = {"action": list(tick.action), "spread": list(tick.spread or ())}
    link = status.link
    camera = status.camera
    return {
        "mode": status.mode,
        "estop": status.estop,
        "hold_reason": status.hold_reason,
        "instruction": status.instruction,
        "uncertainty": {"score": tick.score if tick is not None else math.nan, "threshold": status.threshold,
                        "hard_ceiling": status.hard_ceiling},
        "tick": tick_reply,
        "policy": policy,
        "overruns": status.timing.overruns,
        "link": None if link is None else {
            "connected": link.connected, "telemetry_age_s": link.telemetry_age_s,
            "round_trip_ms": None if link.round_trip_s is None else link.round_trip_s * 1e3,
            "round_trip_p50_ms": _ms(link.round_trip_quantiles_s.get(0.5)),
            "round_trip_p99_ms": _ms(link.round_trip_quantiles_s.get(0.99)),
            "stats": dict(link.stats)},
        "camera": None if camera is None else {"connected": camera.connected, "frame_age_s": camera.frame_age_s,
                                               "reconnects": camera.reconnects},
        "counters": dict(status.counters),
        "controller": None if status.controller is None else dict(status.controller),
        "cameras": {name: {"connected": c.connected, "frame_age_s": c.frame_age_s, "reconnects": c.reconnects}
                    for name, c in status.cameras.items()},
        "stale_cameras": list(status.stale_cameras),
        "language": status.language,
        "glass_to_wire_ms": {"p50": status.window.quantiles_ms.get("glass_to_wire", {}).get(0.5, math.nan),
                             "p99": status.window.quantiles_ms.get("glass_to_wire", {}).get(0.99, math.nan)},
        "tuning": None if status.tuning is None else {k: v for k, v in status.tuning.items() if k != "measurements"},
        "chunks": None if status.chunks is None else _chunks_reply(status.chunks),
        "monitor": None if status.monitor is None else dict(status.monitor),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _chunks_reply(stats) -> dict[str, Any]:
    """A chunk policy's execution (edge/control/chunks.py, ChunkStats) with JSON keys."""
    reply = dataclasses.asdict(stats)
    reply["entries"] = {str(k): v for k, v in stats.entries.items()}
    reply["mean_delay_s"] = {str(k): v for k, v in stats.mean_delay_s.items()}
    return reply
