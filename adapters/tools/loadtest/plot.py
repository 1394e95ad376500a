"""The load test's optional plot (the ``plot`` extra, matplotlib): latency distribution and
throughput over time."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from wirestate.adapters.tools.loadtest.client import BUCKETS, PER_E
from wirestate.adapters.tools.loadtest.options import LoadTestError
from wirestate.adapters.tools.loadtest.report import Report, ms


def load_matplotlib() -> Any:
    """matplotlib's Figure class, or LoadTestError naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LoadTestError("--plot needs matplotlib: pip install 'wirestate[plot]'") from None
    return Figure


def plot_report(report: Report, path: Path) -> None:
    """Draw the latency distribution (log x) and the throughput per second into `path`
    (PNG). Raises LoadTestError without matplotlib."""
    figure_class = load_matplotlib()
    fig = figure_class(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    group = 5  # 5 % bins for the eye; the percentiles come from the 1 % histogram
    counts = [sum(report.histogram[i : i + group]) for i in range(0, BUCKETS, group)]
    edges = [math.exp(i / PER_E) * 1e-3 for i in range(0, BUCKETS + group, group)]
    edges = edges[: len(counts) + 1]
    used = [i for i, c in enumerate(counts) if c]
    if used:
        lo, hi = max(0, used[0] - 1), min(len(counts), used[-1] + 2)
        left.stairs(counts[lo:hi], edges[lo : hi + 1], fill=True, alpha=0.6)
        for name, style in (("p50", "--"), ("p99", ":"), ("max", "-.")):
            value = report.latency[name]
            if value is not None:
                left.axvline(
                    value * 1e3,
                    color="black",
                    linestyle=style,
                    linewidth=1,
                    label=f"{name} {ms(value)}",
                )
        left.legend(loc="upper right", fontsize="small")
    left.set_xscale("log")
    left.set_xlabel("latency, publish to receive (ms)")
    left.set_ylabel("deliveries")
    left.set_title(f"latency ({report.samples:,} deliveries)")
    right.stairs(report.per_second, range(len(report.per_second) + 1))
    right.set_xlabel("seconds since the first publish")
    right.set_ylabel("deliveries per second")
    right.set_ylim(bottom=0)
    right.set_title(f"throughput ({report.clients:,} clients, {report.rate:g} events/s)")
    drops = Counter(int(at) for at, *_ in report.disconnects if at is not None and at >= 0)
    if drops:
        twin = right.twinx()
        seconds = max(len(report.per_second), max(drops) + 1)
        twin.stairs([drops.get(s, 0) for s in range(seconds)], range(seconds + 1), color="red")
        twin.set_ylabel("disconnects per second", color="red")
        twin.set_ylim(bottom=0)
    fig.suptitle(f"wirestate loadtest {report.url}", fontsize="medium")
    fig.savefig(path, dpi=100)
