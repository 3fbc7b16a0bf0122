"""`vla-edge`: the on-device command line. One main(); subcommands grow with the runtime."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edge import __version__
from edge.errors import EdgeError

logger = logging.getLogger(__name__)


def _tokenize(args: argparse.Namespace) -> int:
    from edge.inference.tokenizer import InstructionTokenizer

    tokenizer = InstructionTokenizer(args.tokenizer, max_tokens=args.max_tokens)
    ids, mask = tokenizer.encode(args.instruction)
    count = int(mask.sum())
    print(f"{count} tokens (limit {tokenizer.max_tokens}): {ids[0, :count].tolist()}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from edge.service.run import run_service

    # run_service loads the config itself so that a config error exits 78 (EX_CONFIG), which the
    # systemd unit does not restart on.
    return run_service(args.config)


def _bench(args: argparse.Namespace) -> int:
    # The benchmark is its own program (it also times PyTorch eager, where installed): this command
    # replaces itself with it, so nothing of it is ever imported into the runtime.
    from importlib.util import find_spec

    if find_spec("benchmarks") is None:
        raise EdgeError("the latency benchmark is not installed: install this package from its source tree "
                        "with `pip install -e '.[bench]'`")
    command = [sys.executable, "-m", "benchmarks.latency", *args.bench_args]
    sys.stdout.flush()
    sys.stderr.flush()
    # Its usage lines name the command that ran it (issue 13, finding 13), not `python -m ...`.
    os.execve(sys.executable, command, {**os.environ, "VLA_EDGE_BENCH_PROG": "vla-edge bench"})
    return 0  # not reached: execv returns only by raising


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-edge", description="VLA policy runtime for Jetson robots")
    parser.add_argument("--version", action="version", version=f"vla-edge {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    from edge.cli.control import add_control_commands

    add_control_commands(commands)
    run = commands.add_parser("run", help="run the robot service (camera + policy + motor link at 10 Hz)")
    run.add_argument("--config", required=True, help="robot configuration file (YAML)")
    run.set_defaults(handler=_run)
    tokenize = commands.add_parser("tokenize", help="check that an instruction fits the policy's tokenizer")
    tokenize.add_argument("instruction")
    tokenize.add_argument("--tokenizer", required=True, help="tokenizer.json (shipped in the policy bundle)")
    tokenize.add_argument("--max-tokens", type=int, default=32)
    tokenize.set_defaults(handler=_tokenize)
    from edge.service.doctor import add_doctor_command

    add_doctor_command(commands)
    from edge.service.tune import add_tune_command

    add_tune_command(commands)
    # Everything after `bench` belongs to the benchmark's own parser (see main()); no -h here, so that
    # `vla-edge bench --help` shows the benchmark's options.
    bench = commands.add_parser("bench", add_help=False,
                                help="latency benchmark: stages, backends and precisions side by side "
                                     "(`vla-edge bench --help`)")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # stdout, not stderr: under systemd both go to journald, and operators tail stdout.
    logging.basicConfig(stream=sys.stdout, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status = args.handler(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return status
    except EdgeError as exc:
        logger.error("%s", exc)
        return 2
    except BrokenPipeError:
        # `vla-edge status | head`: the reader left. Point stdout at /dev/null so that the flush at
        # exit does not raise a second time, and exit as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13

