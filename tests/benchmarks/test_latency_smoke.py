"""The latency benchmark: its pure helpers, the CPU-load process, the interleaving, and a smoke run of
`python -m benchmarks.latency --quick` (counts cut down) on the session's reference bundle."""

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.latency import (
    LOADS,
    TICK_STAGES,
    BenchSettings,
    Config,
    CpuBurner,
    compute_ratios,
    run_interleaved,
    summarize,
)
from edge.bundle import file_sha256

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("latency_cdf.png", "stage_bars.png", "tick_jitter.png")


def _numbers(node, path="$"):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


# --- helpers ----------------------------------------------------------------------------------------


def test_summarize_ignores_nan_and_orders_percentiles():
    values = [float(v) for v in range(1, 101)] + [math.nan]
    stats = summarize(values)
    assert stats["n"] == 100
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["max"] == 100.0
    assert summarize([math.nan]) == {"n": 0}


def _synthetic_report() -> dict:
    def entry(key, samples, family, p50, vision=None, head=None, loaded=None):
        stages = {}
        if vision is not None:
            stages = {"vision": {"n": 5, "p50": vision}, "head": {"n": 5, "p50": head}}
        out = {"key": key, "samples": samples, "family": family,
               "unloaded": {"total": {"n": 5, "p50": p50, "p99": p50 * 2}, "stages": stages}}
        if loaded is not None:
            out["loaded"] = {"total": {"n": 5, "p50": loaded, "p99": loaded * 2}, "stages": stages}
        return out

    configs = {}
    for t in (1, 8):
        configs[f"ort-fp32@T{t}"] = entry("ort-fp32", t, "runtime", 10.0 + t, vision=8.0, head=2.0 + t)
        configs[f"ort-int8-cpu@T{t}"] = entry("ort-int8-cpu", t, "runtime", 5.0 + t, vision=2.0, head=1.0 + t,
                                             loaded=3 * (5.0 + t))
        configs[f"torch-seeds-mc@T{t}"] = entry("torch-seeds-mc", t, "torch", 40.0 * t)
    configs["torch-deterministic@T1"] = entry("torch-deterministic", 1, "torch", 30.0)
    closed = {"config": "ort-int8-cpu", "runs": {
        "unloaded": {"by_samples": {"1": {"tick": {"p50": 7.0, "p99": 12.0}}, "8": {"tick": {"p50": 14.0, "p99": 26.0}}},
                     "tick": {"p99": 26.0}, "start_jitter": {"p99": 0.5}},
        "loaded": {"tick": {"p99": 52.0}, "start_jitter": {"p99": 2.0}},
    }}
    return {"side_by_side": {"configs": configs}, "closed_loop": closed, "runtime_key": "ort-int8-cpu"}


def test_ratios_are_the_quotients_the_goals_are_stated_in():
    ratios = compute_ratios(_synthetic_report(), BenchSettings(samples=(1, 8)))
    value = {name: r["value"] for name, r in ratios.items()}
    assert value["int8_cpu_layout/fp32 vision"] == pytest.approx(2.0 / 8.0)
    assert value["int8_cpu_layout/fp32 head T=8"] == pytest.approx(9.0 / 10.0)
    assert value["full tick p99 / pure inference p50 T=1"] == pytest.approx(12.0 / 6.0)
    assert value["full tick p99 / pure inference p50 T=8"] == pytest.approx(26.0 / 13.0)
    assert value["tick T=8 / T=1"] == pytest.approx(14.0 / 7.0)
    assert value["torch seeds MC / runtime T=8"] == pytest.approx(320.0 / 13.0)
    assert value["torch deterministic / runtime T=1"] == pytest.approx(30.0 / 6.0)
    assert value["loaded/unloaded ort-int8-cpu@T8 p50"] == pytest.approx(3.0)
    assert value["loaded/unloaded closed-loop tick p99"] == pytest.approx(2.0)
    assert value["loaded/unloaded tick-start jitter p99"] == pytest.approx(4.0)
    # No TensorRT-layout configuration in this report: no ratio is made up for it.
    assert not any(name.startswith("int8_tensorrt_layout") for name in ratios)


