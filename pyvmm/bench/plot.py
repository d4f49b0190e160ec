"""The comparison chart: a PNG, and a self-contained HTML page with the same chart as SVG.

Top: the guest's own update rate (what the workload achieved) and the throttle applied to
it. Bottom: the dirty rate migration measured and the RAM it still had to send. Time is
seconds since `migrate`, on the host's epoch clock that every sample in a report carries.
A Figure with its own Agg canvas, not pyplot: no global backend or figure registry.
"""

from __future__ import annotations

import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from pyvmm.bench import report, table

MIB = 1 << 20
PAGE = 4096  # dirty_pages_rate counts target pages
FIGSIZE = (12.0, 7.0)  # inches; at DPI, 1200x700 pixels
DPI = 100
THROTTLE_STYLE = "--"
REMAINING_STYLE = "-."
SYNC_STYLE = ":"
SVG_METADATA = ("Creator", "Date", "Format", "Type")  # None drops each; all gone, no RDF


@dataclass
class Series:
    """One report's curves, every time in seconds since its `migrate`."""

    label: str
    color: Any
    guest_t: np.ndarray  # interval edges: len(guest_rate) + 1
    guest_rate: np.ndarray  # MiB/s summed over vCPUs
    t: np.ndarray  # progress samples
    throttle: np.ndarray  # %
    dirty_rate: np.ndarray  # MiB/s
    remaining: np.ndarray  # MiB
    syncs: list[float] = field(default_factory=list)  # when dirty_sync_count went up
    end: float = 0.0
    outcome: str = ""


