"""The instruction/status socket: a real server on a real UNIX socket, a recording handler as collaborator."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import grp
import json
import os
import socket
import stat
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.cli.control import add_control_commands, format_status
from edge.control.loop import Mode, TickRecorder
from edge.control.status import CameraHealth, LastTick, LinkHealth, LoopStatus, Timing, Window
from edge.errors import ConfigError, EdgeError, InputError
from edge.io.motor_link import LinkStats
from edge.service.control_protocol import MAX_TEXT_CHARS, default_socket_path, send_request
from edge.service.control_socket import ControlSocketServer
from edge.service.loop_control import LoopControl
from tests.waiting import HANG_GUARD_S


def strict_json(line: bytes):
    """json.loads that refuses NaN/Infinity, as jq and most non-Python clients do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


class RecordingHandler:
    """The server's collaborator: records every call; status returns a LoopControl-shaped snapshot."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail_with: BaseException | None = None
        self.status_payload = {
            "mode": "nominal",
            "estop": False,
            "instruction": "go to the red block",
            "uncertainty": {"score": np.float32(0.0125), "threshold": 0.05, "hard_ceiling": 0.15},
            "tick": {"index": np.int64(41), "policy_ms": 12.34, "tick_ms": 14.5, "resize_ms": float("nan")},
            "overruns": 2,
            "link": {"connected": True, "telemetry_age_s": 0.04, "round_trip_ms": None,
                     "stats": {"bad_frames": 1, "crc_errors": 1, "framing_errors": 0, "reconnects": 3}},
            "camera": {"connected": True, "frame_age_s": float("inf"), "reconnects": 1},
            "counters": {"ticks": 42, "nominal": 40, "fallback": 2},
            "policy": {"action": np.array([0.1, -0.2], np.float32)},
        }

    def _record(self, *call):
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(call)

    def say(self, text):
        self._record("say", text)

    def stop(self):
        self._record("stop")

    def estop(self):
        self._record("estop")

    def clear(self):
        self._record("clear")

    def status(self):
        self._record("status")
        return self.status_payload


class LineClient:
    """A raw client that sends bytes and reads reply lines (with a hang guard)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(HANG_GUARD_S)
        self.sock.connect(str(path))
        self._buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unterminated data {bytes(self._buffer[:80])!r}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line

    def reply(self) -> dict:
        return strict_json(self.read_line())

    def request(self, data: bytes) -> dict:
        self.send(data)
        return self.reply()

    def read_eof(self) -> bytes:
        """Everything until the server closes the connection."""
        data = bytearray(self._buffer)
        while chunk := self.sock.recv(65536):
            data += chunk
        self._buffer.clear()
        return bytes(data)

    def close(self):
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path_factory):
    # tmp_path_factory's short directory names keep the path under the 107-byte AF_UNIX limit whatever
    # the test is called; a long --basetemp falls back to a directory directly under the system's tmp.
    path = tmp_path_factory.mktemp("cs") / "control.sock"
    if len(os.fsencode(path)) <= 100:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vla-cs-") as short:
        yield Path(short) / "control.sock"


@pytest.fixture
def handler():
    return RecordingHandler()


@pytest.fixture
def server(sock_path, handler):
    srv = ControlSocketServer(sock_path, handler)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    c = LineClient(server.path)
    yield c
    c.close()


def wait_for(predicate, what: str):
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# --- commands ------------------------------------------------------------------------------------------

def test_say_sets_the_instruction_stripped(server, handler):
    reply = send_request(server.path, {"cmd": "say", "text": "  go to the red block \n"})
    assert reply == {"ok": True, "instruction": "go to the red block"}
    assert handler.calls == [("say", "go to the red block")]


@pytest.mark.parametrize(("cmd", "expected"), [
    ("stop", {"ok": True, "instruction": None}),
    ("estop", {"ok": True, "estop": True}),
    ("clear", {"ok": True, "estop": False}),
])
def test_stop_estop_clear_reach_the_handler(server, handler, cmd, expected):
    assert send_request(server.path, {"cmd": cmd}) == expected
    assert handler.calls == [(cmd,)]


