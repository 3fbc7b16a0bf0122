"""The failure monitor checked in closed loop: through the runtime's own pipeline and monitor
(edge.inference.pipeline, edge.control.monitor), on episodes it must let run and on episodes that must
stop. The build's gate runs it on its environment (reports/monitor.md); `make evaluate` runs it at full
size in the reference world (reference_policy/evaluate_monitor.py).

Each tick: the environment's frame (altered by the failure kind) -> PolicyPipeline.infer ->
FailureMonitor.update -> the policy's action, or a stop (zeros) while the monitor is in fallback ->
env.step. The instruction is checked once per episode (instruction novelty); a hold counts as fallback
from the first tick. Frames pass through the camera codec the bundle's monitor was calibrated for
(manifest monitor.camera_jpeg: raw or one JPEG quality per episode, build_engines/camera_codec.py).

Failure kinds work with any environment of the gate (build_engines/accuracy_gate.py):

    black_frame      every frame black, from the start
    heavy_noise      sigma-60 Gaussian pixel noise, from the start
    black_at_30      frames go black at tick 30 (the onset), timed from it

and with the ones an environment offers in its optional `failure_resets` attribute: kind name -> the
keyword arguments of `reset(seed, **kwargs)` that start such an episode (the reference world offers a
named object absent from the table and an instruction naming an object that is on no table).

Reported: on in-distribution successes the share of ticks and of episodes in fallback and task success
with the monitor in charge; per failure kind the share of episodes in which fallback engages after the
onset, the median time from the onset, and AUROC per signal (ticks after the onset vs in-distribution
ticks).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from build_engines.camera_codec import episode_quality, jpeg

logger = logging.getLogger(__name__)

ONSET_TICK = 30
MIN_TICKS_AFTER_ONSET = 3  # an alarm needs 3 scores above its threshold (the default window and gate)
HEAVY_NOISE_SIGMA = 60.0
SIGNALS = ("spread", "feature_novelty", "action_consistency")
GOALS = {"fallback_tick_share": 0.01, "fallback_episode_share": 0.05, "engaged_share": 0.95,
         "median_s_to_fallback": 1.0}


@dataclass
class FailureKind:
    """What makes an episode one that must stop: reset arguments, a frame alteration, an onset tick."""

    name: str
    onset: int = 0
    reset: dict | Callable[[int], dict] = field(default_factory=dict)  # extra env.reset keywords (or seed -> them)
    alter: Callable[[int, np.ndarray, np.random.Generator], np.ndarray] | None = None  # (tick, frame, rng)
    begin: Callable[[int], None] | None = None  # called with the seed after reset (e.g. a companion world)
    after_step: Callable[[np.ndarray], None] | None = None  # called with each applied action


def _black_from(onset: int):
    def alter(tick: int, frame: np.ndarray, rng) -> np.ndarray:
        return np.zeros_like(frame) if tick >= onset else frame
    return alter


def _noisy(tick: int, frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, HEAVY_NOISE_SIGMA, frame.shape)
    return np.clip(frame.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def generic_kinds() -> list[FailureKind]:
    """The kinds any environment supports: the frames are altered here, not by the environment."""
    return [FailureKind("black_frame", alter=_black_from(0)), FailureKind("heavy_noise", alter=_noisy),
            FailureKind("black_at_30", onset=ONSET_TICK, alter=_black_from(ONSET_TICK))]


def environment_kinds(env) -> list[FailureKind]:
    offered = getattr(env, "failure_resets", None) or {}
    if not isinstance(offered, dict) or not all(isinstance(v, dict) for v in offered.values()):
        raise TypeError("the environment's failure_resets must map a kind name to reset() keyword arguments")
    return [FailureKind(str(name), reset=dict(kwargs)) for name, kwargs in offered.items()]


@dataclass
class Episode:
    kind: str
    seed: int
    onset: int
    success: bool = False
    held: bool = False  # the instruction was not understood: held from the first tick
    fallback: list = field(default_factory=list)  # per tick
    scores: dict = field(default_factory=lambda: {name: [] for name in (*SIGNALS, "combined")})
    tripped: dict = field(default_factory=lambda: {name: 0 for name in SIGNALS})  # ticks each alarm was on

    @property
    def reached_onset(self) -> bool:
        """False for an onset kind whose episode ended (its task done) before the onset or within the
        fewest ticks an alarm needs after it (MIN_TICKS_AFTER_ONSET): nothing left to stop."""
        if self.held or self.onset == 0:
            return True
        return len(self.fallback) >= self.onset + MIN_TICKS_AFTER_ONSET

    @property
    def first_fallback_after_onset(self) -> int | None:
        if self.held:
            return 0
        after = [i for i, f in enumerate(self.fallback) if f and i >= self.onset]
        return after[0] - self.onset if after else None


def make_monitor(bundle, target: str, spread_only: bool = False):
    """The runtime's monitor for `target` as the robot loop builds it (or the spread gate alone)."""
    from edge.control.monitor import FailureMonitor, load_models
    from edge.control.uncertainty_gate import GateConfig, UncertaintyGate

    threshold = bundle.uncertainty_threshold(target)
    ceiling = float(bundle.manifest["uncertainty"].get("hard_ceiling", {}).get(target, 3 * threshold))
    gate = UncertaintyGate(GateConfig(threshold=threshold, hard_ceiling=max(ceiling, threshold)))
    action = bundle.spec.action
    action_range = float(max(h - lo for h, lo in zip(action.high, action.low)))
    return FailureMonitor(gate, None if spread_only else load_models(bundle, target), action.dim, action_range)


