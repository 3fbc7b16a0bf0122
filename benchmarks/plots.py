"""The plots of a run: latency_cdf.png, stage_bars.png, tick_jitter.png (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from benchmarks.settings import PERIOD_S, POLICY_STAGES, TICK_STAGES
from benchmarks.stats import stat_at
from edge.errors import ConfigError


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """latency_cdf.png, stage_bars.png, tick_jitter.png (matplotlib, Agg backend)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("the plots need matplotlib: pip install matplotlib (or pip install -e '.[bench]')") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    configs = report["side_by_side"]["configs"]
    ts = report["settings"]["samples"]
    colors = {}
    palette = plt.get_cmap("tab10")

    def color(key: str):
        return colors.setdefault(key, palette(len(colors) % 10))

    fig, axes = plt.subplots(1, len(ts), figsize=(5 * len(ts), 5.5), squeeze=False)
    for ax, t in zip(axes[0], ts):
        for entry in configs.values():
            if entry["samples"] != t or entry["family"] == "language":
                continue
            for load, style in (("unloaded", "-"), ("loaded", "--")):
                values = np.sort(np.asarray((entry.get(load) or {}).get("values_ms", []), np.float64))
                if values.size:
                    ax.step(values, np.arange(1, values.size + 1) / values.size, style, where="post",
                            color=color(entry["key"]), label=f"{entry['key']} ({load})")
        ax.set_xscale("log")
        ax.set_xlabel("pure inference latency (ms, log)")
        ax.set_ylabel("fraction of iterations")
        ax.set_title(f"T = {t}")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.suptitle("Latency CDF per backend (solid: unloaded, dashed: one core burnt)")
    fig.tight_layout(rect=(0, 0.06 + 0.025 * math.ceil(len(labels) / 4), 1, 1))
    written.append(_save(fig, out_dir / "latency_cdf.png", plt))

    bars = []
    for entry in configs.values():
        stages = (entry.get("unloaded") or {}).get("stages") or {}
        if entry["family"] == "runtime":
            bars.append((f"{entry['key']} T={entry['samples']}", {s: stat_at(stages, s, "p50") or 0.0 for s in POLICY_STAGES}))
    closed = report.get("closed_loop")
    if closed:
        for t, stages in closed["runs"]["unloaded"]["by_samples"].items():
            bars.append((f"closed-loop tick {closed['config']} T={t}",
                         {s: stat_at(stages, s, "p50") or 0.0 for s in TICK_STAGES}))
    if bars:
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(bars) + 1.8))
        left = np.zeros(len(bars))
        stage_colors = plt.get_cmap("tab20")
        for i, stage in enumerate(TICK_STAGES):
            widths = np.array([b[1].get(stage, 0.0) for b in bars])
            ax.barh([b[0] for b in bars], widths, left=left, label=stage, color=stage_colors(i))
            left += widths
        ax.invert_yaxis()
        ax.set_xlabel("median milliseconds per stage (unloaded)")
        ax.legend(fontsize=7, ncol=3, loc="lower right")
        ax.set_title("Where the time goes: stage medians stacked")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "stage_bars.png", plt))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    if closed:
        for load, run in closed["runs"].items():
            series = run["series"]
            label = f"{load} ({run.get('scheduling', 'SCHED_OTHER')})"
            # Markers only: the conditions take turns, so each one's series has gaps.
            top.plot(series["t_s"], series["start_jitter_ms"], ".", ms=3, label=label)
            bottom.plot(series["t_s"], series["tick_ms"], ".", ms=3, label=label)
        bottom.axhline(PERIOD_S * 1e3, color="red", lw=0.8, ls=":", label="100 ms period")
    else:
        top.text(0.5, 0.5, "closed loop not run", ha="center", transform=top.transAxes)
    top.set_ylabel("tick start - deadline (ms)")
    bottom.set_ylabel("full tick (ms)")
    bottom.set_xlabel("time since the closed loop started (s)")
    top.set_title("Tick-start jitter and full tick over time, 10 Hz")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "tick_jitter.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