def test_status_is_strict_json_with_non_finite_values_as_null(client, handler):
    client.send(b'{"cmd": "status"}\n')
    reply = strict_json(client.read_line())  # raises on NaN/Infinity
    assert handler.calls == [("status",)]
    assert reply["ok"] is True
    assert reply["mode"] == "nominal" and reply["instruction"] == "go to the red block"
    assert reply["uncertainty"]["score"] == pytest.approx(0.0125)
    assert reply["tick"] == {"index": 41, "policy_ms": 12.34, "tick_ms": 14.5, "resize_ms": None}
    assert reply["camera"]["frame_age_s"] is None
    assert reply["policy"]["action"] == pytest.approx([0.1, -0.2])
    assert reply["counters"] == {"ticks": 42, "nominal": 40, "fallback": 2}


def test_status_cannot_override_ok(server, handler):
    handler.status_payload = {"ok": False, "mode": "hold"}
    assert send_request(server.path, {"cmd": "status"}) == {"ok": True, "mode": "hold"}


def test_request_id_is_echoed_on_success_and_on_refusal(client):
    assert client.request(b'{"cmd": "stop", "id": 7}\n') == {"ok": True, "instruction": None, "id": 7}
    refused = client.request(b'{"cmd": "fly", "id": "abc"}\n')
    assert refused["ok"] is False and refused["id"] == "abc"


def test_replies_come_in_request_order_on_one_connection(client, handler):
    client.send(b'{"cmd":"say","text":"a"}\n{"cmd":"estop"}\n{"cmd":"bogus"}\n{"cmd":"clear"}\n{"cmd":"stop"}\n')
    replies = [client.reply() for _ in range(5)]
    assert [r["ok"] for r in replies] == [True, True, False, True, True]
    assert replies[0]["instruction"] == "a" and replies[1]["estop"] is True and replies[3]["estop"] is False
    assert handler.calls == [("say", "a"), ("estop",), ("clear",), ("stop",)]


def test_crlf_line_endings_are_accepted(client, handler):
    assert client.request(b'{"cmd": "estop"}\r\n') == {"ok": True, "estop": True}
    assert handler.calls == [("estop",)]


# --- refusals ------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    (b"{not json\n", "malformed JSON"),
    (b'{"cmd": "say", "text": "caf\xe9"}\n', "not valid UTF-8"),
    (b"\xff\xfe\x00\n", "not valid UTF-8"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'"status"\n', "must be a JSON object"),
    (b"\n", "empty request"),
    (b'{"text": "hi"}\n', "no 'cmd'"),
    (b'{"cmd": 3}\n', "cmd must be a string"),
    (b'{"cmd": ["status"]}\n', "cmd must be a string"),
    (b'{"cmd": "launch"}\n', "unknown cmd 'launch'"),
    (b'{"cmd": "say"}\n', "say needs 'text'"),
    (b'{"cmd": "say", "text": 42}\n', "say needs 'text', a string; got int"),
    (b'{"cmd": "say", "text": null}\n', "say needs 'text'"),
    (b'{"cmd": "say", "text": "   "}\n', "non-empty text"),
    (b'{"cmd": "stop", "text": "x"}\n', "unknown field(s) for 'stop': text"),
    (b'{"cmd": "status", "id": true}\n', "id must be"),
    (b'{"cmd": "status", "id": [1]}\n', "id must be"),
    (b"[" * 3000 + b"\n", "malformed JSON"),
]


@pytest.mark.parametrize(("line", "fragment"), BAD_REQUESTS, ids=[repr(b[:24]) for b, _ in BAD_REQUESTS])
def test_bad_requests_get_an_error_and_the_connection_stays_usable(server, client, handler, line, fragment):
    reply = client.request(line)
    assert reply["ok"] is False
    assert fragment in reply["error"]
    assert handler.calls == []
    assert client.request(b'{"cmd": "estop"}\n') == {"ok": True, "estop": True}
    assert handler.calls == [("estop",)]
    assert server.stats["bad_requests"] == 1
    assert server.stats["internal_errors"] == 0