def run_episode(env, pipeline, monitor, kind: FailureKind | None, seed: int, max_ticks: int,
                camera_jpeg: tuple[int, ...] = ()) -> Episode:
    """One episode of `kind` (None: in distribution) with the monitor in charge, at most `max_ticks`; its
    frames (after the failure's own change) pass through the camera's codec, raw or at one of the
    `camera_jpeg` qualities by seed, as in the closed-loop gate (build_engines/camera_codec.py)."""
    extra = {} if kind is None else (kind.reset(seed) if callable(kind.reset) else kind.reset)
    obs = env.reset(seed, **extra)
    if kind is not None and kind.begin is not None:
        kind.begin(seed)
    episode = Episode(kind.name if kind else "in_distribution", seed, kind.onset if kind else 0)
    rng = np.random.default_rng(seed)
    quality = episode_quality(seed, camera_jpeg)
    monitor.reset()
    embedding = pipeline.cache.encode_now(obs.instruction) if pipeline.needs_language else None
    if embedding is not None and monitor.instruction_hold(obs.instruction, embedding) is not None:
        episode.held = True
        episode.fallback = [True] * max_ticks
        return episode
    zeros = np.zeros(pipeline.action_dim, np.float32)
    thresholds = {name: alarm.threshold for name, alarm in monitor.alarms.items() if name in SIGNALS}
    thresholds["spread"] = monitor.gate.config.threshold
    for tick in range(max_ticks):
        if env.done:
            break
        frame = obs.frame if kind is None or kind.alter is None else kind.alter(tick, obs.frame, rng)
        frame = jpeg(frame, quality)
        out = pipeline.infer(frame, obs.proprio, embedding)
        decision = monitor.update(out.score, out)
        episode.fallback.append(decision.fallback)
        for name in monitor.tripped:
            if name in episode.tripped:  # time on task has no per-tick share: it ends a failing episode
                episode.tripped[name] += 1
        episode.scores["spread"].append(out.score)
        for name in ("feature_novelty", "action_consistency"):
            alarm = monitor.alarms.get(name)
            episode.scores[name].append(alarm.last if alarm is not None else np.nan)
        ratios = [episode.scores[n][-1] / thresholds[n] for n in thresholds if np.isfinite(episode.scores[n][-1])]
        episode.scores["combined"].append(max(ratios) if ratios else np.nan)
        action = zeros if decision.fallback else out.action.copy()
        obs = env.step(action)
        if kind is not None and kind.after_step is not None:
            kind.after_step(action)
    episode.success = bool(env.success)
    return episode


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    negatives = np.asarray(negatives, dtype=np.float64)
    positives = np.asarray(positives, dtype=np.float64)
    if len(negatives) == 0 or len(positives) == 0:
        raise ValueError("AUROC needs at least one score on each side")
    scores = np.concatenate([negatives, positives])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average rank (1-based) over ties
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def summarise(episodes: dict[str, list[Episode]], dt_s: float, kinds: list[str],
              spread_only_success: float | None = None) -> dict:
    nominal = episodes["in_distribution"]
    wins = [e for e in nominal if e.success]
    ticks = sum(len(e.fallback) for e in wins)
    report = {"in_distribution": {
        "episodes": len(nominal), "successes": len(wins), "success_rate": len(wins) / max(len(nominal), 1),
        "success_rate_spread_only": spread_only_success,
        "fallback_tick_share": (sum(sum(e.fallback) for e in wins) / ticks) if ticks else None,
        "fallback_episode_share": (sum(any(e.fallback) for e in wins) / len(wins)) if wins else None,
        "alarm_tick_share_by_signal": {name: (sum(e.tripped[name] for e in wins) / ticks) if ticks else None
                                       for name in SIGNALS}}}
    baseline = {name: np.concatenate([np.asarray(e.scores[name], np.float64) for e in nominal] + [np.zeros(0)])
                for name in (*SIGNALS, "combined")}
    for kind in kinds:
        rows = [e for e in episodes.get(kind, []) if e.reached_onset]
        if not rows:  # e.g. episodes shorter than the onset tick: nothing to judge, and the table says so
            report[kind] = {"episodes": 0, "ended_before_onset": len(episodes.get(kind, [])), "engaged_share": None,
                            "median_s_to_fallback": None, "held_for_instruction": 0,
                            "auroc": dict.fromkeys((*SIGNALS, "combined"))}
            continue
        delays = [e.first_fallback_after_onset for e in rows]
        engaged = [d for d in delays if d is not None]
        entry = {"episodes": len(rows), "ended_before_onset": len(episodes[kind]) - len(rows),
                 "engaged_share": len(engaged) / len(rows),
                 "median_s_to_fallback": float(np.median(engaged)) * dt_s if engaged else None,
                 "held_for_instruction": sum(e.held for e in rows), "auroc": {}}
        for name in (*SIGNALS, "combined"):
            positives = np.concatenate([np.asarray(e.scores[name][e.onset:], np.float64) for e in rows]
                                       + [np.zeros(0)])
            negatives = baseline[name]
            negatives, positives = negatives[np.isfinite(negatives)], positives[np.isfinite(positives)]
            entry["auroc"][name] = auroc(negatives, positives) if len(negatives) and len(positives) else None
        report[kind] = entry
    return report


