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
from dataclasses import dataclass

from edge.errors import ConfigError
from edge.validation import check_bound, check_number, check_range

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
        threshold = check_number("gate.threshold", self.threshold)
        check_bound("gate.threshold", threshold, 0, low_open=True,
                    hint="use the calibrated threshold from the bundle manifest")
        ceiling = check_number("gate.hard_ceiling", self.hard_ceiling, finite=False)
        if math.isnan(ceiling) or ceiling < threshold:
            raise ConfigError(
                f"gate.hard_ceiling must be >= gate.threshold ({threshold!r}) or inf, "
                f"got {self.hard_ceiling!r}"
            )
        # Normalise (e.g. numpy scalars from a manifest) so comparisons stay plain floats/ints.
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "hard_ceiling", ceiling)
        object.__setattr__(self, "enter_ticks", check_range("gate.enter_ticks", self.enter_ticks, 1, integer=True))
        object.__setattr__(self, "exit_ticks", check_range("gate.exit_ticks", self.exit_ticks, 1, integer=True))


@dataclass(frozen=True)
class UncertaintyConfig:
    """The ``uncertainty:`` section of the robot config; with the bundle's calibration it gives a GateConfig."""

    threshold: float | None = None  # None: the bundle's calibrated threshold for the target
    hard_ceiling: float | None = None  # None: the bundle's ceiling (fallback at once above it)
    enter_ticks: int = 3  # ticks above the threshold before fallback
    exit_ticks: int = 5  # calm ticks before leaving fallback

    def __post_init__(self) -> None:
        check_range("uncertainty.threshold", self.threshold, 1e-6, 10.0, nullable=True)
        check_range("uncertainty.hard_ceiling", self.hard_ceiling, 1e-6, 10.0, nullable=True)
        check_range("uncertainty.enter_ticks", self.enter_ticks, 1, 100, integer=True)
        check_range("uncertainty.exit_ticks", self.exit_ticks, 1, 1000, integer=True)


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

    def update(self, score: float, output=None) -> GateDecision:
        """Feed this tick's uncertainty score; returns the mode to act on this tick. `output` (the
        inference's result) is read by the failure monitor, which shares this interface; the spread needs
        only the score."""
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

    def new_task(self) -> None:
        """A new instruction, stop or resume: nothing to restart for the spread alone (see FailureMonitor)."""

    task_overdue = False  # the spread alone has no time-on-task signal

    def instruction_hold(self, text: str, embedding) -> str | None:
        """The spread alone judges no instruction (edge/control/monitor.py does, where the bundle has a monitor)."""
        return None

    def signals(self) -> dict:
        """The status snapshot's view: the spread is the one signal."""
        on = self._mode is GateMode.FALLBACK
        return {"tripped": ["spread"] if on else [],
                "signals": {"spread": {"threshold": self.config.threshold, "on": on, "trips": self.transitions}}}

    def _switch(self, to: GateMode, score: float, reason: str) -> str:
        text = f"{self._mode.name}->{to.name}: {reason}"
        logger.info("uncertainty gate %s (score %.6g)", text, score)
        self._mode = to
        self._uncertain_streak = 0
        self._calm_streak = 0
        self.transitions += 1
        return text