# --- the competing load and the interleaving --------------------------------------------------------


def test_cpu_burner_burns_only_while_resumed_and_dies_on_stop():
    with CpuBurner(max_seconds=30.0) as burner:
        pid = burner.pid
        assert _state(pid) == "T"  # starts paused
        before = burner.cpu_seconds()
        burner.resume()
        assert burner.is_loading and _state(pid) != "T"
        give_up = time.monotonic() + 10.0  # hang guard only
        while burner.cpu_seconds() <= before + 0.05 and time.monotonic() < give_up:
            time.sleep(0.02)
        burner.pause()
        paused_at = burner.cpu_seconds()
        assert paused_at > before + 0.05
        assert _state(pid) == "T" and not burner.is_loading
        assert burner.loaded_wall_s > 0.0
    assert not os.path.exists(f"/proc/{pid}")


def test_interleaving_runs_every_configuration_in_rotating_order_under_both_loads():
    calls = []

    def make(name, burner_ref):
        def run():
            calls.append((name, burner_ref[0].is_loading))
            return {"total": 1.0, "vision": 0.5}
        return run

    ref = [None]
    configs = [Config(name, 1, "runtime", iterations, make(name, ref)) for name, iterations in
               (("a", 4), ("b", 4), ("c", 2))]
    with CpuBurner(max_seconds=30.0) as burner:
        ref[0] = burner
        result = run_interleaved(configs, BenchSettings(warmup=1), burner)
    assert calls[:3] == [("a", False), ("b", False), ("c", False)]  # warm-up, unloaded
    measured = calls[3:]
    for load in LOADS:
        loaded = load == "loaded"
        for name, iterations in (("a", 4), ("b", 4), ("c", 2)):
            assert sum(1 for n, on in measured if n == name and on == loaded) == iterations
            assert result["configs"][f"{name}@T1"][load]["total"]["n"] == iterations
    # Round 1 starts with "b": the order rotates so no configuration always follows a load switch.
    assert measured[3][0] == "a" and measured[6][0] == "b"
    assert result["rounds"] == 4


def test_spent_time_budget_stops_after_the_guaranteed_rounds():
    counts = {"a": 0, "b": 0}

    def make(name):
        def run():
            counts[name] += 1
            time.sleep(0.001)  # the clock must move for a zero budget to count as spent
            return {"total": 1.0}
        return run

    configs = [Config(name, 1, "runtime", 10, make(name)) for name in counts]
    result = run_interleaved(configs, BenchSettings(warmup=0, budget_seconds=0.0), None)
    assert counts == {"a": 2, "b": 2}  # two complete rounds, then nothing new starts
    assert result["rounds"] == 2 and result["budget_spent"] is True and result["planned_rounds"] == 10
    assert result["configs"]["a@T1"]["unloaded"]["total"]["n"] == 2


# --- the smoke run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(reference_bundle, tmp_path_factory):
    bundle_dir = reference_bundle[0]
    out = tmp_path_factory.mktemp("latency")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.latency", "--bundle", str(bundle_dir), "--quick", "--out", str(out),
         "--iterations", "5", "--warmup", "1", "--jitter-seconds", "2", "--no-load", "--no-torch",
         "--log-level", "WARNING"],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return bundle_dir, out, json.loads((out / "latency.json").read_text()), done.stdout


def test_json_has_the_schema_and_only_finite_numbers(smoke):
    bundle_dir, _, report, _ = smoke
    for key in ("schema", "settings", "environment", "side_by_side", "closed_loop", "startup", "ratios",
                "unavailable", "plots"):
        assert key in report, key
    numbers = list(_numbers(report))
    assert numbers and all(math.isfinite(v) for _, v in numbers), [p for p, v in numbers if not math.isfinite(v)]
    env = report["environment"]
    assert env["bundle"]["manifest_sha256"] == file_sha256(Path(bundle_dir) / "manifest.json")
    assert env["cpu"]["model"] and isinstance(env["cpu"]["flags"], list)
    assert env["libraries"]["onnxruntime"] and "gpu" in env
    assert report["benchmark_imported_torch"] is False  # --no-torch: torch never imported


