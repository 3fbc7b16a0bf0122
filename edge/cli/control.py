"""`vla-edge say|stop|estop|clear|resume|status`: the control-socket client's commands and the status display."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from typing import Any

from edge.service.control_protocol import (
    DEFAULT_RUNTIME_DIR,
    DEFAULT_SOCKET_NAME,
    default_socket_path,
    send_request,
)


def add_control_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``say``, ``stop``, ``estop``, ``clear`` and ``status`` on the vla-edge command line."""

    def common(parser: argparse.ArgumentParser) -> None:
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--socket", default=None, metavar="PATH",
                           help="control socket (default: the --config file's instruction.socket, else "
                                f"$RUNTIME_DIRECTORY/control.sock, else {DEFAULT_RUNTIME_DIR}/{DEFAULT_SOCKET_NAME})")
        where.add_argument("--config", default=None, metavar="FILE",
                           help="the service's robot.yaml: its instruction.socket is the socket")
        parser.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                            help="how long to wait for the service's reply (default 2)")

    say = subparsers.add_parser("say", help="give the running robot a new instruction")
    say.add_argument("text", nargs="+", help="the instruction, e.g. \"go to the red block\"")
    common(say)
    say.set_defaults(handler=_cli_say)
    stop = subparsers.add_parser("stop", help="clear the instruction: the robot holds (controlled stop)")
    common(stop)
    stop.set_defaults(handler=_cli_simple, control_cmd="stop")
    estop = subparsers.add_parser("estop", help="latch the emergency stop (motors stop until `vla-edge clear`)")
    common(estop)
    estop.set_defaults(handler=_cli_simple, control_cmd="estop")
    clear = subparsers.add_parser("clear", help="release the emergency stop (the robot then holds until "
                                  "`vla-edge resume` or a new `vla-edge say`)")
    common(clear)
    clear.set_defaults(handler=_cli_simple, control_cmd="clear")
    resume = subparsers.add_parser("resume", help="after `vla-edge clear`: move again on the current instruction")
    common(resume)
    resume.set_defaults(handler=_cli_simple, control_cmd="resume")
    status = subparsers.add_parser("status", help="show the running robot's mode, timings, link and camera")
    common(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON reply")
    status.set_defaults(handler=_cli_status)


def _socket_of(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    config = getattr(args, "config", None)
    if config:
        from edge.errors import ConfigError
        from edge.service.config import load_config

        socket_path = load_config(config).instruction.socket
        if not socket_path:
            raise ConfigError(f"{config} sets no instruction.socket, so the service has no control socket; "
                              "set one (e.g. ${RUNTIME_DIRECTORY}/control.sock) and restart the service")
        return socket_path
    return default_socket_path()


def _report(reply: dict[str, Any], done: str) -> int:
    if not reply.get("ok"):
        print(f"refused: {reply.get('error', 'no reason given')}")
        return 1
    print(done)
    return 0


def _cli_say(args: argparse.Namespace) -> int:
    text = " ".join(args.text)
    reply = send_request(_socket_of(args), {"cmd": "say", "text": text}, timeout_s=args.timeout)
    return _report(reply, f"instruction set: {reply.get('instruction', text)!r}")


_DONE = {"stop": "instruction cleared: holding (controlled stop)",
         "estop": "emergency stop latched; release it with `vla-edge clear`",
         "clear": "emergency stop released; holding: `vla-edge resume` (or a new `vla-edge say`) moves again",
         "resume": "resumed: commands slew up from zero"}


def _cli_simple(args: argparse.Namespace) -> int:
    reply = send_request(_socket_of(args), {"cmd": args.control_cmd}, timeout_s=args.timeout)
    return _report(reply, _DONE[args.control_cmd])


def _cli_status(args: argparse.Namespace) -> int:
    reply = send_request(_socket_of(args), {"cmd": "status"}, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0 if reply.get("ok") else 1
    if not reply.get("ok"):
        print(f"refused: {reply.get('error', 'no reason given')}")
        return 1
    print(format_status(reply))
    return 0


def format_status(status: Mapping[str, Any]) -> str:
    """A readable block from a status reply; tolerant of missing fields."""

    def num(value: Any, fmt: str, unit: str = "") -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return f"{value:{fmt}}{unit}"
        return "-"

    def section(name: str) -> Mapping[str, Any]:
        value = status.get(name)
        return value if isinstance(value, Mapping) else {}

    lines = []
    estop = status.get("estop")
    lines.append(f"mode         {status.get('mode', '-')}" + ("  (E-STOP LATCHED)" if estop else ""))
    instruction = status.get("instruction")
    if status.get("language") is False:
        lines.append("instruction  (none needed: the policy takes no instruction)")
    else:
        lines.append(f"instruction  {instruction!r}" if instruction else "instruction  (none: holding)")
    if status.get("hold_reason"):
        lines.append(f"holding      {status['hold_reason']}")
    unc = section("uncertainty")
    lines.append(f"uncertainty  score {num(unc.get('score'), '.4f')} (threshold {num(unc.get('threshold'), '.4f')}, "
                 f"ceiling {num(unc.get('hard_ceiling'), '.4f')})")
    tick = section("tick")
    lines.append(f"last tick    #{tick.get('index', '-')}: policy {num(tick.get('policy_ms'), '.1f', ' ms')}, "
                 f"tick {num(tick.get('tick_ms'), '.1f', ' ms')}, overruns {status.get('overruns', '-')}")
    link = section("link")
    link_stats = link.get("stats") if isinstance(link.get("stats"), Mapping) else {}
    state = {True: "connected", False: "DOWN"}.get(link.get("connected"), "-")
    lines.append(f"motor link   {state}, telemetry age {num(link.get('telemetry_age_s'), '.2f', ' s')}, "
                 f"round trip {num(link.get('round_trip_ms'), '.1f', ' ms')}")
    glass = section("glass_to_wire_ms")
    if glass:
        lines.append(f"latency      glass to wire p50 {num(glass.get('p50'), '.1f', ' ms')} p99 "
                     f"{num(glass.get('p99'), '.1f', ' ms')}; command to telemetry p50 "
                     f"{num(link.get('round_trip_p50_ms'), '.1f', ' ms')} p99 {num(link.get('round_trip_p99_ms'), '.1f', ' ms')}")
    tuning = section("tuning")
    if tuning.get("line"):
        lines.append(f"policy       {tuning['line']}")
    if link_stats:
        lines.append("             " + ", ".join(
            f"{key.replace('_', ' ')} {link_stats[key]}"
            for key in ("bad_frames", "crc_errors", "framing_errors", "telemetry_lost", "write_failures",
                        "undelivered", "reconnects") if key in link_stats))
    controller = section("controller")
    if controller:
        ctl_counters = controller.get("counters") if isinstance(controller.get("counters"), Mapping) else {}
        flags = controller.get("flags") or []
        lines.append(f"controller   {'|'.join(flags) if flags else 'no flags'}"
                     + (f", FAULT: {controller['fault']}" if controller.get("fault") else "")
                     + (", e-stop NOT confirmed" if controller.get("estop_confirmed") is False else "")
                     + "".join(f", {k.replace('_', ' ')} {v}" for k, v in ctl_counters.items()))
    monitor = section("monitor")
    if isinstance(monitor.get("signals"), Mapping):
        tripped = monitor.get("tripped") or []
        lines.append("monitor      " + (f"TRIPPED by {', '.join(tripped)}" if tripped else "calm") + "; " + ", ".join(
            f"{name} {num(row.get('score'), '.4g')}/{num(row.get('threshold'), '.4g')}" + (" ON" if row.get("on") else "")
            for name, row in monitor["signals"].items() if isinstance(row, Mapping)))
    reasons = tick.get("reason_names")
    if reasons:
        lines.append(f"safety       {', '.join(reasons)}")
    cameras = section("cameras") or {"": section("camera")}
    stale = status.get("stale_cameras") or []
    for name, camera in cameras.items():
        camera = camera if isinstance(camera, Mapping) else {}
        cam_state = {True: "connected", False: "DOWN"}.get(camera.get("connected"), "-")
        lines.append(f"camera       {name + ': ' if name else ''}{cam_state}, frame age "
                     f"{num(camera.get('frame_age_s'), '.2f', ' s')}, reconnects {camera.get('reconnects', '-')}"
                     + (", STALE" if name in stale else ""))
    chunks = section("chunks")
    if chunks:
        lines.append(f"chunks       H {chunks.get('horizon', '-')}, replan every {chunks.get('replan_every', '-')}: "
                     f"{chunks.get('replans', '-')} replans ({num(chunks.get('replans_per_s'), '.1f', '/s')}), "
                     f"step {chunks.get('step', '-')}, entered at {chunks.get('entry_index', '-')} after "
                     f"{num(chunks.get('entry_delay_s'), '.3f', ' s')}, queue {chunks.get('queue_depth', '-')}, "
                     f"empty stops {chunks.get('empty_stops', '-')}, late {chunks.get('late_chunks', '-')}")
    counters = section("counters")
    if counters:
        lines.append("counters     " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    return "\n".join(lines)
