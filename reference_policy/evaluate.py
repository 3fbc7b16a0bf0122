"""Evaluate the reference policy (PyTorch FP32, called directly) in the reference world.

Reports closed-loop success on held-out seeds with training instructions and with held-out
paraphrases, and how well the MC-dropout spread separates in-distribution frames from each OOD
variant (AUROC). Prints a table and writes JSON.

    python -m reference_policy.evaluate --seeds 50 --paraphrase-seeds 50 --json eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from build_engines.monitor_check import auroc  # noqa: F401  (also the evaluation's public name)
from reference_world.episodes import run_episode
from reference_world.world import OOD_VARIANTS, TabletopWorld

logger = logging.getLogger(__name__)

EVAL_SEED_BASE = 1_000_000  # training uses seeds below this (reference_policy.train)
PARAPHRASE_SEED_BASE = 2_000_000
OOD_SEED_BASE = 3_000_000


@dataclass
class SuccessReport:
    name: str
    episodes: int
    successes: int
    mean_steps_success: float

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


def success_rate(world, policy: Callable, seeds: range, heldout_paraphrase: bool, name: str) -> SuccessReport:
    results = [run_episode(world, policy, seed, heldout_paraphrase=heldout_paraphrase) for seed in seeds]
    wins = [r for r in results if r.success]
    mean_steps = float(np.mean([r.steps for r in wins])) if wins else float("nan")
    return SuccessReport(name, len(results), len(wins), mean_steps)


def spread_scores(world, policy, seeds: range, variant: str | None, samples: int, steps: int, every: int):
    """MC-dropout scores on frames of episodes driven by the deterministic policy."""
    from reference_policy.model import uncertainty_score

    scores = []
    for seed in seeds:
        obs = world.reset(seed, variant=variant)
        for step in range(steps):
            if world.done:
                break
            if step % every == 0:
                scores.append(uncertainty_score(policy.act_mc(obs, samples)))
            obs = world.step(policy.act(obs))
    return np.asarray(scores)


def evaluate(policy, seeds: int, paraphrase_seeds: int, ood_seeds: int, mc_samples: int) -> dict:
    world = TabletopWorld()
    started = time.monotonic()
    reports = [
        success_rate(world, policy, range(EVAL_SEED_BASE, EVAL_SEED_BASE + seeds), False, "training instructions"),
        success_rate(world, policy, range(PARAPHRASE_SEED_BASE, PARAPHRASE_SEED_BASE + paraphrase_seeds), True,
                     "held-out paraphrases"),
    ]
    ood = {}
    if ood_seeds:
        ood_range = range(OOD_SEED_BASE, OOD_SEED_BASE + ood_seeds)
        in_dist = spread_scores(world, policy, ood_range, None, mc_samples, steps=40, every=4)
        for variant in OOD_VARIANTS:
            scores = spread_scores(world, policy, ood_range, variant, mc_samples, steps=40, every=4)
            ood[variant] = {
                "auroc": auroc(in_dist, scores),
                "median_score": float(np.median(scores)),
                "frames": len(scores),
            }
        ood["in_distribution"] = {
            "median_score": float(np.median(in_dist)),
            "p99_score": float(np.quantile(in_dist, 0.99)),
            "frames": len(in_dist),
        }
    return {
        "policy": "PyTorch FP32 (reference_policy.policy.TorchPolicy)",
        "success": [asdict(r) | {"rate": r.rate} for r in reports],
        "uncertainty": {"mc_samples": mc_samples, "variants": ood},
        "seeds": {"training_instructions": [EVAL_SEED_BASE, EVAL_SEED_BASE + seeds],
                  "paraphrases": [PARAPHRASE_SEED_BASE, PARAPHRASE_SEED_BASE + paraphrase_seeds],
                  "ood": [OOD_SEED_BASE, OOD_SEED_BASE + ood_seeds]},
        "environment": {"python": sys.version.split()[0], "machine": platform.machine()},
        "duration_s": time.monotonic() - started,
    }


def format_table(report: dict) -> str:
    lines = ["| evaluation | episodes | success | rate | mean steps (successes) |", "|---|---|---|---|---|"]
    for row in report["success"]:
        lines.append(f"| {row['name']} | {row['episodes']} | {row['successes']} | {row['rate']:.1%} | "
                     f"{row['mean_steps_success']:.1f} |")
    variants = report["uncertainty"]["variants"]
    if variants:
        lines += ["", f"MC-dropout spread (T={report['uncertainty']['mc_samples']}) vs in-distribution frames:",
                  "| OOD variant | AUROC | median score | frames |", "|---|---|---|---|"]
        for name, row in variants.items():
            if name == "in_distribution":
                continue
            lines.append(f"| {name} | {row['auroc']:.3f} | {row['median_score']:.4f} | {row['frames']} |")
        base = variants["in_distribution"]
        lines.append(f"| (in-distribution) | - | {base['median_score']:.4f} | {base['frames']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=50, help="held-out seeds with training instructions")
    parser.add_argument("--paraphrase-seeds", type=int, default=50, help="held-out seeds with paraphrases")
    parser.add_argument("--ood-seeds", type=int, default=20, help="episodes per OOD variant (0 to skip)")
    parser.add_argument("--mc-samples", type=int, default=32, help="Monte-Carlo dropout samples T")
    parser.add_argument("--checkpoint", type=Path, default=None, help="head checkpoint directory")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("seeds", "paraphrase_seeds", "ood_seeds", "mc_samples"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")

    from reference_policy.model import DEFAULT_CHECKPOINT_DIR
    from reference_policy.policy import TorchPolicy

    policy = TorchPolicy(args.checkpoint or DEFAULT_CHECKPOINT_DIR)
    report = evaluate(policy, args.seeds, args.paraphrase_seeds, args.ood_seeds, args.mc_samples)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
