"""The ratios the goals are stated in (docs/architecture.md, 'What "fast" means'), each with what it divides."""

from __future__ import annotations

from benchmarks.scheduling import NORMAL_PRIORITY
from benchmarks.settings import LOADS, BenchSettings
from benchmarks.stats import ratio, stat_at
from edge.inference.tuning import int8_dot_product_isa


def compute_ratios(report: dict, settings: BenchSettings) -> dict[str, dict]:
    """The ratios the goals are stated in, each with what it divides."""
    configs = report["side_by_side"]["configs"]
    ratios: dict[str, dict] = {}

    def add(name: str, what: str, num: float | None, den: float | None, num_label: str, den_label: str) -> None:
        value = ratio(num, den)
        if value is not None:
            ratios[name] = {"value": value, "what": what, "numerator_ms": num, "denominator_ms": den,
                            "numerator": num_label, "denominator": den_label}

    ts = sorted(settings.samples)
    ref_t = 8 if 8 in ts else ts[len(ts) // 2]

    def cfg(key: str, t: int) -> dict | None:
        return configs.get(f"{key}@T{t}")

    defaults = report.get("default_vs_best") or {}
    if defaults.get("default_over_best_p99") is not None:
        add("default / best measured p99", f"policy p99 of the default configuration ({defaults['default']['line']}) "
            f"vs the fastest candidate ({defaults['best']['label']}), interleaved, T={defaults['samples']}",
            defaults["default"]["p99_ms"], defaults["best"]["p99_ms"], "default (auto)", defaults["best"]["label"])
    isa = int8_dot_product_isa()
    # INT8 / FP32 per graph (p50, unloaded), on this CPU's int8 instructions.
    for key, name in (("ort-int8-cpu", "int8_cpu_layout"), ("ort-int8-trt-layout", "int8_tensorrt_layout")):
        add(f"{name}/fp32 vision", f"INT8/FP32 vision graph ({key} vs ort-fp32, p50, T={ref_t}) on {isa}",
            stat_at(cfg(key, ref_t), "unloaded", "stages", "vision", "p50"),
            stat_at(cfg("ort-fp32", ref_t), "unloaded", "stages", "vision", "p50"), key, "ort-fp32")
        for t in ts:
            add(f"{name}/fp32 head T={t}", f"INT8/FP32 head graph at T={t} ({key} vs ort-fp32, p50) on {isa}",
                stat_at(cfg(key, t), "unloaded", "stages", "head", "p50"),
                stat_at(cfg("ort-fp32", t), "unloaded", "stages", "head", "p50"), key, "ort-fp32")
    if "trt-fp16" in {c["key"] for c in configs.values()}:
        add("tensorrt int8/fp16 vision", f"TensorRT INT8/FP16 vision engine (p50, T={ref_t})",
            stat_at(cfg("trt-int8", ref_t), "unloaded", "stages", "vision", "p50"),
            stat_at(cfg("trt-fp16", ref_t), "unloaded", "stages", "vision", "p50"), "trt-int8", "trt-fp16")

    closed = report.get("closed_loop") or {}
    runtime_key = closed.get("config") or report.get("runtime_key")
    unloaded = (closed.get("runs") or {}).get("unloaded")
    for t in ts:
        add(f"full tick p99 / pure inference p50 T={t}",
            f"closed-loop tick p99 vs median pure inference, {runtime_key}, T={t}",
            stat_at(unloaded, "by_samples", str(t), "tick", "p99"), stat_at(cfg(runtime_key, t), "unloaded", "total", "p50"),
            "closed-loop tick p99", "pure inference p50")
    for t in ts:
        # The same quotient with the denominator measured inside the loop: what the tick adds around the
        # policy, without the difference between a quiet machine and one that also runs the simulator.
        add(f"full tick p99 / in-loop policy p50 T={t}",
            f"closed-loop tick p99 vs median time inside the policy in the same ticks, {runtime_key}, T={t}",
            stat_at(unloaded, "by_samples", str(t), "tick", "p99"), stat_at(unloaded, "by_samples", str(t), "policy", "p50"),
            "closed-loop tick p99", "in-loop policy p50")
    add("in-loop vision / side-by-side vision", f"vision p50 inside the closed loop vs in the side-by-side run "
        f"({runtime_key}, T={ref_t}): the cost of sharing the CPU with the simulator and camera",
        stat_at(unloaded, "stages", "vision", "p50"), stat_at(cfg(runtime_key, ref_t), "unloaded", "stages", "vision", "p50"),
        "closed-loop vision", "side-by-side vision")
    lo, hi = ts[0], ts[-1]
    if hi != lo:
        add(f"tick T={hi} / T={lo}", f"closed-loop tick p50 at T={hi} vs T={lo} ({runtime_key})",
            stat_at(unloaded, "by_samples", str(hi), "tick", "p50"), stat_at(unloaded, "by_samples", str(lo), "tick", "p50"),
            f"tick T={hi}", f"tick T={lo}")
        add(f"pure inference T={hi} / T={lo}", f"pure inference p50 at T={hi} vs T={lo} ({runtime_key})",
            stat_at(cfg(runtime_key, hi), "unloaded", "total", "p50"), stat_at(cfg(runtime_key, lo), "unloaded", "total", "p50"),
            f"T={hi}", f"T={lo}")
        add(f"torch seeds T={hi} / T={lo}", f"PyTorch eager, T full passes: T={hi} vs T={lo}",
            stat_at(cfg("torch-seeds-mc", hi), "unloaded", "total", "p50"),
            stat_at(cfg("torch-seeds-mc", lo), "unloaded", "total", "p50"), f"T={hi}", f"T={lo}")

    add("torch deterministic / runtime T=1", f"PyTorch eager deterministic vs {runtime_key} at T=1 (p50)",
        stat_at(cfg("torch-deterministic", 1), "unloaded", "total", "p50"), stat_at(cfg(runtime_key, 1), "unloaded", "total", "p50"),
        "torch-deterministic", runtime_key)
    for t in ts:
        add(f"torch seeds MC / runtime T={t}", f"PyTorch eager, T full passes vs {runtime_key} (encoders once, "
            f"head batched), T={t}, p50", stat_at(cfg("torch-seeds-mc", t), "unloaded", "total", "p50"),
            stat_at(cfg(runtime_key, t), "unloaded", "total", "p50"), "torch-seeds-mc", runtime_key)
        add(f"torch batched MC / runtime T={t}", f"PyTorch eager with the runtime's algorithm vs {runtime_key}, "
            f"T={t}, p50 (the engine's share of the gain)", stat_at(cfg("torch-batched-mc", t), "unloaded", "total", "p50"),
            stat_at(cfg(runtime_key, t), "unloaded", "total", "p50"), "torch-batched-mc", runtime_key)

    for config_id, entry in configs.items():
        if entry["family"] != "runtime" or entry["samples"] != ref_t:
            continue
        for stat in ("p50", "p99"):
            add(f"loaded/unloaded {config_id} {stat}", f"pure inference {stat} with / without one core burnt",
                stat_at(entry, "loaded", "total", stat), stat_at(entry, "unloaded", "total", stat), "loaded", "unloaded")
    runs = closed.get("runs") or {}
    add("loaded/unloaded closed-loop tick p99", "closed-loop tick p99 with / without one core burnt",
        stat_at(runs.get("loaded"), "tick", "p99"), stat_at(runs.get("unloaded"), "tick", "p99"), "loaded", "unloaded")
    add("loaded/unloaded tick-start jitter p99", "tick-start jitter p99 with / without one core burnt",
        stat_at(runs.get("loaded"), "start_jitter", "p99"), stat_at(runs.get("unloaded"), "start_jitter", "p99"),
        "loaded", "unloaded")
    for load in LOADS:
        normal, deployed = runs.get(f"{load}, {NORMAL_PRIORITY}"), runs.get(load)
        if normal is None or deployed is None:
            continue
        for name, path in (("tick-start jitter p99", ("start_jitter", "p99")), ("tick p99", ("tick", "p99"))):
            add(f"normal/FIFO {name} {load}", f"{name}, control thread at normal priority / at "
                f"{deployed.get('scheduling')} ({load})", stat_at(normal, *path), stat_at(deployed, *path),
                NORMAL_PRIORITY, str(deployed.get("scheduling")))
    return ratios

