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

from benchmarks.configs import Config
from benchmarks.cpu_load import CpuBurner
from benchmarks.interleaved import run_interleaved
from benchmarks.ratios import compute_ratios
from benchmarks.scheduling import NORMAL_PRIORITY, closed_loop_conditions, fifo_refusal, thread_scheduling
from benchmarks.segments import segment_plan, steal_ms, steal_split
from benchmarks.settings import LOADS, POLICY_STAGES, TICK_STAGES, BenchSettings
from benchmarks.stats import summarize
from benchmarks.tick_analysis import TICK_RECORD, policy_ms, tail_attribution
from edge.inference.bundle import file_sha256

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
        "unloaded": {"by_samples": {"1": {"tick": {"p50": 7.0, "p99": 12.0}, "policy": {"p50": 4.0}},
                                    "8": {"tick": {"p50": 14.0, "p99": 26.0}, "policy": {"p50": 13.0}}},
                     "tick": {"p99": 26.0}, "start_jitter": {"p99": 0.5}, "stages": {"vision": {"p50": 3.0}}},
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
    assert value["full tick p99 / in-loop policy p50 T=1"] == pytest.approx(12.0 / 4.0)
    assert value["full tick p99 / in-loop policy p50 T=8"] == pytest.approx(26.0 / 13.0)
    assert value["in-loop vision / side-by-side vision"] == pytest.approx(3.0 / 2.0)
    # No TensorRT-layout configuration in this report: no ratio is made up for it.
    assert not any(name.startswith("int8_tensorrt_layout") for name in ratios)


def _ticks(count: int, rng: np.random.Generator) -> np.ndarray:
    records = np.zeros(count, dtype=TICK_RECORD)
    for stage in TICK_STAGES:
        records[stage] = rng.uniform(0.1, 0.3, count)
    records["vision"] = rng.uniform(9.0, 11.0, count)
    return records


def _close_ticks(records: np.ndarray, glue_ms: float = 0.5) -> None:
    records["tick_ms"] = sum(np.nan_to_num(records[stage], nan=0.0) for stage in TICK_STAGES) + glue_ms


def test_tail_attribution_names_the_stage_that_makes_slow_ticks_slow():
    rng = np.random.default_rng(3)
    records = _ticks(200, rng)
    records["serial_write"][:10] += 30.0  # 5% of ticks blocked on the link
    _close_ticks(records)
    tail = tail_attribution(records)
    assert tail["n"] == 10 and tail["largest"] == "serial_write"
    assert tail["stages"]["serial_write"]["excess"] == pytest.approx(30.0, abs=0.2)
    assert abs(tail["stages"]["vision"]["excess"]) < 1.0
    assert tail["stages"]["outside stages"]["excess"] == pytest.approx(0.0, abs=1e-9)

    records = _ticks(200, rng)
    _close_ticks(records)
    records["tick_ms"][:10] += 20.0  # slow ticks with every stage normal: the time went between stages
    assert tail_attribution(records)["largest"] == "outside stages"


def test_policy_time_is_the_sum_of_the_policy_stages_and_absent_without_inference():
    records = _ticks(4, np.random.default_rng(4))
    records["vision"][1] = np.nan  # a hold tick: no inference
    for stage in POLICY_STAGES:
        records[stage][1] = np.nan
    _close_ticks(records)
    policy = policy_ms(records)
    expected = sum(records[stage][0] for stage in POLICY_STAGES)
    assert policy[0] == pytest.approx(expected)
    assert math.isnan(policy[1])
    assert np.all(policy[[0, 2, 3]] < records["tick_ms"][[0, 2, 3]])


def test_closed_loop_conditions_run_the_deployed_scheduling_first():
    assert closed_loop_conditions(LOADS, None, 50) == [
        ("unloaded", "unloaded", 50), ("loaded", "loaded", 50),
        (f"unloaded, {NORMAL_PRIORITY}", "unloaded", None), (f"loaded, {NORMAL_PRIORITY}", "loaded", None)]
    # FIFO refused (or not asked for): one run per load, at normal priority, under the plain keys.
    assert closed_loop_conditions(LOADS[:1], "refused", 50) == [("unloaded", "unloaded", None)]
    assert fifo_refusal(None) == "not asked for (--no-fifo)"


def test_segment_plan_interleaves_the_conditions_and_runs_each_in_full():
    plan = segment_plan(["a", "b", "c"], ticks=250, segment_ticks=100)
    assert plan[:3] == [("a", 100), ("b", 100), ("c", 100)]
    assert plan[3:6] == [("b", 100), ("c", 100), ("a", 100)]  # the order rotates round by round
    assert plan[6:] == [("c", 50), ("a", 50), ("b", 50)]
    for condition in "abc":
        assert sum(n for c, n in plan if c == condition) == 250
    assert segment_plan(["a"], ticks=20, segment_ticks=100) == [("a", 20)]