def test_text_length_limit_is_512_characters(client, handler):
    at_limit = "é" * MAX_TEXT_CHARS  # characters, not bytes: 1024 bytes of UTF-8
    assert client.request(json.dumps({"cmd": "say", "text": at_limit}).encode() + b"\n")["ok"] is True
    over = client.request(json.dumps({"cmd": "say", "text": "a" * (MAX_TEXT_CHARS + 1)}).encode() + b"\n")
    assert over["ok"] is False and "513 characters; at most 512" in over["error"]
    assert handler.calls == [("say", at_limit)]


def test_oversized_line_gets_one_error_and_its_rest_is_dropped(sock_path, handler):
    with ControlSocketServer(sock_path, handler, max_line_bytes=100) as srv:
        c = LineClient(sock_path)
        # A line hidden in the oversized one must not be executed.
        c.send(b'{"cmd": "say", "text": "' + b"x" * 200 + b'"} {"cmd": "estop"}\n{"cmd": "clear"}\n')
        first = c.reply()
        assert first["ok"] is False and "longer than 100 bytes" in first["error"]
        assert c.reply() == {"ok": True, "estop": False}
        exactly = b'{"cmd": "stop"}'.ljust(100) + b"\n"  # JSON allows trailing spaces
        assert c.request(exactly) == {"ok": True, "instruction": None}
        assert handler.calls == [("clear",), ("stop",)]
        assert srv.stats["oversized_lines"] == 1
        c.close()


def test_oversized_line_is_refused_before_its_newline_arrives(sock_path, handler):
    with ControlSocketServer(sock_path, handler, max_line_bytes=100) as srv:
        c = LineClient(sock_path)
        c.send(b"y" * 150)  # no newline yet: the client still hears why it will not be served
        reply = c.reply()
        assert reply["ok"] is False and "longer than 100 bytes" in reply["error"]
        for _ in range(20):  # a long tail of the same line, in many pieces: no more replies for it
            c.send(b"z" * 500)
        c.send(b'tail"}\n{"cmd": "estop"}\n')
        assert c.reply() == {"ok": True, "estop": True}
        assert handler.calls == [("estop",)]
        assert srv.stats["oversized_lines"] == 1
        c.close()


def test_handler_edge_error_is_the_reply(server, client, handler):
    handler.fail_with = InputError("instruction has 40 tokens; the policy takes at most 32")
    reply = client.request(b'{"cmd": "say", "text": "a very long instruction"}\n')
    assert reply == {"ok": False, "error": "instruction has 40 tokens; the policy takes at most 32"}
    assert server.stats["handler_errors"] == 1


def test_handler_bug_is_logged_counted_and_answered(server, client, handler, caplog):
    handler.fail_with = ZeroDivisionError("boom")
    reply = client.request(b'{"cmd": "status"}\n')
    assert reply["ok"] is False and "internal error" in reply["error"] and "ZeroDivisionError" in reply["error"]
    assert "handler failed" in caplog.text
    handler.fail_with = None
    assert client.request(b'{"cmd": "stop"}\n')["ok"] is True
    assert server.stats["handler_errors"] == 1 and server.is_running


def test_unserialisable_status_is_an_internal_error_not_a_dead_connection(server, client, handler):
    handler.status_payload = {"mode": object()}
    reply = client.request(b'{"cmd": "status"}\n')
    assert reply["ok"] is False and "internal error" in reply["error"]
    assert client.request(b'{"cmd": "estop"}\n')["ok"] is True


# --- slow, silent and greedy clients -------------------------------------------------------------------

