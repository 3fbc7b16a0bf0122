"""Optional Prometheus metrics of the robot service, on 127.0.0.1 only (config section `metrics:`).

Nothing here runs in the control tick. A custom collector reads the loop's published snapshot
(`ControlLoop.status()`: counters, rate keeper, last completed tick, stage-latency window, motor link
and camera health) when Prometheus scrapes, in the HTTP server's thread, so an unscraped robot pays
nothing and a scrape never touches the loop's internals.

Latency quantiles are gauges over the ticks the recorder holds (`loop.record_ticks`), refreshed by the
loop once a second (edge/control/status.py), not a Prometheus summary: the ring buffer forgets old
ticks, so a cumulative _sum/_count would be a lie.

`prometheus-client` is an optional dependency (`pip install 'vla-edge[metrics]'`), imported when the
metrics are enabled.
"""

from __future__ import annotations

import logging
import math
import socketserver
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from edge.control.status import CameraHealth, LinkHealth, Mode
from edge.errors import ConfigError
from edge.validation import check_bool, check_choice, check_range

logger = logging.getLogger(__name__)

METRICS_HOST = "127.0.0.1"
PREFIX = "vla_edge"
INSTALL_HINT = "pip install 'vla-edge[metrics]' (the prometheus-client package)"


def load_prometheus_client():
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError(f"metrics.enabled is true but prometheus-client is not installed: {INSTALL_HINT}, "
                          "or set metrics.enabled: false") from exc
    return prometheus_client


@dataclass(frozen=True)
class MetricsConfig:
    """The ``metrics:`` section of the robot config."""

    enabled: bool = False  # serve Prometheus metrics (needs the 'metrics' extra: prometheus-client)
    port: int = 9310  # TCP port on 127.0.0.1; 0 lets the kernel pick a free one (tests)
    # Fixed: the endpoint has no authentication, so it never listens beyond the robot itself. Scrape it
    # with an agent on the robot or through an SSH tunnel.
    host: str = METRICS_HOST

    def __post_init__(self) -> None:
        check_bool("metrics.enabled", self.enabled)
        check_range("metrics.port", self.port, 0, 65535, integer=True)
        check_choice("metrics.host", self.host, (METRICS_HOST,), quote=False,
                     hint="the metrics endpoint has no authentication and must not leave the robot; "
                          "scrape it locally or through an SSH tunnel")


