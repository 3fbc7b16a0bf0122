"""The failure monitor: decides per inference whether the policy can be trusted, from several signals.

    spread               the MC-dropout spread, through the uncertainty gate (edge/control/uncertainty_gate.py)
    feature_novelty      Mahalanobis distance of the pooled vision features to the calibration samples
    action_consistency   RMS change of the first executed action between consecutive inferences
    instruction_novelty  nearest cosine distance of the instruction's embedding to the known ones; checked
                         once per instruction (cached), an instruction the policy cannot ground is held
    time_on_task         inferences since the instruction (or a resume): on once the task has run longer
                         than the successful calibration episodes did (a task that cannot succeed, e.g. its
                         object is not there, ends stopped in fallback instead of wandering); stays on
                         until a new instruction or `vla-edge resume` (`new_task`)

Models and thresholds come from the bundle's `monitor` section (build_engines/monitor.py: split-conformal
thresholds on held-out successful samples at a stated false-alarm rate). Each per-inference signal has a
windowed alarm: it is on while `over` of its last `ticks` scores are above the threshold (a single spike
does not stop the robot), or at once on a score that is not finite. The monitor falls back while the
spread gate or any alarm is on, and reports which signals tripped (`tripped`, `signals()`).

The monitor has the uncertainty gate's interface (`config`, `mode`, `update(score, output)`, `reset`,
counters), so the loop takes either. A bundle without a `monitor` section runs with the spread alone.
Every per-inference buffer is allocated at construction; `update` allocates only its decision record.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from edge.control.uncertainty_gate import GateDecision, GateMode, UncertaintyGate
from edge.errors import BundleError, ConfigError
from edge.validation import check_range

logger = logging.getLogger(__name__)

NOT_UNDERSTOOD = "instruction not understood"
SIGNALS = ("spread", "feature_novelty", "action_consistency")


@dataclass(frozen=True)
class WindowConfig:
    over: int = 3  # scores above the threshold ...
    ticks: int = 5  # ... among the last this many inferences raise the alarm

    def __post_init__(self) -> None:
        check_range("monitor.window.ticks", self.ticks, 1, 1000, integer=True)
        check_range("monitor.window.over", self.over, 1, self.ticks, integer=True)


class WindowedAlarm:
    """On while at least `over` of the last `ticks` scores exceed `threshold`, or after a non-finite score
    (until the window holds `ticks` finite scores again)."""

    def __init__(self, threshold: float, window: WindowConfig):
        if not (math.isfinite(threshold) and threshold > 0):
            raise BundleError(f"a monitor threshold must be a finite number > 0, got {threshold!r}; rebuild the bundle")
        self.threshold = float(threshold)
        self.window = window
        self._over = np.zeros(window.ticks, np.bool_)
        self._count = 0
        self._next = 0
        self.last = float("nan")
        self.on = False

    def reset(self) -> None:
        self._over[:] = False
        self._count = 0
        self._next = 0
        self.last = float("nan")
        self.on = False

    def update(self, score: float) -> bool:
        self.last = score
        over = not math.isfinite(score) or score > self.threshold
        self._count += int(over) - int(self._over[self._next])
        self._over[self._next] = over
        self._next = (self._next + 1) % len(self._over)
        self.on = (not math.isfinite(score)) or self._count >= self.window.over
        return self.on


class FeatureNovelty:
    """Mahalanobis distance |W (pool(x) - mean)| in preallocated buffers."""

    def __init__(self, mean: np.ndarray, whiten: np.ndarray):
        mean = np.asarray(mean, np.float32).reshape(-1)
        whiten = np.asarray(whiten, np.float32)
        if whiten.shape != (mean.size, mean.size):
            raise BundleError(f"the feature-novelty model's whitening matrix has shape {list(whiten.shape)}, "
                              f"expected [{mean.size}, {mean.size}]; rebuild the bundle")
        self.mean, self.whiten = mean, whiten
        self._pooled = np.zeros_like(mean)
        self._diff = np.zeros_like(mean)
        self._white = np.zeros_like(mean)

    @property
    def dim(self) -> int:
        return self.mean.size

    def score(self, features: np.ndarray) -> float:
        """`features` [1, ..., D] (the vision graph's output): mean over every axis but the last."""
        if features.shape[-1] != self.dim:
            raise BundleError(f"vision features of width {features.shape[-1]} do not fit the monitor's model of "
                              f"width {self.dim}; rebuild the bundle")
        if features.size == self.dim:
            np.copyto(self._pooled, features.reshape(self.dim))
        else:
            np.mean(features.reshape(-1, self.dim), axis=0, out=self._pooled)
        np.subtract(self._pooled, self.mean, out=self._diff)
        np.matmul(self.whiten, self._diff, out=self._white)
        return float(np.sqrt(np.dot(self._white, self._white)))


class ActionConsistency:
    """RMS change of the first action between consecutive inferences, / the action range (nan at first)."""

    def __init__(self, action_dim: int, action_range: float):
        self.action_range = float(action_range)
        self._previous = np.zeros(action_dim, np.float32)
        self._change = np.zeros(action_dim, np.float32)
        self._has_previous = False

    def reset(self) -> None:
        self._has_previous = False

    def score(self, first_action: np.ndarray) -> float:
        if not self._has_previous:
            np.copyto(self._previous, first_action)
            self._has_previous = True
            return 0.0
        np.subtract(first_action, self._previous, out=self._change)
        np.copyto(self._previous, first_action)
        np.multiply(self._change, self._change, out=self._change)
        return float(np.sqrt(np.mean(self._change))) / self.action_range


class TimeOnTask:
    """On once more than `threshold` inferences ran on the current task: `update()` counts one, `reset()`
    starts a new task (the alarm interface: threshold, last (the count), on)."""

    def __init__(self, threshold: float):
        if not (math.isfinite(threshold) and threshold >= 1):
            raise BundleError(f"the time-on-task threshold must be a finite count >= 1, got {threshold!r}; "
                              "rebuild the bundle")
        self.threshold = float(threshold)
        self.last = 0.0
        self.on = False

    def reset(self) -> None:
        self.last = 0.0
        self.on = False

    def update(self) -> bool:
        self.last += 1.0
        self.on = self.last > self.threshold
        return self.on


class InstructionNovelty:
    """1 - the largest cosine similarity to a known instruction's embedding, cached per text."""

    def __init__(self, known_unit: np.ndarray, threshold: float):
        self.known = np.asarray(known_unit, np.float32)
        self.threshold = float(threshold)
        self._verdicts: dict[str, tuple[float, bool]] = {}

    def check(self, text: str, embedding: np.ndarray) -> tuple[float, bool]:
        """(distance, understood), computed once per instruction."""
        cached = self._verdicts.get(text)
        if cached is None:
            vector = np.asarray(embedding, np.float64).reshape(-1)
            norm = float(np.linalg.norm(vector))
            distance = 1.0 - float(np.max(self.known @ (vector / norm))) if norm > 0 else float("inf")
            cached = (distance, bool(distance <= self.threshold))
            if len(self._verdicts) > 256:
                self._verdicts.clear()
            self._verdicts[text] = cached
            logger.info("instruction %r: novelty %.4f (threshold %.4f): %s", text[:60], distance, self.threshold,
                        "understood" if cached[1] else NOT_UNDERSTOOD)
        return cached


OPTIONAL_SIGNALS = ("feature_novelty", "action_consistency", "instruction_novelty", "time_on_task")


@dataclass(frozen=True)
class MonitorConfig:
    """The robot config's ``monitor:`` section: signals of the bundle's monitor to leave out on this robot
    (e.g. while a camera unlike the one the bundle was calibrated for raises false alarms, until the bundle
    is rebuilt for it). The spread is the uncertainty gate's (``uncertainty:``), not switched off here."""

    disable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        disable = self.disable
        if isinstance(disable, str) or not isinstance(disable, (tuple, list)):
            raise ConfigError(f"monitor.disable must be a list of signal names, got {disable!r}")
        unknown = [name for name in disable if name not in OPTIONAL_SIGNALS]
        if unknown:
            raise ConfigError(f"monitor.disable: unknown signal(s) {unknown}; the ones a config can leave out: "
                              f"{', '.join(OPTIONAL_SIGNALS)} (the spread is set in uncertainty:)")
        object.__setattr__(self, "disable", tuple(disable))


@dataclass
class MonitorModels:
    """What the bundle's `monitor` section gives one target."""

    window: WindowConfig
    rate: float
    features: FeatureNovelty | None = None
    feature_threshold: float | None = None
    consistency_threshold: float | None = None
    instructions: InstructionNovelty | None = None
    task_inferences: float | None = None  # time on task: the most inferences a successful task took


def load_models(bundle, target: str, window: WindowConfig | None = None,
                disable: tuple[str, ...] = ()) -> MonitorModels | None:
    """The monitor's models for `target` from the bundle, or None for a bundle without a `monitor` section;
    the signals named in `disable` (MonitorConfig) are left out."""
    section = bundle.manifest.get("monitor")
    if not section:
        return None
    signals = {name: row for name, row in section["signals"].items() if name not in disable}
    if disable:
        logger.warning("failure monitor: %s left out by the config (monitor.disable)", ", ".join(disable))
    configured = section.get("window", {})
    models = MonitorModels(window or WindowConfig(int(configured.get("over", 3)), int(configured.get("ticks", 5))),
                           float(section["false_alarm_rate"]))
    feature = signals.get("feature_novelty")
    if feature:
        thresholds = feature["threshold"]
        if target not in thresholds:
            raise BundleError(f"bundle {bundle.root}: the monitor has no feature-novelty threshold for target "
                              f"{target!r} (it has {sorted(thresholds)}); rebuild the bundle")
        variant = bundle.target_variants(target)["vision"]
        with np.load(bundle.path(feature["path"])) as data:
            if f"mean_{variant}" not in data:
                raise BundleError(f"bundle {bundle.root}: {feature['path']} has no model of the {variant} vision "
                                  "graph; rebuild the bundle")
            models.features = FeatureNovelty(data[f"mean_{variant}"], data[f"whiten_{variant}"])
        models.feature_threshold = float(thresholds[target])
    consistency = signals.get("action_consistency")
    if consistency and target in consistency["threshold"]:
        models.consistency_threshold = float(consistency["threshold"][target])
    task = signals.get("time_on_task")
    if task and target in task["threshold"]:
        models.task_inferences = float(task["threshold"][target])
    language = signals.get("instruction_novelty")
    if language:
        with np.load(bundle.path(language["path"])) as data:
            models.instructions = InstructionNovelty(data["embeddings"], float(language["threshold"]))
    return models


class FailureMonitor:
    """The spread gate plus the bundle's monitor signals, behind the gate's interface (see module doc)."""

    def __init__(self, gate: UncertaintyGate, models: MonitorModels | None, action_dim: int,
                 action_range: float):
        self.gate = gate
        self.models = models
        self.alarms: dict[str, WindowedAlarm] = {}
        self._features = None
        self._consistency = None
        if models is not None:
            if models.features is not None:
                self._features = models.features
                self.alarms["feature_novelty"] = WindowedAlarm(models.feature_threshold, models.window)
            if models.consistency_threshold is not None:
                self._consistency = ActionConsistency(action_dim, action_range)
                self.alarms["action_consistency"] = WindowedAlarm(models.consistency_threshold, models.window)
            if models.task_inferences is not None:
                self.alarms["time_on_task"] = TimeOnTask(models.task_inferences)
        self._mode = GateMode.NOMINAL
        self.tripped: tuple[str, ...] = ()
        self.trips = {name: 0 for name in ("spread", *self.alarms)}
        self.ticks = 0
        self._spread = float("nan")  # the last inference's spread score
        self.ticks_in_fallback = 0
        self.transitions = 0
        self.instruction_verdict: tuple[str, float, bool] | None = None  # text, novelty, understood

    @property
    def config(self):
        return self.gate.config

    @property
    def mode(self) -> GateMode:
        return self._mode

    def reset(self) -> None:
        self.gate.reset()
        for alarm in self.alarms.values():
            alarm.reset()
        if self._consistency is not None:
            self._consistency.reset()
        self._mode = GateMode.NOMINAL
        self.tripped = ()

    @property
    def task_overdue(self) -> bool:
        """The time-on-task alarm is on (`vla-edge resume` restarts its clock)."""
        clock = self.alarms.get("time_on_task")
        return clock is not None and clock.on

    def new_task(self) -> None:
        """A new instruction, a stop or a resume: the time-on-task clock starts again."""
        clock = self.alarms.get("time_on_task")
        if clock is not None:
            clock.reset()

    def update(self, score: float, output=None) -> GateDecision:
        """This inference's spread `score` and its output (`features` [1, ..., D], `actions` [H, A])."""
        spread = self.gate.update(score)
        self._spread = float(score)
        tripped = ["spread"] if spread.fallback else []
        features = getattr(output, "features", None)
        if self._features is not None and features is not None:
            if self.alarms["feature_novelty"].update(self._features.score(features)):
                tripped.append("feature_novelty")
        actions = getattr(output, "actions", None)
        if self._consistency is not None and actions is not None:
            if self.alarms["action_consistency"].update(self._consistency.score(actions[0])):
                tripped.append("action_consistency")
        clock = self.alarms.get("time_on_task")
        if clock is not None and clock.update():
            if "time_on_task" not in self.tripped:
                logger.warning("the task has run %d inferences, more than the successful calibration episodes allow "
                               "(%d): stopping in fallback; send a new instruction, or `vla-edge resume` to go on",
                               clock.last, clock.threshold)
            tripped.append("time_on_task")
        self.ticks += 1
        mode = GateMode.FALLBACK if tripped else GateMode.NOMINAL
        transition = None
        if mode is not self._mode:
            newly = [name for name in tripped if name not in self.tripped]
            reason = f"tripped by {', '.join(newly or tripped)}" if tripped else "every signal calm"
            transition = f"{self._mode.name}->{mode.name}: {reason}"
            logger.info("failure monitor %s (%s)", transition, self._scores_text())
            self._mode = mode
            self.transitions += 1
        for name in tripped:
            if name not in self.tripped:
                self.trips[name] = self.trips.get(name, 0) + 1
        self.tripped = tuple(tripped)
        if mode is GateMode.FALLBACK:
            self.ticks_in_fallback += 1
        return GateDecision(mode=mode, score=float(score), transition=transition)

    def _scores_text(self) -> str:
        return ", ".join(f"{name} {alarm.last:.4g}/{alarm.threshold:.4g}" for name, alarm in self.alarms.items())

    def instruction_hold(self, text: str, embedding: np.ndarray) -> str | None:
        """The hold reason for an instruction the policy cannot ground, or None (checked once per text)."""
        if self.models is None or self.models.instructions is None:
            return None
        novelty, understood = self.models.instructions.check(text, embedding)
        self.instruction_verdict = (text, novelty, understood)
        if understood:
            return None
        return (f"{NOT_UNDERSTOOD}: {text[:60]!r} is far from every instruction the policy knows (novelty "
                f"{novelty:.3f} > {self.models.instructions.threshold:.3f}); send another instruction")

    def signals(self) -> dict:
        """Per signal: last score, threshold, alarm on, trips (for the status snapshot and metrics)."""
        gate = self.gate
        rows = {"spread": {"score": self._spread, "threshold": float(gate.config.threshold),
                           "on": "spread" in self.tripped, "trips": self.trips["spread"]}}
        for name, alarm in self.alarms.items():
            rows[name] = {"score": alarm.last, "threshold": alarm.threshold, "on": alarm.on, "trips": self.trips.get(name, 0)}
        if self.instruction_verdict is not None:
            text, novelty, understood = self.instruction_verdict
            rows["instruction_novelty"] = {"score": novelty, "threshold": self.models.instructions.threshold,
                                           "on": not understood, "instruction": text}
        return {"tripped": list(self.tripped), "signals": rows}
