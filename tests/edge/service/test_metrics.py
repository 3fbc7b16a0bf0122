"""Prometheus metrics: a real control loop (reference bundle on ONNX Runtime, the simulated controller on a
pty, its MJPEG camera through OpenCV) scraped over HTTP on 127.0.0.1, the exposition text parsed back."""

from __future__ import annotations

import math
import socket
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.control.loop import ControlLoop, Mode
from edge.control.safety import SafetyConfig, SafetyLayer
from edge.control.uncertainty_gate import GateConfig, UncertaintyGate
from edge.errors import ConfigError
from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline
from edge.io.camera import Camera, CameraConfig
from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
from edge.service.config import config_from_dict
from edge.service.metrics import LoopCollector, MetricsServer, load_prometheus_client
from simulator.controller import SimulatedController

PERIOD_S = 0.1


@pytest.fixture(scope="module")
def rig(reference_bundle):
    bundle = Bundle.load(reference_bundle[0])
    controller = SimulatedController(seed=4242).start()
    camera = Camera(CameraConfig(source=controller.camera_url, open_timeout_s=20.0))
    link = SerialMotorLink(MotorLinkConfig(port=controller.link_path))
    pipeline = PolicyPipeline(bundle, target="cpu", mc_samples=8)
    try:
        pipeline.activate()
        camera.connect()
        link.connect()
        safety = SafetyLayer(SafetyConfig(action_low=(-1.0, -1.0), action_high=(1.0, 1.0),
                                          max_slew_per_s=(4.0, 4.0), decel_per_s=(2.0, 2.0), period_s=PERIOD_S))
        gate = UncertaintyGate(GateConfig(threshold=5.0, hard_ceiling=10.0))  # calm: this is not about gating
        loop = ControlLoop(pipeline, camera, link, safety, gate, PERIOD_S, stale_after_s=3 * PERIOD_S)
        loop.set_instruction(controller.ground_truth().instruction)
        collector = LoopCollector(loop, labels={"target": "cpu", "backend": "onnxruntime"})
        yield loop, camera, link, collector
    finally:
        link.disconnect()
        camera.disconnect()
        pipeline.close()
        controller.stop()


