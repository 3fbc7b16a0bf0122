"""Latency benchmark of the VLA edge runtime: where a tick's time goes, per backend and precision.

    python -m benchmarks.latency --bundle artifacts/bundle [--quick | --long] [--out DIR]

The numbers that matter are ratios measured side by side in ONE run (docs/architecture.md, 'What "fast"
means'); absolute milliseconds mean something only on the target. Three parts:

1. Pure inference, side by side and INTERLEAVED: every round runs one iteration of each configuration,
   in an order that rotates from round to round, so drift of the machine hits all of them alike.
   Configurations: PyTorch eager FP32 (the seeds' way: deterministic, and MC-dropout as T full passes
   of the whole model; plus the head batched, which separates the algorithm's gain from the engine's),
   ONNX Runtime FP32, INT8 CPU layout and INT8 TensorRT Q/DQ layout, and TensorRT or ONNX Runtime CUDA
   where present; T in {1, 8, 32}; without and with a competing CPU load (a separate process that
   burns one core, paused with SIGSTOP outside the loaded half of each round). The language encoder is
   timed on its own: it runs when the instruction changes, never inside a tick.
2. The full tick in closed loop: the real ControlLoop against the simulated motor controller running as
   its own process (a real pty and an MJPEG camera stream), built by the runtime's own wiring, T
   cycling over the sample counts tick by tick. The stage times are the loop's own tick records.
3. Start-up and memory: the runtime's RSS in a subprocess that imports only `edge` (it reports whether
   torch got imported), and start-to-first-command of `vla-edge run` against the simulator.
4. The transports side by side, one-way on loopback: a camera frame and a command over ROS 2 topics (DDS,
   to and from another process) next to the serial path (MJPEG camera, SetTargets on a pty), and the
   sensor_msgs/Image encode/decode cost per frame (benchmarks/transport.py).

Writes latency.json, latency.md, latency_cdf.png, stage_bars.png and tick_jitter.png into --out.
Nothing in `edge/` imports this package; torch is imported only for the PyTorch comparison. This module
is the command line; the parts are the package's other modules (benchmarks/README.md lists them).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from benchmarks.report import format_fast_default, format_markdown, format_ratios
from benchmarks.run import run_benchmark
from benchmarks.settings import DEFAULT_TARGETS, MODES, BenchSettings
from edge.errors import ConfigError, EdgeError

logger = logging.getLogger(__name__)


def _positive_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser(prog: str = "python -m benchmarks.latency") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="policy bundle directory (build-engines --int8 --out DIR)")
    parser.add_argument("--out", default="artifacts/benchmarks/latency", help="where JSON, Markdown and plots go")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="<= 2 minutes (default)")
    mode.add_argument("--long", dest="mode", action="store_const", const="long", help="more iterations, longer jitter run")
    parser.set_defaults(mode="quick")
    parser.add_argument("--iterations", type=int, help="timed iterations per runtime configuration and load")
    parser.add_argument("--torch-iterations", type=int, help="timed iterations per PyTorch configuration and load")
    parser.add_argument("--warmup", type=int, help="untimed iterations per configuration first")
    parser.add_argument("--jitter-seconds", type=float, help="closed-loop seconds per load condition")
    parser.add_argument("--budget-seconds", type=float,
                        help="side by side: start no new round after this many seconds (quick 50, long 1200)")
    parser.add_argument("--samples", type=_positive_int_list, default=(1, 8, 32), help="MC sample counts T, e.g. 1,8,32")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="bundle targets to run on ONNX Runtime CPU (cpu-fp32,cpu,tensorrt,fp16)")
    parser.add_argument("--closed-loop-config", default=None,
                        help="configuration for the closed loop and start-up, e.g. ort-int8-cpu or trt-int8 "
                             "(default: TensorRT INT8 where available, else ort-int8-cpu)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--checkpoint", default=None, help="reference policy checkpoint for PyTorch eager")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-load", action="store_true", help="skip the runs with a competing CPU load")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    parser.add_argument("--no-closed-loop", action="store_true", help="skip the closed-loop tick measurement")
    parser.add_argument("--fifo-priority", type=int, default=50,
                        help="SCHED_FIFO priority of the control thread in the closed loop, as the systemd unit "
                             "starts it (default 50); where granted, each load also runs at normal priority")
    parser.add_argument("--no-fifo", action="store_true", help="closed loop at normal priority only")
    parser.add_argument("--segment-seconds", type=float, default=10.0,
                        help="closed-loop conditions take turns in segments this long (default 10)")
    parser.add_argument("--no-startup", action="store_true", help="skip RSS and start-to-first-command")
    parser.add_argument("--no-transport", action="store_true",
                        help="skip the transports: frames and commands over ROS 2 (DDS) next to serial + MJPEG")
    parser.add_argument("--no-defaults", action="store_true",
                        help="skip the default configuration (target/threads auto) against the best measured one")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    preset = MODES[args.mode]

    def pick(name: str, minimum: float):
        value = getattr(args, name)
        return _at_least(name, preset[name] if value is None else value, minimum)

    return BenchSettings(
        mode=args.mode, iterations=pick("iterations", 1), torch_iterations=pick("torch_iterations", 1),
        warmup=pick("warmup", 0), jitter_seconds=pick("jitter_seconds", 0.1),
        budget_seconds=pick("budget_seconds", 1.0), samples=tuple(args.samples),
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        closed_loop_config=args.closed_loop_config, load=not args.no_load, torch=not args.no_torch,
        closed_loop=not args.no_closed_loop, startup=not args.no_startup, threads=args.threads, seed=args.seed,
        checkpoint=args.checkpoint, load_bound_s=preset["load_bound_s"],
        fifo_priority=None if args.no_fifo else _fifo_priority(args.fifo_priority),
        segment_seconds=_at_least("segment_seconds", args.segment_seconds, 0.1), transport=not args.no_transport,
        default_budget_s=0.0 if args.no_defaults else preset["default_budget_s"],
    )


def _at_least(name: str, value: float, minimum: float) -> float:
    if value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    return value


def _fifo_priority(value: int) -> int:
    if not 1 <= value <= 99:
        raise ConfigError(f"--fifo-priority must be within 1..99 (SCHED_FIFO), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    # `vla-edge bench` runs this module and names itself, so usage and errors show the command typed.
    args = build_parser(os.environ.get("VLA_EDGE_BENCH_PROG", "python -m benchmarks.latency")).parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def on_sigterm(signum: int, _frame: object) -> None:
        # Unwind through the context managers so the simulator and the load process are stopped.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        settings = settings_from_args(args)
        report = run_benchmark(Path(args.bundle), Path(args.out), settings)
    except EdgeError as exc:
        logger.error("%s", exc)
        return 2
    print(format_markdown(report))
    print(format_ratios(report))
    print(format_fast_default(report))
    print(f"\nwritten to {args.out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
