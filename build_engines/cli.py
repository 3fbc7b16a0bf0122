"""`build-engines` / `build_engines.py`: a trained policy becomes one verified policy bundle.

    build-engines --int8 --out artifacts/bundle                      # the reference policy
    build-engines --policy my_pkg.policy:make_policy --calib-source episodes/ --int8 --out my_bundle
    build-engines --onnx-spec policy.yaml --calib-source lerobot_dataset/ --int8 --out my_bundle
    build-engines --engines-only artifacts/bundle     (on the robot: TensorRT engines for this GPU only)

Exit codes:
  0    the bundle was written
  1    a build error: a step failed (export, calibration, quantization, layout check, engine build) or
       an option, the output location or the input data is unusable
  3    the accuracy gate refused the bundle (report printed and written as <out>.refused.json)
  130  interrupted (Ctrl-C)
An error ends in one line on stderr, `build-engines: error: ...` (`build-engines: refused: ...` for
the gate), never a traceback; log lines on stdout may precede it. Nothing is written to --out unless
the whole build succeeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from build_engines.build import (
    CALIB_METHODS,
    UNCERTAINTY_SIGNALS,
    BuildOptions,
    Tolerances,
    format_report,
    format_summary,
    run_build,
)
from build_engines.camera_codec import DEFAULT_QUALITIES
from build_engines.errors import EXIT_BUILD_ERROR, BuildError, GateRefused
from build_engines.policy import DEFAULT_POLICY
from build_engines.replay_gate import ReplayTolerances
from build_engines.samples import DatasetOptions
from edge.errors import EdgeError

logger = logging.getLogger(__name__)

PROG = "build-engines"
EXIT_OK = 0
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
DESCRIPTION, _, _ = __doc__.partition("\nExit codes:")
EXIT_CODES = __doc__[len(DESCRIPTION):].strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines-only", type=Path, default=None, metavar="BUNDLE",
                   help="build, verify and install TensorRT engines for this GPU into an existing bundle, from its "
                        "graphs (needs TensorRT, cuda-python, onnx and numpy; no torch, no export or gate); every "
                        "other option is ignored")
    p.add_argument("--int8", action="store_true", help="calibrate and produce the INT8 graphs (and engines): the TensorRT Q/DQ graph and the CPU "
                        "INT8 candidates (QDQ; QOperator; 7-bit reduce-range weights), each gated, an optional "
                        "CPU candidate that fails left out of the bundle")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="FP16 graphs (default on)")
    p.add_argument("--out", type=Path, default=Path("artifacts/bundle"), help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--policy", default=None,
                   help="'package.module:factory' returning a build_engines.policy.Policy "
                        f"(default: the reference policy, {DEFAULT_POLICY}); see docs/bring-your-own-policy.md")
    p.add_argument("--onnx-spec", type=Path, default=None, metavar="YAML",
                   help="pre-exported ONNX graphs instead of --policy: a YAML naming the vision / language / head "
                        "graphs next to the policy spec (docs/your-data.md); the head's Dropout nodes become "
                        "MC-dropout mask inputs")
    p.add_argument("--checkpoint", type=Path, default=None, help="passed to the policy factory as checkpoint=")
    p.add_argument("--calib-source", default=None,
                   help="a LeRobot v3 dataset directory, HDF5 episodes (a file or a folder of them), or a folder "
                        "of images (with --calib-instructions); recorded episodes are split by episode and the "
                        "held-out ones replayed in the gate; default: the policy's own calibration data")
    p.add_argument("--heldout-fraction", type=float, default=0.2,
                   help="fraction of recorded episodes held out for the gate (at least one episode)")
    p.add_argument("--dataset-camera", action="append", default=[], metavar="CAMERA=FEATURE",
                   help="LeRobot: the video feature of a spec camera, e.g. front=observation.images.top "
                        "(repeat per camera; default: the only video, or observation.images.<camera>)")
    p.add_argument("--dataset-proprio", default=None, metavar="ENTRIES",
                   help="LeRobot: comma-separated features or key[i] entries making the proprio vector, in order "
                        "(default: observation.state entries named like the spec's proprio, else all of it)")
    p.add_argument("--dataset-action", default="action", help="LeRobot: the feature holding the actions")
    p.add_argument("--max-replay-error", type=float, default=ReplayTolerances.max_mean_abs_vs_reference,
                   help="replay gate: largest mean action error vs FP32 at any chunk step, of the range")
    p.add_argument("--max-replay-abs", type=float, default=ReplayTolerances.max_abs_vs_reference,
                   help="replay gate: largest single action error vs FP32, of the range")
    p.add_argument("--max-recorded-error", type=float, default=None,
                   help="replay gate: largest mean action error vs the recorded actions (default: reported only)")
    p.add_argument("--false-alarm-rate", type=float, default=ReplayTolerances.false_alarm_rate,
                   help="replay gate: the uncertainty threshold's false-alarm rate on held-out episodes")
    p.add_argument("--env", default=None,
                   help="'package.module:factory' of a simulated environment for the closed-loop gate; "
                        "default: the policy's own (the reference world for the reference policy); 'none': "
                        "gate on held-out data only")
    p.add_argument("--uncertainty", choices=UNCERTAINTY_SIGNALS, default="mc-dropout",
                   help="mc-dropout (the head's nn.Dropout layers become mask inputs) or none")
    p.add_argument("--heldout-samples", type=int, default=128,
                   help="held-out samples for the accuracy gate and the failure monitor's thresholds (>= 99 for 1%%)")
    p.add_argument("--calib-instructions", type=Path, default=None, help="instructions file for an image folder")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--calib-method", choices=CALIB_METHODS, default="percentile")
    p.add_argument("--gate-seeds", type=int, default=50, help="closed-loop episodes per target in the gate")
    p.add_argument("--max-mc-samples", type=int, default=32, help="largest T the engines' profile covers")
    p.add_argument("--mc-samples", type=int, default=16, help="default T at run time")
    p.add_argument("--monitor-rate", type=float, default=0.01,
                   help="failure monitor: false alarms per in-distribution tick its conformal thresholds allow")
    p.add_argument("--monitor-check-seeds", type=int, default=10,
                   help="failure monitor check in the gate's closed loop: in-distribution episodes per target "
                        "(half as many per failure kind; 0 skips it; reports/monitor.md)")
    p.add_argument("--camera-jpeg", nargs="+", default=[str(q) for q in DEFAULT_QUALITIES], metavar="QUALITY",
                   help="the JPEG qualities the robot's camera may deliver (MJPG USB and IP cameras): the failure "
                        "monitor is fitted on calibration frames raw and at each, the closed-loop gate's episodes "
                        "run raw or at one of them by seed; 'none' for a camera that delivers raw frames "
                        f"(default {' '.join(str(q) for q in DEFAULT_QUALITIES)})")
    p.add_argument("--tensorrt", choices=("auto", "off"), default="auto")
    p.add_argument("--min-vision-cosine", type=float, default=Tolerances.min_vision_cosine)
    p.add_argument("--max-head-error", type=float, default=Tolerances.max_head_action_error)
    p.add_argument("--max-success-drop", type=float, default=Tolerances.max_success_drop)
    p.add_argument("--log-level", default="INFO")
    return p


class QuietOnnxRuntimeInfo(logging.Filter):
    """Drops the INFO (and DEBUG) lines ONNX Runtime's quantization tools send through the root logger,
    one per node (124 of 220 lines of a build log, issue 13 finding 13); their warnings still pass, and
    `--log-level DEBUG` keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        third_party = record.name == "root" and f"{os.sep}onnxruntime{os.sep}" in record.pathname
        return not (third_party and record.levelno < logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(QuietOnnxRuntimeInfo())
    try:
        if args.engines_only is not None:
            return _engines_only(args.engines_only)
        return _build(args)
    except GateRefused as refused:
        report_path = args.out.with_name(args.out.name + ".refused.json")
        report_path.write_text(json.dumps(refused.report, indent=2) + "\n")
        print(format_report(refused.report))
        return _fail(refused.exit_code, f"refused: {refused} (report: {report_path})")
    except EdgeError as exc:  # every BuildError, and the runtime's errors (BundleError, InputError, ...)
        code = exc.exit_code if isinstance(exc, BuildError) else EXIT_BUILD_ERROR
        return _fail(code, f"error: {exc}")
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")


def _require_torch() -> None:
    """The full build exports the PyTorch policy; without torch say what to install, or what to run instead."""
    try:
        import torch  # noqa: F401 - the full build's export and calibration need it
    except ImportError as exc:
        raise BuildError("the full build needs torch, which is not installed: pip install torch==2.13.0, then "
                         "pip install -e '.[build]' (or: make venv); on the robot, build only the engines of a "
                         "finished bundle: build-engines --engines-only BUNDLE") from exc


def _build(args: argparse.Namespace) -> int:
    _require_torch()
    # `--policy my_policy:make_policy` and `--env` name modules in the current directory as `python -m` would
    # find them; the installed `build-engines` script does not have it on sys.path. Last, so it shadows nothing.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    if args.mc_samples > args.max_mc_samples or args.mc_samples < 1:
        raise BuildError(f"--mc-samples must be in 1..{args.max_mc_samples}, got {args.mc_samples}")
    if args.onnx_spec is not None and args.policy is not None:
        raise BuildError(f"--onnx-spec and --policy {args.policy} both name the policy; give one of them")
    options = BuildOptions(
        out=args.out, policy=args.policy or DEFAULT_POLICY, onnx_spec=args.onnx_spec, int8=args.int8,
        fp16=args.fp16, checkpoint=args.checkpoint, heldout_fraction=args.heldout_fraction,
        dataset=_dataset_options(args),
        replay_tolerances=ReplayTolerances(max_mean_abs_vs_reference=args.max_replay_error,
                                           max_abs_vs_reference=args.max_replay_abs,
                                           max_mean_abs_vs_recorded=args.max_recorded_error,
                                           false_alarm_rate=args.false_alarm_rate),
        env=args.env, uncertainty=args.uncertainty, heldout_samples=args.heldout_samples,
        calib_source=args.calib_source, calib_instructions=args.calib_instructions,
        calib_samples=args.calib_samples, calib_method=args.calib_method, gate_seeds=args.gate_seeds,
        max_mc_samples=args.max_mc_samples, default_mc_samples=args.mc_samples, tensorrt=args.tensorrt,
        monitor_rate=args.monitor_rate, monitor_check_seeds=args.monitor_check_seeds,
        camera_jpeg=_camera_jpeg(args.camera_jpeg), force=args.force,
        tolerances=Tolerances(min_vision_cosine=args.min_vision_cosine, max_head_action_error=args.max_head_error,
                              max_success_drop=args.max_success_drop),
    )
    summary = run_build(options)
    print(summary.get("text") or format_summary(summary))
    print(f"\nbundle: {args.out}")
    return EXIT_OK


def _camera_jpeg(values: list[str]) -> tuple[int, ...]:
    """--camera-jpeg values: 'none' alone, or integers (their range is checked with the other options)."""
    if [v.lower() for v in values] == ["none"]:
        return ()
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise BuildError(f"--camera-jpeg takes JPEG qualities 1..100 or 'none', got {' '.join(values)!r}") from None


def _dataset_options(args: argparse.Namespace) -> DatasetOptions:
    cameras = {}
    for pair in args.dataset_camera:
        camera, sep, feature = pair.partition("=")
        if not sep or not camera or not feature:
            raise BuildError(f"--dataset-camera {pair!r} must be CAMERA=FEATURE, e.g. front=observation.images.top")
        cameras[camera] = feature
    proprio = None
    if args.dataset_proprio is not None:
        proprio = tuple(p.strip() for p in args.dataset_proprio.split(",") if p.strip())
    return DatasetOptions(cameras=cameras or None, proprio=proprio, action=args.dataset_action)


def _engines_only(bundle_dir: Path) -> int:
    from build_engines.engines_only import build_engines_only

    entries = build_engines_only(bundle_dir)
    for entry in entries:
        print(f"{entry['graph']:<9} {entry['variant']:<9} {entry['precision']:<5} {entry['path']}  "
              f"max |err| {entry['max_abs_error']:.3g}")
    print(f"\n{len(entries)} engines verified and installed in {bundle_dir} (TensorRT {entries[0]['tensorrt_version']}, "
          f"GPU sm {entries[0]['compute_capability']})" if entries else f"\nno engines to build in {bundle_dir}")
    return EXIT_OK


def _fail(code: int, message: str) -> int:
    """One line on stderr: a multi-line message (a layout check's violations, TensorRT's parser errors)
    is joined into it, so the last line of a failed build says everything."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"{PROG}: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
