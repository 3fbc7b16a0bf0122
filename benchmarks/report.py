"""The Markdown report (latency.md) and the ratios printed at the end of a run."""

from __future__ import annotations

from benchmarks.settings import LOADS, RATE_HZ, TICK_STAGES
from benchmarks.stats import stat_at
from benchmarks.transport import format_transports


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Latency benchmark ({report['settings']['mode']} mode)", "",
        f"- CPU: {env['cpu'].get('model')} ({env['cpu'].get('usable_cpus')} usable CPUs; load average "
        f"{env['load_average_at_start'][0]:.1f} at start, {env['load_average_at_end'][0]:.1f} at end); "
        f"GPU: {env['gpu'].get('nvidia_smi') or env['gpu'].get('name') or env['gpu'].get('reason')}",
        f"- onnxruntime {env['libraries'].get('onnxruntime')}, numpy {env['libraries'].get('numpy')}, "
        f"torch {env['libraries'].get('torch')}; bundle manifest sha256 {env['bundle']['manifest_sha256'][:16]}...",
        f"- {report['side_by_side']['rounds']} complete interleaved rounds (of {report['side_by_side']['planned_rounds']}"
        f" planned{'; time budget spent' if report['side_by_side'].get('budget_spent') else ''}); milliseconds; "
        "'loaded' = one core burnt by another process", "",
        "## Pure inference, side by side (vision + head back to back)", "",
        "| configuration | T | load | n | p50 | p90 | p99 | max | vision p50 | head p50 | > 100 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    language = []
    for entry in report["side_by_side"]["configs"].values():
        for load in LOADS:
            row = entry.get(load)
            if row is None:
                continue
            total, stages = row["total"], row["stages"]
            if entry["family"] == "language":
                language.append(f"| {entry['key']} | {load} | {total['n']} | {_ms(total.get('p50'))} | "
                                f"{_ms(total.get('p99'))} | {_ms(total.get('max'))} |")
                continue
            lines.append(
                f"| {entry['key']} | {entry['samples']} | {load} | {total['n']} | {_ms(total.get('p50'))} | "
                f"{_ms(total.get('p90'))} | {_ms(total.get('p99'))} | {_ms(total.get('max'))} | "
                f"{_ms(stat_at(stages, 'vision', 'p50'))} | {_ms(stat_at(stages, 'head', 'p50'))} | {row['over_period']} |")
    if language:
        lines += ["", "## Language encoder (on instruction change only, never inside a tick)", "",
                  "| configuration | load | n | p50 | p99 | max |", "|---|---|---|---|---|---|", *language]
    closed = report.get("closed_loop")
    if closed:
        lines += ["", f"## Full tick in closed loop ({closed['config']}, {RATE_HZ:g} Hz, T cycling over "
                  f"{closed['samples_cycle']}, simulator on a real pty + MJPEG camera)", ""]
        if closed.get("fifo_refused"):
            lines += [f"Control thread at normal priority only: {closed['fifo_refused']}.", ""]
        for load, run in closed["runs"].items():
            steal = run.get("steal_ms")
            steal_text = "" if steal is None else f", {steal:.0f} ms of CPU stolen by the hypervisor meanwhile"
            segments = len(run.get("segments") or [None])
            lines += [f"### {load} ({run.get('scheduling', 'SCHED_OTHER')}, {segments} segment"
                      f"{'' if segments == 1 else 's'}{steal_text}): {run['ticks']} ticks, {run['overruns']} overruns, {run['missed_deadlines']} missed "
                      f"deadlines, {run['ticks_over_period']} ticks over 100 ms; modes {run['modes']}", "",
                      "| stage | p50 | p90 | p99 | max |", "|---|---|---|---|---|"]
            rows = [(stage, run["stages"][stage]) for stage in TICK_STAGES]
            rows += [(f"{stage} (inside vision and head)", stats) for stage, stats in (run.get("copies") or {}).items()
                     if stats.get("max")]  # device copies; none on CPU backends
            rows += [("full tick (frame ready -> bytes to link)", run["tick"]), ("tick-start jitter", run["start_jitter"]),
                     ("frame age at tick start", run["frame_age"])]
            rows += [(f"full tick, T={t}", s["tick"]) for t, s in run["by_samples"].items()]
            if "policy" in run:
                rows += [("policy in the tick (resize .. reduce)", run["policy"]),
                         ("tick outside the policy", run["outside_policy"])]
            language = report["side_by_side"]["configs"].get(f"{closed['config']} language", {}).get(
                run.get("load", load))
            if language:
                rows.append(("language encoder (on instruction change only, off the tick; side-by-side run)",
                             language["total"]))
            for name, stats in rows:
                lines.append(f"| {name} | {_ms(stats.get('p50'))} | {_ms(stats.get('p90'))} | "
                             f"{_ms(stats.get('p99'))} | {_ms(stats.get('max'))} |")
            lines.append("")
            split = run.get("steal_split")
            if split:
                least, most = split["least"], split["most"]
                lines += [f"Per {closed.get('segment_s', 10.0):g} s segment, median of the segments' p99: the {least['segments']} with the least steal "
                          f"(mean {least['steal_ms_mean']:.0f} ms): tick-start jitter {least['start_jitter_p99_median']:.2f}, "
                          f"tick {least['tick_p99_median']:.2f}; the {most['segments']} with the most "
                          f"(mean {most['steal_ms_mean']:.0f} ms): jitter {most['start_jitter_p99_median']:.2f}, "
                          f"tick {most['tick_p99_median']:.2f}.", ""]
            tail = run.get("tail") or {}
            if tail.get("n"):
                grown = sorted(tail["stages"].items(), key=lambda kv: -kv[1]["excess"])
                parts = ", ".join(f"{stage} {v['excess']:+.2f}" for stage, v in grown if abs(v["excess"]) >= 0.05)
                lines += [f"Slowest {tail['fraction']:.0%} of ticks ({tail['n']}, >= {tail['tick_cutoff_ms']:.2f} ms, "
                          f"mean {tail['tick_slow_mean_ms']:.2f} vs median tick {tail['tick_median_ms']:.2f}): "
                          f"stage mean minus stage median, ms: {parts or 'no stage grew'}. "
                          f"Largest: **{tail['largest']}**.", ""]
    transports = format_transports(report.get("transports"))
    lines += [*transports[1:], ""] if transports else []
    lines += ["## Ratios", "", "| ratio | value | numerator (ms) | denominator (ms) |", "|---|---|---|---|"]
    for name, ratio in report["ratios"].items():
        lines.append(f"| {name} | {ratio['value']:.2f}x | {_ms(ratio['numerator_ms'])} | "
                     f"{_ms(ratio['denominator_ms'])} |")
    startup = report.get("startup") or {}
    if startup:
        runtime = startup.get("runtime_process") or {}
        cli = startup.get("first_command") or {}
        lines += ["", "## Start-up and memory", ""]
        if runtime:
            lines.append(f"- runtime alone (subprocess importing only edge, {runtime.get('target')}, "
                         f"T={runtime.get('samples')}): RSS {_ms(runtime.get('rss_mib'), 0)} MiB, peak "
                         f"{_ms(runtime.get('peak_rss_mib'), 0)} MiB; torch imported: {runtime.get('torch_imported')}; "
                         f"import {_ms(runtime.get('import_s'))} s, activation {_ms(runtime.get('activate_s'))} s, "
                         f"first inference {_ms(runtime.get('first_infer_s'))} s")
        if cli:
            lines.append(f"- start to first command ({cli.get('method')}): "
                         f"{_ms(cli.get('start_to_first_command_s'))} s"
                         + (f"; service ready after {_ms(cli.get('service_ready_s'))} s" if cli.get("service_ready_s")
                            else "") + (f"; {cli['error']}" if cli.get("error") else ""))
    if report["unavailable"]:
        lines += ["", "## Not available here", ""]
        lines += [f"- {key}: not available here: {why}" for key, why in report["unavailable"].items()]
    return "\n".join(lines) + "\n"


