"""`build-engines` / `build_engines.py`: a trained policy becomes one verified policy bundle.

    build_engines.py --int8 --out artifacts/bundle

Exit codes: 0 bundle written; 1 build error (message names what and where); 3 the accuracy gate
refused the bundle (report printed and written beside the output as <out>.refused.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from build_engines.build import CALIB_METHODS, BuildError, BuildOptions, GateRefused, Tolerances, run_build

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build-engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--int8", action="store_true", help="calibrate and produce the INT8 graphs (and engines)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="FP16 graphs (default on)")
    p.add_argument("--out", type=Path, default=Path("artifacts/bundle"), help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--checkpoint", type=Path, default=None, help="policy head checkpoint directory")
    p.add_argument("--calib-source", default="reference-world",
                   help="'reference-world', a folder of images (with --calib-instructions), or HDF5 episodes")
    p.add_argument("--calib-instructions", type=Path, default=None, help="instructions file for an image folder")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--calib-method", choices=CALIB_METHODS, default="percentile")
    p.add_argument("--gate-seeds", type=int, default=50, help="closed-loop episodes per target in the gate")
    p.add_argument("--max-mc-samples", type=int, default=32, help="largest T the engines' profile covers")
    p.add_argument("--mc-samples", type=int, default=16, help="default T at run time")
    p.add_argument("--tensorrt", choices=("auto", "off"), default="auto")
    p.add_argument("--min-vision-cosine", type=float, default=Tolerances.min_vision_cosine)
    p.add_argument("--max-head-error", type=float, default=Tolerances.max_head_action_error)
    p.add_argument("--max-success-drop", type=float, default=Tolerances.max_success_drop)
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.mc_samples > args.max_mc_samples or args.mc_samples < 1:
        print(f"error: --mc-samples must be in 1..{args.max_mc_samples}", file=sys.stderr)
        return 1
    options = BuildOptions(
        out=args.out, int8=args.int8, fp16=args.fp16, checkpoint=args.checkpoint,
        calib_source=args.calib_source, calib_instructions=args.calib_instructions,
        calib_samples=args.calib_samples, calib_method=args.calib_method, gate_seeds=args.gate_seeds,
        max_mc_samples=args.max_mc_samples, default_mc_samples=args.mc_samples, tensorrt=args.tensorrt,
        force=args.force,
        tolerances=Tolerances(min_vision_cosine=args.min_vision_cosine, max_head_action_error=args.max_head_error,
                              max_success_drop=args.max_success_drop),
    )
    from build_engines.build import format_report, format_summary

    try:
        summary = run_build(options)
    except GateRefused as refused:
        report_path = args.out.with_name(args.out.name + ".refused.json")
        report_path.write_text(json.dumps(refused.report, indent=2) + "\n")
        print(format_report(refused.report))
        print(f"\nREFUSED: {refused}\nreport: {report_path}", file=sys.stderr)
        return 3
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"\nbundle: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