def guest_rate(r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(edges, MiB/s) of the guest's total update rate, summed over its vCPUs.

    Each vCPU's counter is cumulative across the switchover, so its source samples followed
    by its destination samples are one series. Each series is interpolated linearly onto the
    union of all sample times, which sums the vCPUs' piecewise-constant rates exactly even
    though they were sampled at slightly different moments. Only the span every vCPU covers
    is kept: outside it a missing vCPU would read as a drop in rate.
    """
    t0 = r["result"]["started_at"]
    per_vcpu: list[tuple[np.ndarray, np.ndarray]] = []
    timings = r["guest_timings"]
    for vcpu in sorted({v for side in report.SIDES for v in timings[side]}, key=int):
        samples = [s for side in report.SIDES for s in timings[side].get(vcpu, [])]
        t = np.array([s["t"] - t0 for s in samples], dtype=float)
        mib = np.array([s["mib"] for s in samples], dtype=float)
        t, first = np.unique(t, return_index=True)  # sorted; a repeated instant adds nothing
        if len(t) >= 2:
            per_vcpu.append((t, mib[first]))
    empty = np.empty(0)
    if not per_vcpu:
        return empty, empty
    lo = max(t[0] for t, _ in per_vcpu)
    hi = min(t[-1] for t, _ in per_vcpu)
    edges = np.unique(np.concatenate([t for t, _ in per_vcpu]))
    edges = edges[(edges >= lo) & (edges <= hi)]
    if len(edges) < 2:
        return empty, empty
    total = sum(np.interp(edges, t, mib) for t, mib in per_vcpu)
    return edges, np.diff(total) / np.diff(edges)


def _outcome(result: dict[str, Any]) -> str:
    if result["status"] == "completed":
        return f"completed, {result['total_time'] / 1000:.1f} s"
    if result["status"] == "cancelled" and result["cancel_reason"]:
        return f"cancelled ({result['cancel_reason']})"
    return result["status"]


def series(r: dict[str, Any], name: str, color: Any) -> Series:
    t0 = r["result"]["started_at"]
    history = r["progress_history"]
    edges, rate = guest_rate(r)
    syncs, count = [], 0
    for p in history:
        if p["ram"]["dirty_sync_count"] > count:
            syncs.append(p["now"] - t0)
        count = max(count, p["ram"]["dirty_sync_count"])
    return Series(
        label=name,
        color=color,
        guest_t=edges,
        guest_rate=rate,
        t=np.array([p["now"] - t0 for p in history], dtype=float),
        throttle=np.array([p["throttle_pcent"] for p in history], dtype=float),
        dirty_rate=np.array([p["ram"]["dirty_pages_rate"] * PAGE / MIB for p in history]),
        remaining=np.array([p["ram"]["remaining"] / MIB for p in history], dtype=float),
        syncs=syncs,
        end=r["result"]["total_time"] / 1000,
        outcome=_outcome(r["result"]),
    )


def _names(reports: list[dict[str, Any]]) -> list[str]:
    """Legend names: the label, numbered from the second run with that label on."""
    seen: dict[str, int] = {}
    names = []
    for r in reports:
        name = report.label(r)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return names


def figure(reports: list[dict[str, Any]]) -> Figure:
    if not reports:
        raise ValueError("at least one report is needed")
    palette = matplotlib.colormaps["tab10" if len(reports) <= 10 else "tab20"].colors
    runs = [
        series(r, name, palette[i % len(palette)])
        for i, (r, name) in enumerate(zip(reports, _names(reports), strict=True))
    ]

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    throttle = top.twinx()
    remaining = bottom.twinx()
    for s in runs:
        if len(s.guest_rate):
            top.stairs(s.guest_rate, s.guest_t, color=s.color, linewidth=1.2, baseline=None)
        throttle.step(s.t, s.throttle, where="post", color=s.color, linestyle=THROTTLE_STYLE)
        bottom.plot(s.t, s.dirty_rate, color=s.color, linewidth=1.2)
        remaining.plot(s.t, s.remaining, color=s.color, linestyle=REMAINING_STYLE)
        for ax in (top, bottom):
            for x in s.syncs:
                ax.axvline(x, color=s.color, linestyle=SYNC_STYLE, linewidth=0.8, alpha=0.6)
            ax.axvline(s.end, color=s.color, linewidth=0.8)
    _annotate_ends(top, runs)

    top.set_ylabel("guest update rate (MiB/s)")
    throttle.set_ylabel("throttle (%)")
    throttle.set_ylim(0, 105)
    bottom.set_ylabel("dirty rate (MiB/s)")
    remaining.set_ylabel("remaining (MiB)")
    bottom.set_xlabel("time since migrate (s)")
    for ax in (top, bottom, remaining):
        # Headroom: a steady curve at its maximum would otherwise run along the frame.
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)

    grey = "0.4"
    handles = [Line2D([], [], color=s.color, label=s.label) for s in runs] + [
        Line2D([], [], color=grey, label="guest rate, dirty rate"),
        Line2D([], [], color=grey, linestyle=THROTTLE_STYLE, label="throttle"),
        Line2D([], [], color=grey, linestyle=REMAINING_STYLE, label="remaining"),
        Line2D([], [], color=grey, linestyle=SYNC_STYLE, label="dirty sync"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5))
    fig.suptitle("Migration comparison")
    return fig


def _annotate_ends(ax: Axes, runs: list[Series]) -> None:
    # x in data, y as a fraction of the axes: the text stays at the top whatever the scale.
    where = blended_transform_factory(ax.transData, ax.transAxes)
    for s in runs:
        ax.text(
            s.end, 0.98, f" {s.label}: {s.outcome}", transform=where, color=s.color,
            rotation=90, ha="right", va="top", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
        )  # fmt: skip


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    # Fixed hash salt and no metadata (a date, RDF namespaces): same reports, same page.
    with matplotlib.rc_context({"svg.hashsalt": "pyvmm-bench"}):
        fig.savefig(buf, format="svg", metadata=dict.fromkeys(SVG_METADATA))
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: invalid inside HTML


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def _details(r: dict[str, Any]) -> list[tuple[str, str]]:
    sc, hw, res = r["scenario"], r["hardware"], r["result"]
    downtime = "-" if res["downtime"] is None else f"{res['downtime']} ms"
    status = _outcome(res) + (f": {res['error']}" if res["error"] else "")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(res["started_at"]))
    auto = _onoff(sc["auto_converge"])
    if sc["auto_converge"]:
        auto += f", step {sc['auto_converge_step']}%"
    limit = _onoff(sc["dirty_limit"])
    if sc["dirty_limit"]:
        limit += f", {sc['vcpu_dirty_limit']} MB/s, period {sc['x_vcpu_dirty_limit_period']} ms"
    link = f"{sc['link_mbit']} Mbit/s" if sc["link_mbit"] else "unshaped"
    host = hw["host"]
    return [
        ("label", report.label(r)),
        ("vmm", f"{hw['vmm']} {hw['vmm_version']}"),
        ("binary", hw["binary"]),
        ("host", f"{host['cpu_model']}, {host['cpus']} CPUs, Linux {host['kernel']}"),
        ("started", started),
        ("status", status),
        ("total time", f"{res['total_time'] / 1000:.1f} s"),
        ("downtime", downtime),
        ("dirty syncs", str(res["dirty_syncs"])),
        ("iterations", str(res["iteration_count"])),
        ("max throttle", f"{res['max_throttle_pcent']}%"),
        ("transferred", f"{res['transferred_bytes'] / MIB:.1f} MiB"),
        ("bandwidth", f"{sc['bandwidth']} MiB/s"),
        ("downtime limit", f"{sc['downtime']} ms"),
        ("max iters / max time", f"{sc['max_iters']} / {sc['max_time']} s"),
        ("transport", f"{sc['transport']}, {link}"),
        ("cpus", str(hw["cpus"])),
        ("mem", f"{hw['mem']} MiB"),
        ("dirty ring", f"{hw['dirty_ring_size']} entries" if hw["dirty_ring_size"] else "off"),
        ("stress mem", f"{hw['stress_mem']} MiB/vCPU" if hw["stress_mem"] else "mem / cpus"),
        ("stress rate", f"{hw['stress_rate']} MiB/s/vCPU" if hw["stress_rate"] else "flat out"),
        ("stress pattern", hw["stress_pattern"]),
        ("auto-converge", auto),
        ("sync (x-auto-converge-sync)", sc["sync"]),
        ("periodic throttle (RFC)", _onoff(sc["periodic_throttle"])),
        ("responsive", _onoff(sc["responsive"])),
        ("2013 mode", _onoff(sc["auto_converge_legacy"])),
        ("dirty limit", limit),
    ]


def _table(head: tuple[str, ...] | None, body: list[tuple[str, ...]]) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
section { display: inline-block; vertical-align: top; margin-right: 1.5em; }
"""


def page(reports: list[dict[str, Any]], fig: Figure) -> str:
    title = "Migration comparison"
    sections = [
        f"<section><h3>{html.escape(name)}</h3>\n{_table(None, _details(r))}</section>"
        for r, name in zip(reports, _names(reports), strict=True)
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8">',
            f"<title>{title}</title>",
            f"<style>{STYLE}</style></head>",
            "<body>",
            f"<h1>{title}</h1>",
            _svg(fig),
            "<h2>Summary</h2>",
            _table(table.HEADER, table.rows(reports)),
            "<h2>Runs</h2>",
            *sections,
            "</body>",
            "</html>",
            "",
        ]
    )


def render(reports: list[dict[str, Any]], png: Path) -> tuple[Path, Path]:
    """Write the chart to `png` and the HTML page beside it; return both paths."""
    png = Path(png)
    html_path = png.with_suffix(".html")
    if html_path == png:
        raise ValueError(f"{png}: the chart cannot go where its HTML page goes")
    fig = figure(reports)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png")
    html_path.write_text(page(reports, fig))
    return png, html_path
