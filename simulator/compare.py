"""Closed-loop success of one or more policy bundles through the real path (serial pty + MJPEG camera +
service), per bundle target.

    python -m simulator.compare --targets cpu cpu-fp32 --episodes 50
    python -m simulator.compare --bundles reference=artifacts/bundle act=artifacts/bundle-act --targets cpu

For each bundle and target: one simulator process and one `vla-edge run` process; the same held-out seeds and
instructions for every bundle and target. Reports success rate, fallback share on in-distribution episodes,
command -> telemetry round trip and tick latency, as a table and JSON. A bundle the runtime cannot run
(yet) is reported as such and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from simulator.demo import (
    DEFAULT_BUNDLE,
    closed_loop_rig,
    ensure_bundle,
    parse_bundles,
    run_episode,
    runtime_refusal,
    service_status,
)

COMPARE_SEED_BASE = 9_000_000  # held out from training, evaluation, calibration, gate and demo seeds
TARGETS = ("red block", "blue ball", "green triangle", "yellow star")


def run_target(target: str, bundle: Path, episodes: int, out: Path, name: str = "") -> dict:
    suffix = f"-{name}-{target}" if name else f"-{target}"
    with closed_loop_rig(bundle, out, suffix, COMPARE_SEED_BASE, target=target) as rig:
        rng = np.random.default_rng(COMPARE_SEED_BASE)
        rows, ticks = [], []
        for i in range(episodes):
            spec = {"label": "training instruction", "target": TARGETS[i % len(TARGETS)]}
            row, _, episode_ticks = run_episode(spec, COMPARE_SEED_BASE + i, rig.sim, rig.socket_path, rng)
            rows.append(row)
            ticks.extend(episode_ticks)
        status = service_status(rig.socket_path) or {}
    round_trips = [r["round_trip_ms_median"] for r in rows if r["round_trip_ms_median"] is not None]
    return {
        "bundle": name or str(bundle), "target": target, "episodes": len(rows),
        "successes": sum(r["success"] for r in rows),
        "success_rate": sum(r["success"] for r in rows) / len(rows),
        "fallback_share": float(np.mean([r["fallback_share"] for r in rows])),
        "round_trip_ms_median": float(np.median(round_trips)) if round_trips else None,
        "tick_ms": {q: float(np.percentile(ticks, p)) for q, p in (("p50", 50), ("p99", 99))} if ticks else {},
        "chunks": status.get("chunks"),  # a chunk policy's replans, entry index vs delay, empty stops
        "episodes_detail": rows,
    }


def format_chunks(results: list[dict]) -> str:
    """Chunk execution per run of a chunk policy (edge/control/chunks.py, ChunkStats), over the whole run."""
    lines = ["| bundle | target | horizon / replan every | replans per s | entry index: chunks (mean delay) | "
             "empty-chunk stops / ticks | late chunks | replaced requests |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.get("chunks")
        if not c:
            continue
        entries = ", ".join(f"{k}: {n} ({c['mean_delay_s'].get(k, float('nan')) * 1e3:.0f} ms)"
                            for k, n in sorted(c["entries"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['bundle']} | {r['target']} | {c['horizon']} / {c['replan_every']} | "
                     f"{c['replans_per_s']:.2f} | {entries} | {c['empty_stops']} / {c['empty_ticks']} | "
                     f"{c['late_chunks']} | {c['replaced_requests']} |")
    return "\n".join(lines) if len(lines) > 2 else ""



def format_table(results: list[dict]) -> str:
    lines = ["| bundle | target | success | fallback share (in-distribution) | command->telemetry round trip p50 | "
             "tick p50 / p99 |", "|---|---|---|---|---|---|"]
    for r in results:
        if "refused" in r:
            lines.append(f"| {r['bundle']} | {r['target']} | not run: {r['refused']} | - | - | - |")
            continue
        rt = "-" if r["round_trip_ms_median"] is None else f"{r['round_trip_ms_median']:.1f} ms"
        tick = r["tick_ms"]
        lines.append(f"| {r['bundle']} | {r['target']} | {r['successes']}/{r['episodes']} ({r['success_rate']:.0%}) | "
                     f"{r['fallback_share']:.1%} | {rt} | {tick.get('p50', float('nan')):.1f} / "
                     f"{tick.get('p99', float('nan')):.1f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None,
                        help=f"one bundle (default {DEFAULT_BUNDLE}, built when missing); or use --bundles")
    parser.add_argument("--bundles", nargs="+", default=None, metavar="NAME=DIR",
                        help="several bundles by name, e.g. reference=artifacts/bundle act=artifacts/bundle-act; "
                             f"{DEFAULT_BUNDLE} is built when missing, others must exist (make bundle-act)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/compare"))
    parser.add_argument("--targets", nargs="+", default=["cpu", "cpu-fp32"])
    parser.add_argument("--episodes", type=int, default=50)
    args = parser.parse_args(argv)
    if args.bundle is not None and args.bundles is not None:
        parser.error("give --bundle or --bundles, not both")
    if args.episodes < 1:
        parser.error("--episodes must be >= 1")
    try:
        bundles = parse_bundles(args.bundles) if args.bundles else {"": args.bundle or DEFAULT_BUNDLE}
    except ValueError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in bundles.values():
        ensure_bundle(path, 50, build_missing=args.bundles is None)
    started = time.monotonic()
    results = []
    for name, path in bundles.items():
        refusal = runtime_refusal(path)
        for target in args.targets:
            if refusal is not None:
                print(f"bundle {name or path}: not run, {refusal}", flush=True)
                results.append({"bundle": name or str(path), "target": target, "refused": refusal})
                continue
            results.append(run_target(target, path, args.episodes, args.out, name))
    print(format_table(results))
    chunks = format_chunks(results)
    if chunks:
        print("\nchunk execution (over each run):\n" + chunks)
    (args.out / "compare.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\n{time.monotonic() - started:.0f} s; details in {args.out / 'compare.json'}")
    return 1 if any("refused" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
