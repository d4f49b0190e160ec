"""A sweep's chart: mean total time and its ratio to original against the link's rate, one
line per configuration (the reports of `pyvmm sim batch link-sweep`)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def sweep_points(reports: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """configuration -> link Mbit/s -> mean total time (s) of its completed runs; a run
    cancelled at a limit counts with the time it was cancelled at (a lower bound)."""
    times: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in reports:
        config = r["scenario"]["name"].split("-", 1)[1]
        times[config][r["scenario"]["link_mbit"]].append(r["result"]["total_time"] / 1000)
    return {c: {m: statistics.fmean(v) for m, v in sorted(by.items())} for c, by in times.items()}


def render_sweep(reports: list[dict[str, Any]], png: Path, title: str) -> Path:
    points = sweep_points(reports)
    fig = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    original = points.get("original", {})
    for config, by_mbit in points.items():
        mbit = list(by_mbit)
        top.plot(mbit, list(by_mbit.values()), marker="o", label=config)
        if original and config != "original":
            ratio = [by_mbit[m] / original[m] for m in mbit if m in original]
            bottom.plot([m for m in mbit if m in original], ratio, marker="o", label=config)
    top.set_ylabel("total time (s)")
    top.set_title(title)
    top.legend()
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("ratio to original")
    bottom.set_xlabel("link (Mbit/s)")
    bottom.legend()
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png