def test_silent_and_flooding_clients_do_not_block_others(server, handler):
    handler.status_payload = {"mode": "nominal", "padding": "p" * 1500}
    silent = LineClient(server.path)
    silent.send(b'{"cmd": "sa')  # half a request, then nothing

    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    flood.connect(str(server.path))
    flood.setblocking(False)
    line = b'{"cmd":"status"}\n'
    chunk = line * 512
    sent = 0
    blocked = False
    # Never reads a reply: the server must stop reading from it (backpressure) instead of queueing
    # replies without bound, so this client's sends block long before 1 MB (about 20 kB here).
    while sent < 1_000_000:
        try:
            sent += flood.send(chunk[sent % len(chunk):])
        except BlockingIOError:
            # The server may still be reading; only a send that stays blocked counts.
            time.sleep(0.2)
            try:
                sent += flood.send(chunk[sent % len(chunk):])
            except BlockingIOError:
                blocked = True
                break
    assert blocked, "the server kept reading from a client that never reads its replies"

    other = LineClient(server.path)
    for _ in range(3):
        assert other.request(b'{"cmd": "estop"}\n') == {"ok": True, "estop": True}
    assert ("estop",) in handler.calls

    # The flooding client finally reads: one valid reply per complete line it sent, none lost.
    flood.setblocking(True)
    flood.settimeout(HANG_GUARD_S)
    flood.shutdown(socket.SHUT_WR)
    data = bytearray()
    while chunk_in := flood.recv(1 << 20):
        data += chunk_in
    replies = data.split(b"\n")
    assert replies[-1] == b""
    complete_lines = sent // len(line)
    assert len(replies) - 1 == complete_lines
    assert all(strict_json(r)["ok"] for r in replies[:-1])
    flood.close()

    # The silent client is still connected and is served once it finishes its line.
    assert silent.request(b'y", "text": "late"}\n') == {"ok": True, "instruction": "late"}
    silent.close()
    other.close()
    assert server.stats["internal_errors"] == 0


def test_half_closed_client_still_gets_its_replies(server, handler):
    c = LineClient(server.path)
    c.send(b'{"cmd": "say", "text": "one"}\n{"cmd": "status"}\n{"cmd": "stop"')  # last line incomplete
    c.sock.shutdown(socket.SHUT_WR)
    lines = c.read_eof().split(b"\n")
    assert [strict_json(x)["ok"] for x in lines[:-1]] == [True, True]
    assert lines[-1] == b""
    assert handler.calls == [("say", "one"), ("status",)]
    c.close()


def test_idle_client_is_closed(sock_path, handler):
    with ControlSocketServer(sock_path, handler, idle_timeout_s=0.2) as srv:
        idle = LineClient(sock_path)
        assert idle.read_eof() == b""  # the server hangs up on it
        assert srv.stats["idle_closed"] == 1
        assert send_request(sock_path, {"cmd": "stop"})["ok"] is True
        idle.close()


def test_clients_beyond_max_clients_are_refused_with_a_reply(sock_path, handler):
    with ControlSocketServer(sock_path, handler, max_clients=2) as srv:
        first, second = LineClient(sock_path), LineClient(sock_path)
        assert first.request(b'{"cmd": "stop"}\n')["ok"] and second.request(b'{"cmd": "stop"}\n')["ok"]
        third = LineClient(sock_path)
        refused = strict_json(third.read_eof().strip())
        assert refused["ok"] is False and "too many clients" in refused["error"]
        third.close()
        first.close()
        wait_for(lambda: srv.stats["clients"] < 2, "the server to notice the closed client")
        assert send_request(sock_path, {"cmd": "estop"}) == {"ok": True, "estop": True}
        assert srv.stats["refused_connections"] == 1
        second.close()


# --- the socket file -----------------------------------------------------------------------------------

@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o660, 0o600])
def test_socket_file_gets_its_mode_despite_the_umask(sock_path, handler, mode):
    with umask(0o077):  # stricter than the unit's UMask=0027
        srv = ControlSocketServer(sock_path, handler, mode=mode)
        srv.start()
    try:
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == mode
    finally:
        srv.stop()


def test_socket_group_is_set_when_permitted(sock_path, handler):
    own_group = grp.getgrgid(os.getgid()).gr_name
    with ControlSocketServer(sock_path, handler, group=own_group):
        assert os.stat(sock_path).st_gid == os.getgid()


def test_unknown_group_is_a_config_error_and_leaves_no_socket(sock_path, handler):
    srv = ControlSocketServer(sock_path, handler, group="vla-edge-no-such-group")
    with pytest.raises(ConfigError, match="group 'vla-edge-no-such-group' does not exist"):
        srv.start()
    assert not sock_path.exists()
    assert not srv.is_running


