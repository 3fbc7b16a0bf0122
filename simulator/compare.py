"""Closed-loop success of bundle targets through the real path (serial pty + MJPEG camera + service).

    python -m simulator.compare --targets cpu cpu-fp32 --episodes 50

For each target: one simulator process and one `vla-edge run` process; the same held-out seeds and
instructions for every target. Reports success rate, fallback share on in-distribution episodes,
command -> telemetry round trip and tick latency, as a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from simulator.demo import closed_loop_rig, ensure_bundle, run_episode

COMPARE_SEED_BASE = 9_000_000  # held out from training, evaluation, calibration, gate and demo seeds
TARGETS = ("red block", "blue ball", "green triangle", "yellow star")


def run_target(target: str, bundle: Path, episodes: int, out: Path) -> dict:
    with closed_loop_rig(bundle, out, f"-{target}", COMPARE_SEED_BASE, target=target) as rig:
        rng = np.random.default_rng(COMPARE_SEED_BASE)
        rows, ticks = [], []
        for i in range(episodes):
            spec = {"label": "training instruction", "target": TARGETS[i % len(TARGETS)]}
            row, _, episode_ticks = run_episode(spec, COMPARE_SEED_BASE + i, rig.sim, rig.socket_path, rng)
            rows.append(row)
            ticks.extend(episode_ticks)
    round_trips = [r["round_trip_ms_median"] for r in rows if r["round_trip_ms_median"] is not None]
    return {
        "target": target, "episodes": len(rows), "successes": sum(r["success"] for r in rows),
        "success_rate": sum(r["success"] for r in rows) / len(rows),
        "fallback_share": float(np.mean([r["fallback_share"] for r in rows])),
        "round_trip_ms_median": float(np.median(round_trips)) if round_trips else None,
        "tick_ms": {q: float(np.percentile(ticks, p)) for q, p in (("p50", 50), ("p99", 99))} if ticks else {},
        "episodes_detail": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/compare"))
    parser.add_argument("--targets", nargs="+", default=["cpu", "cpu-fp32"])
    parser.add_argument("--episodes", type=int, default=50)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_bundle(args.bundle, 50)
    started = time.monotonic()
    results = [run_target(t, args.bundle, args.episodes, args.out) for t in args.targets]
    print("| target | success | fallback share (in-distribution) | command->telemetry round trip p50 | "
          "tick p50 / p99 |")
    print("|---|---|---|---|---|")
    for r in results:
        rt = "-" if r["round_trip_ms_median"] is None else f"{r['round_trip_ms_median']:.1f} ms"
        tick = r["tick_ms"]
        print(f"| {r['target']} | {r['successes']}/{r['episodes']} ({r['success_rate']:.0%}) | "
              f"{r['fallback_share']:.1%} | {rt} | {tick.get('p50', float('nan')):.1f} / "
              f"{tick.get('p99', float('nan')):.1f} ms |")
    (args.out / "compare.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\n{time.monotonic() - started:.0f} s; details in {args.out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
