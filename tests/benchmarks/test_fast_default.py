"""The benchmark's "fast by default" table (benchmarks/report.py, ratios.py) from a report of known numbers,
and its default-vs-best measurement on a tiny bundle (benchmarks/defaults.py)."""

from __future__ import annotations

import pytest

from benchmarks.defaults import default_vs_best
from benchmarks.ratios import compute_ratios
from benchmarks.report import format_fast_default
from benchmarks.settings import BenchSettings
from edge.inference.bundle import Bundle


def report_of(default_p99: float, best_p99: float) -> dict:
    return {
        "side_by_side": {"configs": {}},
        "default_vs_best": {
            "default": {"target": "cpu-fp32", "threads": 1, "line": "target cpu-fp32, threads 1 (measured)",
                        "p99_ms": default_p99},
            "best": {"label": "cpu-fp32/1 thread(s)", "p99_ms": best_p99}, "samples": 8, "isa": "AVX2 without VNNI",
            "default_over_best_p99": default_p99 / best_p99,
            "int8_over_fp32": {"cpu/cpu-fp32 vision threads=1": {"value": 1.6, "numerator_ms": 16.0,
                                                                 "denominator_ms": 10.0}}},
        "closed_loop": {"command_to_telemetry_ms": {"p50": 4.0, "p99": 9.0}, "frame_sync_window_s": 0.09,
                        "runs": {"unloaded": {"frame_age": {"n": 10, "p50": 3.0, "p99": 8.0},
                                              "glass_to_wire": {"n": 10, "p50": 21.0, "p99": 30.0}}}},
    }


def test_the_table_names_each_measure():
    report = report_of(10.5, 10.0)
    report["ratios"] = compute_ratios(report, BenchSettings(samples=(8,)))
    assert report["ratios"]["default / best measured p99"]["value"] == pytest.approx(1.05)
    table = format_fast_default(report)
    assert "| default (auto) / best measured, policy p99 | 1.05x |" in table
    assert "cpu/cpu-fp32 vision threads=1 p50 (AVX2 without VNNI) | 1.60x" in table
    assert "| frame age at tick start | p50 3.0 ms | p99 8.0 ms |" in table
    assert "| glass to wire (capture -> command written) | p50 21.0 ms | p99 30.0 ms |" in table
    assert "| command -> telemetry echoing it | p50 4.0 ms | p99 9.0 ms |" in table
    assert "| frame-synchronous ticks | on | window 90 ms |" in table


@pytest.fixture(scope="module")
def chunk_bundle(tmp_path_factory):
    from tests.edge.tiny_bundles import build_tiny_bundle

    return Bundle.load(build_tiny_bundle(tmp_path_factory.mktemp("tiny") / "chunk", "chunk"))


def test_default_vs_best_on_a_tiny_bundle(chunk_bundle, tmp_path):
    bundle = chunk_bundle
    found = default_vs_best(bundle, tmp_path, samples=4, budget_s=0.3)
    labels = set(found["candidates"])
    assert {f"{t}/1 thread(s)" for t in ("cpu", "cpu-qoperator", "cpu-reduce-range", "cpu-fp32")} <= labels
    assert found["default"]["target"] in ("cpu", "cpu-qoperator", "cpu-reduce-range", "cpu-fp32")
    assert any(name.startswith("cpu-reduce-range/cpu-fp32 vision") for name in found["int8_over_fp32"])
    assert found["default_over_best_p99"] >= 1.0  # the best is the minimum, the default one of the candidates
    assert all(entry["runs"] >= 3 for entry in found["candidates"].values())
    assert any(name.startswith("cpu/cpu-fp32 vision") for name in found["int8_over_fp32"])