class RunningLoop:
    def __init__(self, loop):
        self.loop = loop
        self.stop = threading.Event()
        self.thread = threading.Thread(target=loop.run, args=(self.stop,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def wait_ticks(self, ticks: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s  # a hang guard, not a measurement
        while self.loop.counters["ticks"] < ticks:
            assert time.monotonic() < deadline, f"loop made {self.loop.counters['ticks']} ticks, not {ticks}"
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10.0)
        assert not self.thread.is_alive()


def scrape(url: str) -> dict[str, dict]:
    """{family name: {"type": ..., "samples": {(sample name, sorted labels): value}}}."""
    with urllib.request.urlopen(url, timeout=10.0) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {"type": family.type, "samples": {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}}
    return families


def value(families, family, sample=None, **labels):
    samples = families[family]["samples"]
    return samples[(sample or family, tuple(sorted(labels.items())))]


def test_scrape_reports_the_loops_own_state(rig):
    loop, camera, link, collector = rig
    with RunningLoop(loop) as running:
        running.wait_ticks(12)
    with MetricsServer(collector, port=0) as server:
        assert server.url.startswith("http://127.0.0.1:")
        metrics = scrape(server.url)

    counters = loop.counters
    assert metrics["vla_edge_ticks"]["type"] == "counter"
    assert value(metrics, "vla_edge_ticks", "vla_edge_ticks_total") == counters["ticks"] >= 12
    modes = {m.name.lower(): value(metrics, "vla_edge_mode_ticks", "vla_edge_mode_ticks_total", mode=m.name.lower())
             for m in Mode}
    assert modes == {name: counters[name] for name in modes}
    assert sum(modes.values()) == counters["ticks"]
    assert value(metrics, "vla_edge_overruns", "vla_edge_overruns_total") == loop.keeper.overruns
    assert value(metrics, "vla_edge_missed_deadlines", "vla_edge_missed_deadlines_total") == loop.keeper.missed_deadlines
    assert value(metrics, "vla_edge_period_seconds") == pytest.approx(PERIOD_S)

    last = loop.recorder.latest(1)[0]
    current = {m.name.lower(): value(metrics, "vla_edge_mode", mode=m.name.lower()) for m in Mode}
    assert current[Mode(int(last["mode"])).name.lower()] == 1.0 and sum(current.values()) == 1.0
    score = value(metrics, "vla_edge_uncertainty_score")
    assert (math.isnan(score) and math.isnan(last["score"])) or score == pytest.approx(float(last["score"]))
    assert value(metrics, "vla_edge_uncertainty_threshold") == 5.0

    window = value(metrics, "vla_edge_latency_window_ticks")
    assert window == counters["ticks"]  # the loop has stopped: every recorded tick is complete
    tick_q = [value(metrics, "vla_edge_tick_latency_seconds", stage="tick", quantile=q) for q in ("0.5", "0.9", "0.99", "1")]
    assert 0 < tick_q[0] <= tick_q[1] <= tick_q[2] <= tick_q[3]
    assert tick_q[3] == pytest.approx(float(loop.recorder.latest()["tick_ms"].max()) / 1e3, rel=1e-5)
    if counters["nominal"] + counters["fallback"]:  # the policy ran: its stages were timed
        assert value(metrics, "vla_edge_tick_latency_seconds", stage="policy", quantile="1") > 0

    stats = link.stats
    assert value(metrics, "vla_edge_link_connected") == 1.0
    assert value(metrics, "vla_edge_link_commands_sent", "vla_edge_link_commands_sent_total") == stats.commands_sent
    assert value(metrics, "vla_edge_link_telemetry_frames", "vla_edge_link_telemetry_frames_total") > 0
    assert value(metrics, "vla_edge_link_crc_errors", "vla_edge_link_crc_errors_total") == stats.crc_errors
    assert 0 <= value(metrics, "vla_edge_link_telemetry_age_seconds") < 60
    assert value(metrics, "vla_edge_camera_connected") == 1.0
    assert value(metrics, "vla_edge_camera_frames", "vla_edge_camera_frames_total") > 0
    assert 0 <= value(metrics, "vla_edge_camera_frame_age_seconds") < 60
    assert value(metrics, "vla_edge_camera_reconnects", "vla_edge_camera_reconnects_total") == camera.reconnects
    assert value(metrics, "vla_edge_policy_info", target="cpu", backend="onnxruntime") == 1.0
    # What the controller reports (issue 13, finding 18): its own counters and the loop's reactions.
    for name, count in loop.watch.counters.items():
        assert value(metrics, f"vla_edge_controller_{name}") == count
    for name in ("controller_faults", "watchdog_trips", "telemetry_rejected", "estop_resends"):
        assert value(metrics, f"vla_edge_{name}", f"vla_edge_{name}_total") == counters[name]


def test_scraping_a_running_loop_sees_counters_grow_and_the_tick_does_no_metrics_work(rig):
    loop, _, _, collector = rig
    before = collector.scrapes
    with RunningLoop(loop) as running, MetricsServer(collector, port=0) as server:
        running.wait_ticks(loop.counters["ticks"] + 5)
        assert collector.scrapes == before, "nothing but a scrape may run the collector"
        first = value(scrape(server.url), "vla_edge_ticks", "vla_edge_ticks_total")
        running.wait_ticks(int(first) + 3)
        second = value(scrape(server.url), "vla_edge_ticks", "vla_edge_ticks_total")
        assert second >= first + 3
        assert collector.scrapes == before + 2


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_server_listens_on_loopback_only_and_frees_its_port(rig):
    collector = rig[3]
    server = MetricsServer(collector, port=0)
    server.start()
    try:
        port = server.port
        assert server.address == ("127.0.0.1", port)
        other = _non_loopback_address()
        if other is not None:
            with socket.socket() as client, pytest.raises(ConnectionRefusedError):
                client.settimeout(5.0)
                client.connect((other, port))
    finally:
        server.stop()
    assert not server.is_running
    with socket.socket() as again:  # stop() closed the listening socket
        again.bind(("127.0.0.1", port))


def test_port_in_use_and_other_hosts_are_refused():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics.port {port}"):
            MetricsServer(LoopCollector(None), port=port).start()
    with pytest.raises(ConfigError, match="127.0.0.1"):
        MetricsServer(LoopCollector(None), port=0, host="0.0.0.0")


@pytest.mark.parametrize(("section", "message"), [
    ({"host": "0.0.0.0"}, "metrics.host must be 127.0.0.1"),
    ({"host": "localhost"}, "metrics.host must be 127.0.0.1"),
    ({"port": 70000}, r"metrics.port must be an integer in \[0, 65535\]"),
    ({"port": "9310"}, "metrics.port"),
    ({"enabled": "yes"}, "metrics.enabled must be true or false"),
    ({"path": "/metrics"}, "unknown key.*metrics.path"),
])
def test_metrics_section_is_validated(section, message):
    raw = {"bundle": "b", "camera": {"source": 0}, "motor": {"port": "loop://"}, "metrics": section}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_metrics_section_defaults():
    config = config_from_dict({"bundle": "b", "camera": {"source": 0}, "motor": {"port": "loop://"}})
    assert (config.metrics.enabled, config.metrics.port, config.metrics.host) == (False, 9310, "127.0.0.1")


def test_missing_prometheus_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes `import prometheus_client` fail
    with pytest.raises(ConfigError, match=r"vla-edge\[metrics\]"):
        load_prometheus_client()
