"""Evaluate the failure monitor of a bundle in the reference world, through the runtime's own pipeline
and monitor (edge.inference.pipeline, edge.control.monitor), on held-out seeds.

Each tick: the world's frame (altered by the failure kind) -> PolicyPipeline.infer -> FailureMonitor.update
-> the policy's action, or a stop (zero) while the monitor is in fallback -> world.step. The instruction is
checked once per episode (instruction novelty); a hold counts as fallback from the first tick.

    in-distribution   training instructions, nothing altered: successes' share of ticks and of episodes
                      in fallback, task success with the monitor in charge and with the spread alone
    absent_object     the named object is not on the table (from the start)
    unknown_object    the instruction names an object that is on no table ("go to the orange cone")
    black_frame       every frame black; heavy_noise: sigma-60 pixel noise (from the start)
    black_at_30       frames go black at tick 30; absent_at_30: the target disappears at tick 30

Per failure kind: the share of episodes in which fallback engages after the onset, the median time from
the onset to fallback, and AUROC per signal (ticks after the onset vs in-distribution ticks).

    python -m reference_policy.evaluate_monitor --bundle artifacts/bundle --json artifacts/monitor_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reference_policy.evaluate import auroc
from reference_world.world import TabletopWorld

logger = logging.getLogger(__name__)

SEED_BASE = 4_000_000  # beside evaluate.py's held-out seed ranges, below none of the training seeds
ONSET_TICK = 30
FAILURE_TICKS = 60  # ticks per failure episode (the onset kinds: 30 before and 30 after the onset)
UNKNOWN_OBJECTS = ("orange cone", "purple cube", "white cylinder", "black ring")
KINDS = ("absent_object", "unknown_object", "black_frame", "heavy_noise", "black_at_30", "absent_at_30")
SIGNALS = ("spread", "feature_novelty", "action_consistency")


@dataclass
class Episode:
    kind: str
    seed: int
    onset: int
    success: bool = False
    held: bool = False  # the instruction was not understood: held from the first tick
    fallback: list = field(default_factory=list)  # per tick
    scores: dict = field(default_factory=lambda: {name: [] for name in (*SIGNALS, "combined")})
    tripped: dict = field(default_factory=lambda: {name: 0 for name in SIGNALS})  # ticks each signal's alarm was on

    @property
    def reached_onset(self) -> bool:
        """False for an onset kind whose episode ended (success) before the onset: nothing to detect."""
        return self.held or len(self.fallback) > self.onset

    @property
    def first_fallback_after_onset(self) -> int | None:
        if self.held:
            return 0
        after = [i for i, f in enumerate(self.fallback) if f and i >= self.onset]
        return after[0] - self.onset if after else None


def make_monitor(bundle, target: str, spread_only: bool):
    from edge.control.monitor import FailureMonitor, load_models
    from edge.control.uncertainty_gate import GateConfig, UncertaintyGate

    threshold = bundle.uncertainty_threshold(target)
    ceiling = float(bundle.manifest["uncertainty"].get("hard_ceiling", {}).get(target, 3 * threshold))
    gate = UncertaintyGate(GateConfig(threshold=threshold, hard_ceiling=max(ceiling, threshold)))
    action = bundle.spec.action
    action_range = float(max(h - lo for h, lo in zip(action.high, action.low)))
    return FailureMonitor(gate, None if spread_only else load_models(bundle, target), action.dim, action_range)


def run(world: TabletopWorld, pipeline, monitor, kind: str, seed: int, max_ticks: int) -> Episode:
    variant = kind if kind in ("absent_object", "black_frame", "heavy_noise") else None
    instruction = None
    if kind == "unknown_object":
        instruction = f"go to the {UNKNOWN_OBJECTS[seed % len(UNKNOWN_OBJECTS)]}"
    obs = world.reset(seed, instruction=instruction, variant=variant)
    shadow = None
    if kind == "absent_at_30":  # the same episode without its target, stepped in lockstep
        shadow = TabletopWorld(world.config)
        shadow.reset(seed, variant="absent_object")
    episode = Episode(kind, seed, ONSET_TICK if kind.endswith("_at_30") else 0)
    monitor.reset()
    embedding = pipeline.cache.encode_now(obs.instruction)
    if monitor.instruction_hold(obs.instruction, embedding) is not None:
        episode.held = True
        episode.fallback = [True] * max_ticks
        return episode
    zeros = np.zeros(pipeline.action_dim, np.float32)
    thresholds = {name: alarm.threshold for name, alarm in monitor.alarms.items()}
    thresholds["spread"] = monitor.gate.config.threshold
    for tick in range(max_ticks):
        if world.done:
            break
        frame = obs.frame
        if kind == "black_at_30" and tick >= ONSET_TICK:
            frame = np.zeros_like(frame)
        elif shadow is not None and tick >= ONSET_TICK:
            frame = shadow.render()
        out = pipeline.infer(frame, obs.proprio, embedding)
        decision = monitor.update(out.score, out)
        episode.fallback.append(decision.fallback)
        for name in monitor.tripped:
            episode.tripped[name] += 1
        episode.scores["spread"].append(out.score)
        for name in ("feature_novelty", "action_consistency"):
            alarm = monitor.alarms.get(name)
            episode.scores[name].append(alarm.last if alarm is not None else np.nan)
        ratios = [episode.scores[n][-1] / thresholds[n] for n in thresholds if np.isfinite(episode.scores[n][-1])]
        episode.scores["combined"].append(max(ratios) if ratios else np.nan)
        action = zeros if decision.fallback else out.action
        obs = world.step(action)
        if shadow is not None:
            shadow.step(action)
    episode.success = bool(world.success)
    return episode


def summarise(episodes: dict[str, list[Episode]], spread_only_success: float, dt_s: float) -> dict:
    nominal = episodes["in_distribution"]
    wins = [e for e in nominal if e.success]
    ticks = sum(len(e.fallback) for e in wins)
    report = {"in_distribution": {
        "episodes": len(nominal), "successes": len(wins), "success_rate": len(wins) / max(len(nominal), 1),
        "success_rate_spread_only": spread_only_success,
        "fallback_tick_share": (sum(sum(e.fallback) for e in wins) / ticks) if ticks else float("nan"),
        "fallback_episode_share": (sum(any(e.fallback) for e in wins) / len(wins)) if wins else float("nan"),
        "alarm_tick_share_by_signal": {name: (sum(e.tripped[name] for e in wins) / ticks) if ticks else None
                                       for name in SIGNALS}}}
    baseline = {name: np.concatenate([np.asarray(e.scores[name], np.float64) for e in nominal]) for name in
                (*SIGNALS, "combined")}
    for kind in KINDS:
        rows = [e for e in episodes.get(kind, []) if e.reached_onset]
        if not rows:
            continue
        delays = [e.first_fallback_after_onset for e in rows]
        engaged = [d for d in delays if d is not None]
        entry = {"episodes": len(rows), "ended_before_onset": len(episodes[kind]) - len(rows),
                 "engaged_share": len(engaged) / len(rows),
                 "median_s_to_fallback": float(np.median(engaged)) * dt_s if engaged else None,
                 "held_for_instruction": sum(e.held for e in rows), "auroc": {}}
        for name in (*SIGNALS, "combined"):
            after = np.concatenate([np.asarray(e.scores[name][e.onset:], np.float64) for e in rows]
                                   + [np.zeros(0)])
            negatives, positives = baseline[name], after
            negatives, positives = negatives[np.isfinite(negatives)], positives[np.isfinite(positives)]
            entry["auroc"][name] = auroc(negatives, positives) if len(negatives) and len(positives) else None
        report[kind] = entry
    return report


def format_table(report: dict) -> str:
    base = report["in_distribution"]
    lines = [f"In-distribution ({base['episodes']} episodes): success {base['success_rate']:.1%} with the monitor, "
             f"{base['success_rate_spread_only']:.1%} with the spread alone; successes: "
             f"{base['fallback_tick_share']:.2%} of ticks in fallback (goal <= 1%), "
             f"{base['fallback_episode_share']:.1%} of episodes with any fallback (goal <= 5%); alarm on, share of "
             "ticks: " + ", ".join(f"{n} {v:.2%}" for n, v in base["alarm_tick_share_by_signal"].items()
                                   if v is not None), "",
             "| failure kind | episodes | fallback engaged (goal >= 95%) | median s from onset (goal <= 1.0) | "
             + " | ".join(f"AUROC {s}" for s in (*SIGNALS, "combined")) + " |",
             "|---|---|---|---|" + "---|" * (len(SIGNALS) + 1)]
    for kind in KINDS:
        row = report.get(kind)
        if row is None:
            continue
        median = "-" if row["median_s_to_fallback"] is None else f"{row['median_s_to_fallback']:.1f}"
        aurocs = " | ".join("-" if row["auroc"][s] is None else f"{row['auroc'][s]:.3f}"
                            for s in (*SIGNALS, "combined"))
        held = f" ({row['held_for_instruction']} held: not understood)" if row["held_for_instruction"] else ""
        if row["ended_before_onset"]:
            held += f" ({row['ended_before_onset']} more succeeded before the onset)"
        lines.append(f"| {kind} | {row['episodes']} | {row['engaged_share']:.0%}{held} | {median} | {aurocs} |")
    return "\n".join(lines)


def evaluate(bundle_dir: Path, target: str, seeds: int, failure_seeds: int, mc_samples: int) -> dict:
    from edge.inference.bundle import Bundle
    from edge.inference.pipeline import PolicyPipeline

    bundle = Bundle.load(bundle_dir)
    if "monitor" not in bundle.manifest:
        raise SystemExit(f"{bundle_dir} has no monitor section: rebuild it with this package's build-engines")
    world = TabletopWorld()
    started = time.monotonic()
    episodes: dict[str, list[Episode]] = {}
    with PolicyPipeline(bundle, target, mc_samples=mc_samples) as pipeline:
        monitor = make_monitor(bundle, target, spread_only=False)
        spread = make_monitor(bundle, target, spread_only=True)
        limit = world.config.time_limit_steps
        nominal_seeds = range(SEED_BASE, SEED_BASE + seeds)
        episodes["in_distribution"] = [run(world, pipeline, monitor, "in_distribution", s, limit) for s in nominal_seeds]
        spread_success = float(np.mean([run(world, pipeline, spread, "in_distribution", s, limit).success
                                        for s in nominal_seeds]))
        logger.info("in-distribution done in %.0f s", time.monotonic() - started)
        for k, kind in enumerate(KINDS):
            base = SEED_BASE + 100_000 * (k + 1)
            episodes[kind] = [run(world, pipeline, monitor, kind, s, FAILURE_TICKS)
                              for s in range(base, base + failure_seeds)]
            logger.info("%s done at %.0f s", kind, time.monotonic() - started)
    report = summarise(episodes, spread_success, world.config.dt_s)
    report["setup"] = {"bundle": str(bundle_dir), "target": target, "mc_samples": mc_samples,
                       "seeds": seeds, "failure_seeds": failure_seeds, "onset_tick": ONSET_TICK,
                       "monitor": {k: v for k, v in bundle.manifest["monitor"].items() if k != "signals"},
                       "duration_s": time.monotonic() - started}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"))
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--seeds", type=int, default=50, help="in-distribution episodes")
    parser.add_argument("--failure-seeds", type=int, default=20, help="episodes per failure kind")
    parser.add_argument("--mc-samples", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("seeds", "failure_seeds", "mc_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    logging.getLogger("edge.control.monitor").setLevel(logging.WARNING)  # one line per transition otherwise
    report = evaluate(args.bundle, args.target, args.seeds, args.failure_seeds, args.mc_samples)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