def test_stale_socket_file_is_replaced(sock_path, handler):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # a crashed server leaves its socket file behind
    # A second name keeps the stale inode alive, so the filesystem cannot hand the same number out again.
    os.link(sock_path, sock_path.with_name("stale.sock"))
    stale_inode = os.stat(sock_path).st_ino
    with ControlSocketServer(sock_path, handler):
        assert os.stat(sock_path).st_ino != stale_inode
        assert send_request(sock_path, {"cmd": "stop"})["ok"] is True


def test_a_file_that_is_not_a_socket_is_left_alone(sock_path, handler):
    sock_path.write_text("operator notes")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlSocketServer(sock_path, handler).start()
    assert sock_path.read_text() == "operator notes"


def test_a_live_socket_of_another_server_is_not_taken_over(sock_path, handler):
    other_handler = RecordingHandler()
    with ControlSocketServer(sock_path, other_handler):
        with pytest.raises(EdgeError, match="in use by another process"):
            ControlSocketServer(sock_path, handler).start()
        assert send_request(sock_path, {"cmd": "estop"})["ok"] is True
    assert other_handler.calls == [("estop",)] and handler.calls == []


def test_stop_removes_the_socket_and_is_idempotent(sock_path, handler):
    srv = ControlSocketServer(sock_path, handler)
    srv.start()
    c = LineClient(sock_path)
    assert srv.is_running
    srv.stop()
    srv.stop()
    assert not srv.is_running
    assert not sock_path.exists()
    assert c.read_eof() == b""  # open connections are closed
    c.close()
    with pytest.raises(EdgeError, match="no control socket"):
        send_request(sock_path, {"cmd": "status"})


def test_stop_does_not_remove_a_socket_that_is_no_longer_ours(sock_path, handler):
    srv = ControlSocketServer(sock_path, handler)
    srv.start()
    sock_path.unlink()
    newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newcomer.bind(str(sock_path))
    try:
        srv.stop()
        assert sock_path.exists()
    finally:
        newcomer.close()


def test_bad_paths_are_config_errors(sock_path, handler):
    short = sock_path.parent
    with pytest.raises(ConfigError, match="does not exist"):
        ControlSocketServer(short / "missing" / "control.sock", handler).start()
    with pytest.raises(ConfigError, match="limited to 107 bytes"):
        ControlSocketServer(short / ("x" * 120), handler).start()
    with pytest.raises(ConfigError, match="max_line_bytes"):
        ControlSocketServer(short / "c.sock", handler, max_line_bytes=10)