def format_ratios(report: dict) -> str:
    lines = ["Ratios (measured side by side in this run):"]
    for name, ratio in report["ratios"].items():
        lines.append(f"  {name:<55} {ratio['value']:7.2f}x   ({_ms(ratio['numerator_ms'])} / "
                     f"{_ms(ratio['denominator_ms'])} ms)")
    runtime = (report.get("startup") or {}).get("runtime_process") or {}
    if runtime:
        lines.append(f"  runtime RSS {_ms(runtime.get('rss_mib'), 0)} MiB (torch imported: "
                     f"{runtime.get('torch_imported')})")
    first = (report.get("startup") or {}).get("first_command") or {}
    if first:
        lines.append(f"  start to first command {_ms(first.get('start_to_first_command_s'))} s ({first.get('method')})")
    return "\n".join(lines)



def format_fast_default(report: dict) -> str:
    """The table of issue "fast by default": default vs best, INT8/FP32 per graph with the ISA, the full tick
    over the in-loop policy, frame age and glass-to-wire latency (closed loop, unloaded)."""
    rows = []
    defaults = report.get("default_vs_best") or {}
    ratios = report.get("ratios") or {}
    if defaults.get("default_over_best_p99") is not None:
        rows.append(("default (auto) / best measured, policy p99", f"{defaults['default_over_best_p99']:.2f}x",
                     f"{defaults['default']['line']}; best {defaults['best']['label']} "
                     f"{_ms(defaults['best']['p99_ms'])} ms"))
        for name, entry in (defaults.get("int8_over_fp32") or {}).items():
            if entry.get("value") is not None:
                rows.append((f"{name} p50 ({defaults['isa']})", f"{entry['value']:.2f}x",
                             f"{_ms(entry['numerator_ms'])} / {_ms(entry['denominator_ms'])} ms"))
    for name, entry in ratios.items():
        if name.startswith("full tick p99 / in-loop policy p50") or "/fp32 vision" in name:
            isa = f" ({entry['what'].rsplit(' on ', 1)[1]})" if "/fp32" in name and " on " in entry["what"] else ""
            rows.append((name + isa, f"{entry['value']:.2f}x", f"{_ms(entry['numerator_ms'])} / "
                         f"{_ms(entry['denominator_ms'])} ms"))
    closed = report.get("closed_loop") or {}
    unloaded = (closed.get("runs") or {}).get("unloaded") or {}
    for label, key in (("frame age at tick start", "frame_age"), ("glass to wire (capture -> command written)",
                                                                  "glass_to_wire")):
        stats = unloaded.get(key) or {}
        if stats.get("n"):
            rows.append((label, f"p50 {_ms(stats.get('p50'), 1)} ms", f"p99 {_ms(stats.get('p99'), 1)} ms"))
    trips = closed.get("command_to_telemetry_ms")
    if trips:
        rows.append(("command -> telemetry echoing it", f"p50 {_ms(trips['p50'], 1)} ms", f"p99 {_ms(trips['p99'], 1)} ms"))
    if closed:
        window = closed.get("frame_sync_window_s") or 0.0
        rows.append(("frame-synchronous ticks", "on" if window else "off",
                     f"window {window * 1e3:.0f} ms" if window else "camera rate unknown or below the tick rate"))
    cost = report.get("monitor_cost")
    if cost:
        rows.append(("failure monitor update, added to the spread gate's (goal <= 500 us)",
                     f"p50 {cost['added']['p50_us']:.0f} us, p99 {cost['added']['p99_us']:.0f} us",
                     f"monitor p99 {cost['monitor']['p99_us']:.0f} us ({', '.join(cost['signals']) or 'spread only'}; "
                     f"{cost['config']}, {cost['updates']} updates interleaved)"))
    if not rows:
        return ""
    lines = ["## Fast by default", "", "| measure | value | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"