class LoopCollector:
    """Reads the loop's published snapshot (`ControlLoop.status()`) at scrape time, in the HTTP server's
    thread; `labels` become an info metric."""

    def __init__(self, loop, *, labels: Mapping[str, str] | None = None):
        self.loop = loop
        self.labels = dict(labels or {})
        self.scrapes = 0

    def describe(self) -> list:
        # An empty description keeps the registry from calling collect() at registration time, before
        # the loop has run.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        self.scrapes += 1
        status = self.loop.status()
        counters = status.counters

        if self.labels:
            yield InfoMetricFamily(f"{PREFIX}_policy", "What the service runs", value=self.labels)

        yield _counter(CounterMetricFamily, "ticks", "Control ticks run", status.ticks)
        modes = CounterMetricFamily(f"{PREFIX}_mode_ticks", "Ticks per mode", labels=["mode"])
        for mode in Mode:
            modes.add_metric([mode.name.lower()], counters.get(mode.name.lower(), 0))
        yield modes
        yield _counter(CounterMetricFamily, "mode_transitions", "Mode changes", counters.get("transitions", 0))
        yield _counter(CounterMetricFamily, "inference_errors", "Ticks whose inference failed",
                       counters.get("inference_errors", 0))
        yield _counter(CounterMetricFamily, "undelivered_commands", "Ticks whose command did not reach the link",
                       counters.get("undelivered", 0))

        timing = status.timing
        yield _counter(CounterMetricFamily, "overruns", "Ticks that ran past their deadline", timing.overruns)
        yield _counter(CounterMetricFamily, "missed_deadlines", "Deadlines skipped after overruns",
                       timing.missed_deadlines)
        yield _gauge(GaugeMetricFamily, "max_lag_seconds", "Largest lag behind a deadline", timing.max_lag_s)
        yield _gauge(GaugeMetricFamily, "period_seconds", "Control period", timing.period_s)
        jitter = GaugeMetricFamily(f"{PREFIX}_tick_start_jitter_seconds",
                                   "Tick start offset from its deadline, over the keeper's window",
                                   labels=["quantile"])
        for percentile, value in timing.jitter_s.items():
            jitter.add_metric([_quantile_label(percentile / 100)], value)
        yield jitter

        tick = status.tick
        mode_now = GaugeMetricFamily(f"{PREFIX}_mode", "1 for the mode of the last completed tick",
                                     labels=["mode"])
        for mode in Mode:
            mode_now.add_metric([mode.name.lower()], 1.0 if tick is not None and mode.name.lower() == tick.mode
                                else 0.0)
        yield mode_now
        yield _gauge(GaugeMetricFamily, "uncertainty_score", "Uncertainty score of the last completed tick "
                     "(NaN when the policy did not run)", tick.score if tick is not None else math.nan)
        yield _gauge(GaugeMetricFamily, "uncertainty_threshold", "Score above which a tick is uncertain",
                     status.threshold)
        window = status.window
        yield _gauge(GaugeMetricFamily, "latency_window_ticks", "Completed ticks the latency quantiles cover",
                     window.ticks)
        latency = GaugeMetricFamily(f"{PREFIX}_tick_latency_seconds",
                                    "Stage latency over the recorded ticks (tick: frame ready to command "
                                    "handed to the link)", labels=["stage", "quantile"])
        for stage, quantiles in window.quantiles_ms.items():
            for q, value in quantiles.items():
                latency.add_metric([stage, _quantile_label(q)], value / 1e3)
        yield latency

        for name, what in (("controller_faults", "Times the controller reported FAULT or rejected commands"),
                           ("watchdog_trips", "Times the controller reported WATCHDOG_TRIPPED after accepting commands"),
                           ("telemetry_rejected", "Telemetry samples refused (out of bounds, wrong channel count)"),
                           ("estop_resends", "EmergencyStop frames repeated until the controller confirmed the latch")):
            yield _counter(CounterMetricFamily, name, what, counters.get(name, 0))
        if status.controller is not None:
            for name, value in status.controller.get("counters", {}).items():
                # The controller's own u16 counters (they wrap at 65536), as its last telemetry reported them.
                yield _gauge(GaugeMetricFamily, f"controller_{name}", f"Controller-reported {name.replace('_', ' ')}",
                             value)
        if status.link is not None:
            yield from _link_metrics(status.link, CounterMetricFamily, GaugeMetricFamily)
        if status.camera is not None:
            yield from _camera_metrics(status.camera, CounterMetricFamily, GaugeMetricFamily)
        stale = GaugeMetricFamily(f"{PREFIX}_camera_stale", "1 for a spec camera whose frame is missing or too "
                                  "old at the last tick", labels=["camera"])
        for name in status.cameras:
            stale.add_metric([name], float(name in status.stale_cameras))
        yield stale
        if status.chunks is not None:
            yield from _chunk_metrics(status.chunks, CounterMetricFamily, GaugeMetricFamily)
        if status.monitor is not None:
            yield from _monitor_metrics(status.monitor, CounterMetricFamily, GaugeMetricFamily)


def _monitor_metrics(monitor: Mapping[str, Any], counter, gauge) -> Iterator[Any]:
    """The failure monitor (edge/control/monitor.py): per signal its last score, threshold, alarm and trips."""
    rows = monitor.get("signals", {})
    families = {
        "score": gauge(f"{PREFIX}_monitor_score", "Last score of each failure-monitor signal", labels=["signal"]),
        "threshold": gauge(f"{PREFIX}_monitor_threshold", "Conformal threshold of each signal", labels=["signal"]),
        "on": gauge(f"{PREFIX}_monitor_alarm", "1 while the signal's windowed alarm is on", labels=["signal"]),
        "trips": counter(f"{PREFIX}_monitor_trips", "Times each signal's alarm came on", labels=["signal"]),
    }
    for name, row in rows.items():
        for key, family in families.items():
            if key in row:
                family.add_metric([name], float(row[key]))
    yield from families.values()


