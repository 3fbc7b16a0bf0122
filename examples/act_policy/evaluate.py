"""Offline closed-loop check of the ACT-style policy in PyTorch, with chunk execution, next to the
reference policy on the same held-out seeds (reference_policy.evaluate's seeds and success rule).

Chunk execution as the runtime does it without delay: a new chunk every `--replan-every` ticks, the chunk's
steps executed in between. Prints a table and writes JSON.

    python -m examples.act_policy.evaluate --seeds 50 --replan-every 2 4 --json artifacts/act-evaluation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from reference_policy.evaluate import EVAL_SEED_BASE, SuccessReport, success_rate
from reference_world.world import TabletopWorld

logger = logging.getLogger(__name__)


def evaluate(checkpoint: Path, seeds: int, replan_every: list[int], reference: bool) -> dict:
    from examples.act_policy.model import load_head
    from examples.act_policy.policy import ChunkExecutor, TorchChunkPolicy

    world = TabletopWorld()
    seed_range = range(EVAL_SEED_BASE, EVAL_SEED_BASE + seeds)
    act = TorchChunkPolicy(load_head(checkpoint))
    rows = []
    for every in replan_every:
        started = time.monotonic()
        executor = ChunkExecutor(act.chunk, every)
        report = success_rate(world, executor, seed_range, False, f"ACT-style, new chunk every {every} ticks")
        rows.append(_row(report, "act", every, executor.replans, time.monotonic() - started))
        logger.info("%s: %d/%d", report.name, report.successes, report.episodes)
    if reference:
        from reference_policy.policy import TorchPolicy

        started = time.monotonic()
        report = success_rate(world, TorchPolicy(), seed_range, False, "reference (single step, every tick)")
        rows.append(_row(report, "reference", 1, None, time.monotonic() - started))
        logger.info("%s: %d/%d", report.name, report.successes, report.episodes)
    return {"seeds": [seed_range.start, seed_range.stop], "instructions": "training instructions",
            "checkpoint": str(checkpoint), "results": rows}


def _row(report: SuccessReport, policy: str, every: int, replans: int | None, seconds: float) -> dict:
    return {"name": report.name, "policy": policy, "replan_every": every, "episodes": report.episodes,
            "successes": report.successes, "rate": report.rate, "mean_steps_success": report.mean_steps_success,
            "replans": replans, "seconds": round(seconds, 1)}


def format_table(report: dict) -> str:
    lines = [f"held-out seeds {report['seeds'][0]}..{report['seeds'][1] - 1}, training instructions", "",
             "| policy | episodes | success | rate | mean steps (successes) |", "|---|---|---|---|---|"]
    for row in report["results"]:
        lines.append(f"| {row['name']} | {row['episodes']} | {row['successes']} | {row['rate']:.0%} | "
                     f"{row['mean_steps_success']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from examples.act_policy.model import CHECKPOINT_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=50, help="held-out seeds with training instructions")
    parser.add_argument("--replan-every", type=int, nargs="+", default=[2, 4], help="ticks between new chunks")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT_DIR, help="ACT head checkpoint directory")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference policy's run")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if any(every < 1 for every in args.replan_every):
        parser.error("--replan-every values must be >= 1 (ticks)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    report = evaluate(args.checkpoint, args.seeds, args.replan_every, not args.no_reference)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