# --- fuzz ------------------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_requests = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["say", "stop", "estop", "clear", "status", "", "SAY"]) | _json_values},
    optional={"text": _json_values | st.text(max_size=600), "id": _json_values},
).map(lambda d: json.dumps(d).encode())
_lines = st.one_of(
    st.binary(max_size=300),
    _requests,
    _requests.map(lambda b: b[: len(b) // 2]),  # truncated JSON
    st.binary(min_size=300, max_size=700),  # over the fuzz server's 256-byte limit
).map(lambda b: b.replace(b"\n", b""))


def test_fuzzed_lines_always_get_one_valid_reply_each(sock_path):
    handler = RecordingHandler()
    with ControlSocketServer(sock_path, handler, max_line_bytes=256) as srv:

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(lines=st.lists(_lines, max_size=8), cuts=st.lists(st.integers(0, 4000), max_size=6))
        def check(lines, cuts):
            c = LineClient(sock_path)
            try:
                stream = b"".join(line + b"\n" for line in lines)
                points = sorted({0, len(stream), *(x for x in cuts if x < len(stream))})
                for a, b in zip(points, points[1:]):  # arbitrary split points exercise partial reads
                    c.send(stream[a:b])
                for _ in lines:
                    reply = c.reply()
                    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
                    if not reply["ok"]:
                        assert isinstance(reply["error"], str) and reply["error"]
                assert c.request(b'{"cmd": "status"}\n')["ok"] is True  # still usable afterwards
            finally:
                c.close()

        check()
        assert srv.is_running
        assert srv.stats["internal_errors"] == 0


# --- the adapter -----------------------------------------------------------------------------------------

def test_loop_control_reports_the_last_completed_tick_not_the_one_in_progress():
    recorder = TickRecorder(16, action_dim=2)
    for i in range(3):
        row = recorder.next()
        row["tick"], row["mode"], row["policy_ms"], row["tick_ms"], row["score"] = i, Mode.NOMINAL, 10 + i, 20 + i, 0.01
    counters = {"ticks": 3, "nominal": 3}
    in_progress = recorder.next()  # the loop has started tick 3 and filled only part of it
    in_progress["tick"] = 3
    in_progress["mode"] = Mode.FALLBACK
    # What the loop published at the end of tick 2, the last completed one.
    completed = recorder.latest(2)[0]
    link = SimpleNamespace(stats=LinkStats(crc_errors=2, reconnects=1), is_connected=True,
                           telemetry_age_s=lambda: 0.05, last_round_trip_s=0.004)
    camera = SimpleNamespace(is_connected=True, frame_age_s=lambda: 0.03, reconnects=4)
    snapshot = LoopStatus(mode="nominal", estop=False, instruction="pick up the cup",
                          tick=LastTick.from_record(completed, "nominal", None, None), counters=counters,
                          threshold=0.05, hard_ceiling=0.2, timing=Timing(period_s=0.1, overruns=1), window=Window(),
                          link=LinkHealth.of(link), camera=CameraHealth.of(camera))
    calls = []
    loop = SimpleNamespace(
        status=lambda: snapshot,
        set_instruction=lambda text: calls.append(("set_instruction", text)),
        emergency_stop=lambda: calls.append(("emergency_stop",)),
        clear_emergency_stop=lambda: calls.append(("clear_emergency_stop",)),
    )
    control = LoopControl(loop)
    status = control.status()
    assert status["mode"] == "nominal"
    assert status["tick"]["index"] == 2 and status["tick"]["policy_ms"] == pytest.approx(12)
    assert status["uncertainty"] == pytest.approx({"score": 0.01, "threshold": 0.05, "hard_ceiling": 0.2})
    assert status["link"]["stats"]["crc_errors"] == 2 and status["link"]["stats"]["bad_frames"] == 2
    assert status["link"]["round_trip_ms"] == pytest.approx(4.0)
    assert status["camera"] == {"connected": True, "frame_age_s": 0.03, "reconnects": 4}
    assert status["instruction"] == "pick up the cup" and status["overruns"] == 1
    snapshot = dataclasses.replace(snapshot, mode="estop", estop=True)
    assert control.status()["mode"] == "estop"
    control.say("go")
    control.stop()
    control.estop()
    control.clear()
    assert calls == [("set_instruction", "go"), ("set_instruction", None), ("emergency_stop",),
                     ("clear_emergency_stop",)]


# --- command line ----------------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="vla-edge")
    add_control_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_say_joins_words_into_one_instruction(server, handler, capsys):
    args = parse(["say", "go", "to", "the", "red", "block", "--socket", str(server.path)])
    assert args.handler(args) == 0
    assert handler.calls == [("say", "go to the red block")]
    assert "instruction set: 'go to the red block'" in capsys.readouterr().out


@pytest.mark.parametrize(("cmd", "printed"), [("stop", "holding"), ("estop", "emergency stop latched"),
                                              ("clear", "emergency stop released")])
def test_cli_stop_estop_clear(server, handler, capsys, cmd, printed):
    args = parse([cmd, "--socket", str(server.path)])
    assert args.handler(args) == 0
    assert handler.calls == [(cmd,)]
    assert printed in capsys.readouterr().out


def test_cli_status_prints_a_readable_block(server, capsys):
    args = parse(["status", "--socket", str(server.path)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "mode         nominal" in out
    assert "instruction  'go to the red block'" in out
    assert "score 0.0125 (threshold 0.0500" in out
    assert "policy 12.3 ms, tick 14.5 ms, overruns 2" in out
    assert "motor link   connected, telemetry age 0.04 s" in out
    assert "crc errors 1" in out and "reconnects 3" in out
    assert "camera       connected, frame age -, reconnects 1" in out  # inf arrives as null
    assert "ticks 42, nominal 40, fallback 2" in out


def test_cli_status_json_prints_the_raw_reply(server, capsys):
    args = parse(["status", "--json", "--socket", str(server.path)])
    assert args.handler(args) == 0
    printed = strict_json(capsys.readouterr().out.encode())
    assert printed == send_request(server.path, {"cmd": "status"})


def test_cli_reports_a_refusal_with_exit_status_1(server, handler, capsys):
    handler.fail_with = InputError("no policy loaded")
    args = parse(["estop", "--socket", str(server.path)])
    assert args.handler(args) == 1
    assert "refused: no policy loaded" in capsys.readouterr().out


def test_cli_socket_defaults_to_the_runtime_directory(server, handler, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(server.path.parent))
    args = parse(["estop"])
    assert args.socket is None
    assert args.handler(args) == 0
    assert handler.calls == [("estop",)]


def test_default_socket_path():
    assert default_socket_path({}) == "/run/vla-edge/control.sock"
    assert default_socket_path({"RUNTIME_DIRECTORY": "/run/a:/run/b"}) == "/run/a/control.sock"


def test_cli_without_a_service_says_what_to_check(sock_path):
    args = parse(["status", "--socket", str(sock_path)])
    with pytest.raises(EdgeError, match=r"no control socket at .*systemctl status vla-edge"):
        args.handler(args)


def test_format_status_copes_with_a_sparse_reply():
    text = format_status({"ok": True, "mode": "hold"})
    assert "mode         hold" in text and "instruction  (none: holding)" in text
    assert "E-STOP" in format_status({"ok": True, "mode": "estop", "estop": True})


def test_resume_reaches_the_loop_control_and_cli_config_finds_the_socket(tmp_path):
    # Issue 13: `vla-edge resume` ends the hold after a clear; say/status take --config (finding 13).
    from edge.cli import build_parser
    from edge.cli.control import _socket_of

    calls = []
    control = LoopControl(SimpleNamespace(resume=lambda: calls.append("resume")))
    control.resume()
    assert calls == ["resume"]
    config = tmp_path / "robot.yaml"
    config.write_text("bundle: b\ncamera: {source: 0}\nmotor: {port: /p}\n"
                      "instruction: {socket: /run/robot-7/control.sock}\n")
    for argv in (["status", "--config", str(config)], ["say", "hello", "--config", str(config)],
                 ["resume", "--config", str(config)]):
        assert _socket_of(build_parser().parse_args(argv)) == "/run/robot-7/control.sock"
    config.write_text("bundle: b\ncamera: {source: 0}\nmotor: {port: /p}\n")
    with pytest.raises(ConfigError, match="sets no instruction.socket"):
        _socket_of(build_parser().parse_args(["status", "--config", str(config)]))


def test_status_names_the_safety_reasons_the_hold_and_the_controller_counters():
    # Issue 13: logs and status showed an opaque `reasons 32`; the controller's counters were invisible.
    from edge.control.safety import SafetyReason, reason_names

    assert reason_names(int(SafetyReason.STALE_FRAME | SafetyReason.FALLBACK)) == ["STALE_FRAME", "FALLBACK"]
    assert reason_names(0) == []
    text = format_status({
        "ok": True, "mode": "hold", "hold_reason": "controller fault: the controller reports FAULT",
        "tick": {"index": 3, "reason_names": ["FALLBACK"]},
        "controller": {"flags": ["FAULT"], "fault": "the controller reports FAULT", "estop_confirmed": None,
                       "counters": {"crc_errors": 2, "framing_errors": 5, "dropped_commands": 7}}})
    assert "holding      controller fault" in text
    assert "controller   FAULT, FAULT: the controller reports FAULT" in text
    assert "crc errors 2, framing errors 5, dropped commands 7" in text
    assert "safety       FALLBACK" in text
    assert "e-stop NOT confirmed" in format_status({"ok": True, "controller": {"flags": [], "estop_confirmed": False}})
