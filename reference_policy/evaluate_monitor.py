"""Evaluate the failure monitor of a bundle in the reference world at full size, through the runtime's own
pipeline and monitor (build_engines/monitor_check.py, which the build's gate runs at a smaller size).

    in-distribution   training instructions, nothing altered: successes' share of ticks and of episodes
                      in fallback, task success with the monitor in charge and with the spread alone
    absent_object     the named object is not on the table (from the start)
    unknown_object    the instruction names an object that is on no table ("go to the orange cone")
    black_frame       every frame black; heavy_noise: sigma-60 pixel noise (from the start)
    black_at_30       frames go black at tick 30; absent_at_30: the target disappears at tick 30

    python -m reference_policy.evaluate_monitor --bundle artifacts/bundle --json artifacts/monitor_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from build_engines.monitor_check import ONSET_TICK, FailureKind, check_monitor, format_table, generic_kinds
from reference_world.world import TabletopWorld

logger = logging.getLogger(__name__)

SEED_BASE = 4_000_000  # beside evaluate.py's held-out seed ranges, below none of the training seeds
UNKNOWN_OBJECTS = ("orange cone", "purple cube", "white cylinder", "black ring")


def absent_at(onset: int, world: TabletopWorld) -> FailureKind:
    """The target disappears at `onset`: frames from then on come from the same episode without its
    target, stepped in lockstep with the real one."""
    shadow = TabletopWorld(world.config)

    def alter(tick: int, frame: np.ndarray, rng) -> np.ndarray:
        return shadow.render() if tick >= onset else frame

    return FailureKind(f"absent_at_{onset}", onset=onset, alter=alter,
                       begin=lambda seed: shadow.reset(seed, variant="absent_object"),
                       after_step=shadow.step)


def reference_kinds(world: TabletopWorld) -> list[FailureKind]:
    return [FailureKind("absent_object", reset={"variant": "absent_object"}),
            FailureKind("unknown_object",
                        reset=lambda seed: {"instruction": f"go to the {UNKNOWN_OBJECTS[seed % len(UNKNOWN_OBJECTS)]}"}),
            *generic_kinds(), absent_at(ONSET_TICK, world)]


def evaluate(bundle_dir: Path, target: str, seeds: int, failure_seeds: int, mc_samples: int) -> dict:
    from edge.inference.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    if "monitor" not in bundle.manifest:
        raise SystemExit(f"{bundle_dir} has no monitor section: rebuild it with this package's build-engines")
    world = TabletopWorld()
    started = time.monotonic()
    limit = world.config.time_limit_steps  # every episode may run 15 s, as the demo's: time on task shows
    report = check_monitor(bundle_dir, target, world, seeds=range(SEED_BASE, SEED_BASE + seeds),
                           failure_seeds=failure_seeds, mc_samples=mc_samples, max_ticks=limit, failure_ticks=limit,
                           dt_s=world.config.dt_s, kinds=reference_kinds(world), spread_only=True)
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
    for name in ("edge.control.monitor", "edge.control.uncertainty_gate"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one line per transition otherwise
    report = evaluate(args.bundle, args.target, args.seeds, args.failure_seeds, args.mc_samples)
    print(format_table(report, report["kinds"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