def _share(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_table(report: dict, kinds: list[str]) -> str:
    base = report["in_distribution"]
    spread_only = base.get("success_rate_spread_only")
    alone = "" if spread_only is None else f", {spread_only:.1%} with the spread alone"
    lines = [f"In-distribution ({base['episodes']} episodes): success {base['success_rate']:.1%} with the monitor"
             f"{alone}; successes: {_share(base['fallback_tick_share'])} of ticks in fallback (goal <= 1%), "
             f"{_share(base['fallback_episode_share'])} of episodes with any fallback (goal <= 5%); alarm on, "
             "share of ticks: " + ", ".join(f"{n} {v:.2%}" for n, v in base["alarm_tick_share_by_signal"].items()
                                           if v is not None), "",
             "| failure kind | episodes | fallback engaged (goal >= 95%) | median s from onset (goal <= 1.0) | "
             + " | ".join(f"AUROC {s}" for s in (*SIGNALS, "combined")) + " |",
             "|---|---|---|---|" + "---|" * (len(SIGNALS) + 1)]
    for kind in kinds:
        row = report.get(kind)
        if row is None:
            continue
        median = "-" if row["median_s_to_fallback"] is None else f"{row['median_s_to_fallback']:.1f}"
        aurocs = " | ".join("-" if row["auroc"][s] is None else f"{row['auroc'][s]:.3f}"
                            for s in (*SIGNALS, "combined"))
        held = f" ({row['held_for_instruction']} held: not understood)" if row["held_for_instruction"] else ""
        if row["ended_before_onset"]:
            held += f" ({row['ended_before_onset']} more ended within {MIN_TICKS_AFTER_ONSET} ticks of the onset)"
        engaged = "-" if row["engaged_share"] is None else f"{row['engaged_share']:.0%}"
        lines.append(f"| {kind} | {row['episodes']} | {engaged}{held} | {median} | {aurocs} |")
    return "\n".join(lines)


def check_monitor(bundle_dir, target: str, env, *, seeds: range, failure_seeds: int, mc_samples: int,
                  max_ticks: int, failure_ticks: int, dt_s: float, kinds: list[FailureKind] | None = None,
                  spread_only: bool = False, mask_seed: int = 0) -> dict:
    """Run the in-distribution `seeds` and `failure_seeds` episodes of every kind; the summary report."""
    from edge.inference.bundle import Bundle
    from edge.inference.pipeline import PolicyPipeline

    bundle = Bundle.load(bundle_dir)
    kinds = list(kinds) if kinds is not None else generic_kinds() + environment_kinds(env)
    episodes: dict[str, list[Episode]] = {}
    codec = tuple((bundle.manifest.get("monitor") or {}).get("camera_jpeg", ()))  # as the bundle was calibrated
    with PolicyPipeline(bundle, target, mc_samples=mc_samples, mask_seed=mask_seed) as pipeline:
        monitor = make_monitor(bundle, target)
        episodes["in_distribution"] = [run_episode(env, pipeline, monitor, None, s, max_ticks, codec) for s in seeds]
        spread_success = None
        if spread_only:
            alone = make_monitor(bundle, target, spread_only=True)
            spread_success = float(np.mean([run_episode(env, pipeline, alone, None, s, max_ticks, codec).success
                                            for s in seeds]))
        for k, kind in enumerate(kinds):
            base = seeds.stop + 100_000 * (k + 1)
            episodes[kind.name] = [run_episode(env, pipeline, monitor, kind, s, failure_ticks, codec)
                                   for s in range(base, base + failure_seeds)]
            logger.info("monitor check %s: %s done", target, kind.name)
    report = summarise(episodes, dt_s, [k.name for k in kinds], spread_success)
    report["kinds"] = [k.name for k in kinds]
    return report


def goals_met(report: dict) -> dict[str, bool]:
    """Each goal of the failure-detection issue, judged on a summary report."""
    base = report["in_distribution"]
    met = {"fallback_tick_share": base["fallback_tick_share"] is not None
           and base["fallback_tick_share"] <= GOALS["fallback_tick_share"],
           "fallback_episode_share": base["fallback_episode_share"] is not None
           and base["fallback_episode_share"] <= GOALS["fallback_episode_share"]}
    for kind in report.get("kinds", []):
        row = report.get(kind)
        if row is not None and row["episodes"]:
            met[f"{kind} engaged"] = row["engaged_share"] >= GOALS["engaged_share"]
            met[f"{kind} median"] = row["median_s_to_fallback"] is not None \
                and row["median_s_to_fallback"] <= GOALS["median_s_to_fallback"]
    return met


# -- in the build's gate ------------------------------------------------------------------------------------

GATE_MONITOR_SEED_BASE = 8_500_000  # beside the closed-loop gate's seeds (accuracy_gate.GATE_SEED_BASE)
GATE_MAX_TICKS = 3000  # an in-distribution episode ends by the environment's own `done` well before this
GATE_MAX_FAILURE_TICKS = 300  # a failure episode of the check: at most 30 s at 10 Hz
GATE_DT_S = 0.1  # the runtime's default control period (loop.rate_hz 10): ticks -> seconds in the report


def gate_check(root, targets: list[str], environment: str, seeds: int, mc_samples: int, mask_seed: int) -> dict:
    """The monitor check of every target on the gate's environment: `seeds` in-distribution episodes
    (other seeds than those its thresholds were calibrated on) and seeds // 2 (at least 1) per failure
    kind. Writes reports/monitor.md and reports/monitor.json; returns the manifest's gate.monitor entry.
    Reported, not judged: the goals are the package's, a bundle that misses one still runs (the table says
    which, so the operator knows what the monitor will and will not catch)."""
    from pathlib import Path

    from build_engines.accuracy_gate import make_environment

    root = Path(root)
    env = make_environment(environment)

    quiet = [logging.getLogger(name) for name in ("edge.control.monitor", "edge.control.uncertainty_gate")]
    levels = [q.level for q in quiet]
    for q in quiet:  # a line per fallback transition of a hundred episodes that are meant to fall back
        q.setLevel(logging.WARNING)
    try:
        reports, lines = _check_targets(root, targets, env, seeds, mc_samples, mask_seed)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    header = [f"# Failure monitor in closed loop ({environment})", "",
              f"{seeds} in-distribution episodes and {max(1, seeds // 2)} per failure kind per target, through "
              "the runtime's pipeline and monitor (build_engines/monitor_check.py); seconds at "
              f"{1 / GATE_DT_S:g} Hz.", ""]
    reports_dir = root / "reports"
    reports_dir.mkdir(exist_ok=True)
    (reports_dir / "monitor.md").write_text("\n".join(header + lines))
    (reports_dir / "monitor.json").write_text(json.dumps(reports, indent=2, allow_nan=False) + "\n")
    return {"report": "reports/monitor.md", "seeds": seeds, "failure_seeds": max(1, seeds // 2),
            "goals_missed": {t: [g for g, ok in r["goals_met"].items() if not ok] for t, r in reports.items()}}


def failure_ticks(manifest: dict, target: str) -> int:
    """Ticks per failure episode: past the onset kinds' onset, and past the target's time on task (so
    the check sees the stop it makes), at most GATE_MAX_FAILURE_TICKS."""
    task = ((manifest.get("monitor") or {}).get("signals") or {}).get("time_on_task") or {}
    longest = task.get("threshold", {}).get(target)
    ticks = 2 * ONSET_TICK if longest is None else max(2 * ONSET_TICK, int(longest) + MIN_TICKS_AFTER_ONSET + 2)
    return min(ticks, GATE_MAX_FAILURE_TICKS)


def _check_targets(root, targets, env, seeds, mc_samples, mask_seed):
    from edge.inference.bundle import Bundle

    manifest = Bundle.load(root).manifest
    reports, lines = {}, []
    for target in targets:
        report = check_monitor(root, target, env, seeds=range(GATE_MONITOR_SEED_BASE, GATE_MONITOR_SEED_BASE + seeds),
                               failure_seeds=max(1, seeds // 2), mc_samples=mc_samples, max_ticks=GATE_MAX_TICKS,
                               failure_ticks=failure_ticks(manifest, target), dt_s=GATE_DT_S, mask_seed=mask_seed)
        report["goals_met"] = goals_met(report)
        reports[target] = report
        missed = [goal for goal, ok in report["goals_met"].items() if not ok]
        lines += [f"## target {target}", "", format_table(report, report["kinds"]), "",
                  "Goals missed: " + (", ".join(missed) if missed else "none"), ""]
        logger.info("monitor check %s: goals missed: %s", target, ", ".join(missed) or "none")
    return reports, lines