def test_steal_split_compares_the_quiet_segments_with_the_stolen_ones():
    segments = [{"ticks": 100, "steal_ms": steal, "start_jitter_p99": jitter, "tick_p99": tick}
                for steal, jitter, tick in ((0.0, 0.3, 20.0), (500.0, 4.0, 40.0), (10.0, 0.5, 22.0),
                                            (900.0, 6.0, 50.0), (20.0, 0.4, 21.0))]
    split = steal_split(segments)
    assert split["least"]["segments"] == split["most"]["segments"] == 2
    assert split["least"]["steal_ms_mean"] == pytest.approx(5.0)
    assert split["least"]["start_jitter_p99_median"] == pytest.approx(0.4)
    assert split["most"]["steal_ms_mean"] == pytest.approx(700.0)
    assert split["most"]["tick_p99_median"] == pytest.approx(45.0)
    assert steal_split(segments[:1]) is None
    assert steal_split([{**s, "steal_ms": None} for s in segments]) is None


def test_steal_counter_reads_proc_stat():
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")
    first = steal_ms()
    assert first is not None and first >= 0.0
    assert steal_ms() >= first  # a counter since boot never goes back


def test_thread_scheduling_is_fifo_inside_and_normal_after():
    refused = fifo_refusal(10)
    if refused is not None:
        with pytest.raises(OSError):
            with thread_scheduling(10):
                pass
        pytest.skip(refused)
    with thread_scheduling(10) as label:
        assert label == "SCHED_FIFO 10"
        assert os.sched_getscheduler(0) == os.SCHED_FIFO and os.sched_getparam(0).sched_priority == 10
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with pytest.raises(RuntimeError), thread_scheduling(10):
        raise RuntimeError("a failing run still gives the priority back")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


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
         "--iterations", "5", "--warmup", "1", "--jitter-seconds", "2", "--segment-seconds", "1", "--no-load", "--no-torch",
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
    if closed["fifo_refused"] is None:
        # FIFO granted: the deployed scheduling first, then the same load at normal priority.
        assert set(closed["runs"]) == {"unloaded", "unloaded, normal priority"}
        assert run["scheduling"] == "SCHED_FIFO 50"
        assert closed["runs"]["unloaded, normal priority"]["scheduling"] == "SCHED_OTHER"
        assert "normal/FIFO tick-start jitter p99 unloaded" in report["ratios"]
    else:
        assert set(closed["runs"]) == {"unloaded"} and run["scheduling"] == "SCHED_OTHER"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # (the benchmark ran in its own process anyway)
    assert "control loop stalled" not in smoke[3]  # a condition taking its turn is a hand-over, not a stall
    for each in closed["runs"].values():
        # 2 s per condition in 1 s turns: two segments each, taken in turn with the other condition.
        assert [segment["ticks"] for segment in each["segments"]] == [10, 10] and each["ticks"] == 20
        assert each["steal_ms"] is None or each["steal_ms"] >= 0.0
        if each["steal_ms"] is not None:
            assert each["steal_split"]["least"]["segments"] == each["steal_split"]["most"]["segments"] == 1
        assert each["steal_ms"] is None or each["steal_ms"] >= 0.0
    assert run["ticks"] == 20
    assert set(run["stages"]) == set(TICK_STAGES)
    assert run["inferred_ticks"] >= 10  # the loop ran the policy, not a hold or a stale-frame stop
    for stage in ("camera_read", "vision", "head", "gate_safety", "serial_write"):
        assert run["stages"][stage]["n"] >= 10, stage
    assert set(run["by_samples"]) == {"1", "8", "32"}
    # The policy runs inside the tick: less time than the tick that holds it, and the rest is positive.
    assert run["policy"]["n"] == run["inferred_ticks"]
    assert 0 < run["policy"]["p50"] < run["tick"]["p50"] and run["outside_policy"]["p50"] > 0
    assert run["tail"]["n"] >= 1 and run["tail"]["largest"] in (*TICK_STAGES, "outside stages")
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


def test_the_transports_are_measured_side_by_side(smoke):
    _, out, report, _ = smoke
    transports = report["transports"]
    serial = transports["serial"]
    assert serial["frame"]["n"] > 0 and serial["command"]["n"] > 0
    dds = transports["dds"]
    if "unavailable" in dds:  # without the ros2 extra the report says why
        assert "ROS 2 transport" in report["unavailable"]
        return
    assert dds["frame"]["n"] > 0 and dds["command"]["n"] > 0 and dds["commands_received"] <= dds["commands_sent"]
    assert set(transports["image_codec"]) == {"320x240", "640x480"}
    markdown = (out / "latency.md").read_text()
    assert "## Transports: ROS 2 over DDS next to serial + MJPEG" in markdown
    assert "| DDS frame: Image published (other process) -> Ros2Camera holds BGR |" in markdown


def test_the_monitor_cost_is_measured_against_the_spread_gate_on_real_output(smoke):
    bundle_dir, out, report, _ = smoke
    cost = report["monitor_cost"]
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    per_tick = {"feature_novelty", "action_consistency", "time_on_task"} & set(manifest.get("monitor", {}).get("signals", {}))
    assert set(cost["signals"]) == per_tick  # the bundle's own per-inference signals, as the robot runs them
    assert cost["updates"] > 0 and 0 < cost["spread_gate"]["p50_us"] and 0 < cost["monitor"]["p50_us"]
    assert cost["monitor"]["p50_us"] <= cost["monitor"]["p99_us"]
    assert cost["added"]["p50_us"] == pytest.approx(cost["monitor"]["p50_us"] - cost["spread_gate"]["p50_us"])
    latency_md = (out / "latency.md").read_text()
    assert "failure monitor update, added to the spread gate's" in latency_md
