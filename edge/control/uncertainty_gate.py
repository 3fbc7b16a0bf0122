"""Uncertainty gate: decides per tick whether the policy's action can be trusted.

The score is the Monte-Carlo-dropout spread of the head's action samples. The threshold is
calibrated offline (a high quantile of the score on held-out successful runs, stored in the
bundle manifest). The gate has hysteresis in both directions so a noisy score cannot make
the robot flicker between policy control and fallback:

- NOMINAL -> FALLBACK after ``enter_ticks`` consecutive scores above ``threshold``, or at
  once when a score is above ``hard_ceiling`` or is not finite (NaN/Inf means the policy
  output cannot be trusted at all).
- FALLBACK -> NOMINAL after ``exit_ticks`` consecutive calm scores (finite and
  ``<= threshold``); any other score restarts the count.

The gate is pure: no clock, no threads, and a tick allocates only its small decision record.
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
from dataclasses import dataclass

from edge.errors import ConfigError

logger = logging.getLogger(__name__)


class GateMode(enum.Enum):
    """Who is in charge of the command this tick."""

    NOMINAL = "nominal"  # the policy's action goes to the safety layer
    FALLBACK = "fallback"  # the safety layer runs the configured fallback behaviour


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the uncertainty gate (scores are in the units of the calibrated spread).

    ``hard_ceiling`` may be ``math.inf`` to disable the immediate trip.
    """

    threshold: float  # calibrated score above which a tick counts as uncertain; > 0
    hard_ceiling: float  # score that trips the fallback immediately; >= threshold
    enter_ticks: int = 3  # consecutive uncertain ticks before falling back; >= 1
    exit_ticks: int = 5  # consecutive calm ticks before releasing the fallback; >= 1

    def __post_init__(self) -> None:
        threshold = _real(self.threshold, "gate.threshold")
        if not (math.isfinite(threshold) and threshold > 0.0):
            raise ConfigError(
                f"gate.threshold must be a finite number > 0, got {self.threshold!r}; "
                "use the calibrated threshold from the bundle manifest"
            )
        ceiling = _real(self.hard_ceiling, "gate.hard_ceiling")
        if math.isnan(ceiling) or ceiling < threshold:
            raise ConfigError(
                f"gate.hard_ceiling must be >= gate.threshold ({threshold!r}) or inf, "
                f"got {self.hard_ceiling!r}"
            )
        for name in ("enter_ticks", "exit_ticks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"gate.{name} must be an integer >= 1, got {value!r}")
        # Normalise (e.g. numpy scalars from a manifest) so comparisons stay plain floats/ints.
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "hard_ceiling", ceiling)
        object.__setattr__(self, "enter_ticks", int(self.enter_ticks))
        object.__setattr__(self, "exit_ticks", int(self.exit_ticks))


def _real(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class GateDecision:
    """What the gate decided for one tick."""

    mode: GateMode
    score: float
    transition: str | None  # set only on the tick where the mode changed: "<from>-><to>: <reason>"

    @property
    def fallback(self) -> bool:
        return self.mode is GateMode.FALLBACK


class UncertaintyGate:
    """Hysteresis gate on the per-tick uncertainty score. Starts in NOMINAL."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self._mode = GateMode.NOMINAL
        self._uncertain_streak = 0
        self._calm_streak = 0
        self.ticks = 0
        self.ticks_in_fallback = 0
        self.transitions = 0

    @property
    def mode(self) -> GateMode:
        return self._mode

    def reset(self) -> None:
        """Back to NOMINAL with empty streaks (start-up, or after an operator restart).

        Counters are kept: they describe the whole run.
        """
        self._mode = GateMode.NOMINAL
        self._uncertain_streak = 0
        self._calm_streak = 0

    def update(self, score: float) -> GateDecision:
        """Feed this tick's uncertainty score; returns the mode to act on this tick."""
        cfg = self.config
        score = float(score)
        finite = math.isfinite(score)
        transition: str | None = None
        self.ticks += 1

        if self._mode is GateMode.NOMINAL:
            if not finite:
                transition = self._switch(GateMode.FALLBACK, score, "score is not finite (NaN/Inf)")
            elif score > cfg.hard_ceiling:
                transition = self._switch(
                    GateMode.FALLBACK, score, f"score above hard ceiling {cfg.hard_ceiling:.6g}"
                )
            elif score > cfg.threshold:
                self._uncertain_streak += 1
                if self._uncertain_streak >= cfg.enter_ticks:
                    transition = self._switch(
                        GateMode.FALLBACK,
                        score,
                        f"score above threshold {cfg.threshold:.6g} for {self._uncertain_streak} ticks",
                    )
            else:
                self._uncertain_streak = 0
        else:
            if finite and score <= cfg.threshold:
                self._calm_streak += 1
                if self._calm_streak >= cfg.exit_ticks:
                    transition = self._switch(
                        GateMode.NOMINAL,
                        score,
                        f"score at or below threshold {cfg.threshold:.6g} for {self._calm_streak} ticks",
                    )
            else:
                self._calm_streak = 0

        if self._mode is GateMode.FALLBACK:
            self.ticks_in_fallback += 1
        return GateDecision(mode=self._mode, score=score, transition=transition)

    def _switch(self, to: GateMode, score: float, reason: str) -> str:
        text = f"{self._mode.name}->{to.name}: {reason}"
        logger.info("uncertainty gate %s (score %.6g)", text, score)
        self._mode = to
        self._uncertain_streak = 0
        self._calm_streak = 0
        self.transitions += 1
        return text