def test_side_by_side_covers_each_cpu_layout_and_sample_count(smoke):
    _, _, report, _ = smoke
    configs = report["side_by_side"]["configs"]
    for key in ("ort-fp32", "ort-int8-cpu", "ort-int8-trt-layout"):
        for t in (1, 8, 32):
            entry = configs[f"{key}@T{t}"]
            total = entry["unloaded"]["total"]
            assert total["n"] == 5
            assert 0 < total["p50"] <= total["p90"] <= total["p99"] <= total["max"]
            assert set(entry["unloaded"]["stages"]) == {"resize", "h2d", "vision", "head", "d2h", "reduce"}
            assert entry["unloaded"]["stages"]["h2d"]["max"] == 0.0  # no device copies on ONNX Runtime CPU
            assert "loaded" not in entry  # --no-load
        assert configs[f"{key} language"]["unloaded"]["total"]["n"] == 5
    unavailable = report["unavailable"]
    assert unavailable["torch-seeds-mc"] == "skipped (--no-torch)"
    assert "trt-int8" in unavailable and "cpu load" in unavailable


def test_closed_loop_times_every_stage_of_real_ticks(smoke):
    _, _, report, _ = smoke
    closed = report["closed_loop"]
    run = closed["runs"]["unloaded"]
    assert set(closed["runs"]) == {"unloaded"}
    assert run["ticks"] == 20
    assert set(run["stages"]) == set(TICK_STAGES)
    assert run["inferred_ticks"] >= 10  # the loop ran the policy, not a hold or a stale-frame stop
    for stage in ("camera_read", "vision", "head", "gate_safety", "serial_write"):
        assert run["stages"][stage]["n"] >= 10, stage
    assert set(run["by_samples"]) == {"1", "8", "32"}
    assert len(run["series"]["start_jitter_ms"]) == 20
    assert run["missed_deadlines"] >= 0 and run["overruns"] >= 0
    # Every stage after the frame is read happens inside the tick, so no stage can outlast the longest tick.
    for stage in ("resize", "vision", "head", "reduce", "gate_safety", "serial_write"):
        assert run["stages"][stage]["max"] <= run["tick"]["max"], stage


def test_startup_runs_without_torch_and_reaches_a_first_command(smoke):
    _, _, report, _ = smoke
    runtime = report["startup"]["runtime_process"]
    assert runtime["torch_imported"] is False and runtime["forbidden_modules"] == []
    assert runtime["rss_mib"] > 10 and runtime["peak_rss_mib"] >= runtime["rss_mib"]
    first = report["startup"]["first_command"]
    assert first["start_to_first_command_s"] > 0
    ratios = report["ratios"]
    for name in ("int8_cpu_layout/fp32 vision", "int8_tensorrt_layout/fp32 head T=32",
                 "full tick p99 / pure inference p50 T=8", "tick T=32 / T=1"):
        assert ratios[name]["value"] > 0, name


def test_plots_are_valid_pngs_and_markdown_has_the_tables(smoke):
    _, out, report, stdout = smoke
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        assert width > 200 and height > 200, name
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.std() > 0, name  # decodes, and is not a blank canvas
    assert sorted(Path(p).name for p in report["plots"]) == sorted(PLOTS)
    markdown = (out / "latency.md").read_text()
    assert "| ort-int8-cpu | 8 | unloaded | 5 |" in markdown
    assert "## Ratios" in markdown and "full tick (frame ready -> bytes to link)" in markdown
    assert "Ratios (measured side by side in this run):" in stdout


def test_edge_never_imports_the_benchmarks():
    offenders = [str(p) for p in (REPO / "edge").rglob("*.py")
                 if "import benchmarks" in p.read_text() or "from benchmarks" in p.read_text()]
    assert offenders == []