def _chunk_metrics(chunks, counter, gauge) -> Iterator[Any]:
    """A chunk policy's execution (edge/control/chunks.py, ChunkStats)."""
    yield _counter(counter, "chunk_replans", "Chunks accepted from the inference worker", chunks.replans)
    yield _gauge(gauge, "chunk_replans_per_second", "Chunks accepted per second", chunks.replans_per_s)
    yield _gauge(gauge, "chunk_entry_index", "Step the newest chunk was entered at (NaN before one)",
                 math.nan if chunks.entry_index is None else chunks.entry_index)
    yield _gauge(gauge, "chunk_entry_delay_seconds", "Capture-to-execution delay of the newest chunk",
                 math.nan if chunks.entry_delay_s is None else chunks.entry_delay_s)
    yield _gauge(gauge, "chunk_step", "Chunk step executed at the last tick (NaN: none, stopped)",
                 math.nan if chunks.step is None else chunks.step)
    entries = counter(f"{PREFIX}_chunk_entries", "Chunks entered per entry index", labels=["index"])
    for index, count in chunks.entries.items():
        entries.add_metric([str(index)], float(count))
    yield entries
    yield _counter(counter, "chunk_empty_stops", "Times the chunks ran out and the robot stopped", chunks.empty_stops)
    yield _counter(counter, "chunk_late", "Chunks spent before they arrived", chunks.late_chunks)
    yield _gauge(gauge, "chunk_queue_depth", "Inference requests waiting for the worker (0 or 1)", chunks.queue_depth)
    yield _counter(counter, "chunk_replaced_requests", "Requests replaced by a newer one before inference",
                   chunks.replaced_requests)


def _link_metrics(link: LinkHealth, counter, gauge) -> Iterator[Any]:
    yield _gauge(gauge, "link_connected", "1 while the motor link's port is open", float(link.connected))
    yield _gauge(gauge, "link_telemetry_age_seconds", "Age of the latest telemetry (+Inf before the first)",
                 link.telemetry_age_s)
    yield _gauge(gauge, "link_round_trip_seconds", "Last command -> telemetry echo round trip",
                 math.nan if link.round_trip_s is None else link.round_trip_s)
    for name, value in link.stats.items():
        if name != "bad_frames":  # the sum of the error counters, which are exported one by one
            yield _counter(counter, f"link_{name}", f"Motor link {name.replace('_', ' ')}", value)


def _camera_metrics(camera: CameraHealth, counter, gauge) -> Iterator[Any]:
    yield _gauge(gauge, "camera_connected", "1 between camera connect and disconnect", float(camera.connected))
    yield _gauge(gauge, "camera_streaming", "1 while the capture thread has a live stream", float(camera.streaming))
    yield _gauge(gauge, "camera_frame_age_seconds", "Age of the latest frame (+Inf before the first)",
                 camera.frame_age_s)
    yield _counter(counter, "camera_frames", "Frames captured", camera.frames)
    yield _counter(counter, "camera_reconnects", "Times the stream came back after a loss", camera.reconnects)
    yield _counter(counter, "camera_read_failures", "Reads that failed on an open stream", camera.read_failures)
    yield _counter(counter, "camera_open_failures", "Failed attempts to open the source", camera.open_failures)


def _counter(cls, name: str, documentation: str, value: float):
    return cls(f"{PREFIX}_{name}", documentation, value=float(value))


def _gauge(cls, name: str, documentation: str, value: float):
    return cls(f"{PREFIX}_{name}", documentation, value=float(value))


def _quantile_label(q: float) -> str:
    return f"{q:g}"


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper must not keep the process alive at exit

    def server_bind(self) -> None:
        # HTTPServer.server_bind() resolves the address with socket.getfqdn(): a reverse DNS lookup that
        # can stall start-up on a robot without DNS. The name only feeds WSGI's SERVER_NAME.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        # One line per scrape every few seconds would drown the journal.
        logger.debug("metrics %s: " + format, self.client_address[0], *args)


class MetricsServer:
    """HTTP endpoint for Prometheus on 127.0.0.1: ``start()``, ``url``, ``stop()``; a context manager."""

    def __init__(self, collector: LoopCollector, port: int = 9310, host: str = METRICS_HOST):
        if host != METRICS_HOST:
            raise ConfigError(f"metrics.host must be {METRICS_HOST}, got {host!r}")
        self.collector = collector
        self.host = host
        self.requested_port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        client = load_prometheus_client()
        registry = client.CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        app = client.make_wsgi_app(registry)
        try:
            self._server = make_server(self.host, self.requested_port, app, server_class=_ThreadingWSGIServer,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"metrics.port {self.requested_port}: cannot listen on {self.host}:"
                              f"{self.requested_port} ({exc}); is another process using it "
                              f"(`ss -ltnp 'sport = :{self.requested_port}'`)?") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        logger.info("Prometheus metrics on %s", self.url)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) of the listening socket; None when not started."""
        return None if self._server is None else tuple(self._server.socket.getsockname()[:2])

    @property
    def port(self) -> int:
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._server is None:
            return
        server, thread = self._server, self._thread
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("metrics server thread did not stop within %.1f s", timeout_s)

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
