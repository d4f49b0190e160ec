"""The 2024 auto-converge series' experiment: its published figures and its table layout.

The figures are the v1 cover letter's ("migration: auto-converge refinements for huge
VM", v1 0/7, Hyman Huang, qemu-devel, 16 Sep 2024): guestperf on a 16-vCPU, 100 GB guest
over a 1.59 Gbit/s link, `--downtime 500 --auto-converge --auto-converge-step 10`, the
stress tool rewriting 150 (light), 3000 (moderate) or 5000 (heavy) MB per vCPU, three
runs each; times in ms. `table()` prints pyvmm's runs in the same layout (total time,
downtime, iteration count, max throttle) with each configuration's ratio to `original`
beside the series' own ratio.
"""

from __future__ import annotations

import statistics
from typing import Any

from pyvmm.bench.table import render, summarize, total_time

V1_STRESS_MB = {"light": 150, "moderate": 3000, "heavy": 5000}  # per vCPU

# load -> configuration -> three runs: (total time ms, downtime ms, iteration count, max %)
V1_TABLE: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {
    "light": {
        "original": [(123685, 490, 87, 99), (116249, 542, 45, 60), (107772, 587, 8, 0)],
        "background": [(113744, 1654, 16, 20), (122623, 758, 60, 80), (112668, 547, 23, 20)],
        "background-responsive": [
            (113660, 573, 5, 0), (109357, 576, 6, 0), (126792, 494, 37, 99),
        ],
    },
    "moderate": {
        "original": [(404398, 515, 26, 99), (392552, 528, 25, 99), (400113, 447, 24, 99)],
        "background": [(239151, 681, 25, 99), (295047, 587, 41, 99), (289936, 681, 34, 99)],
        "background-responsive": [
            (212786, 487, 22, 99), (225246, 666, 23, 99), (244053, 572, 27, 99),
        ],
    },
    "heavy": {
        "original": [(566357, 644, 22, 99), (607471, 320, 23, 99), (603136, 417, 22, 99)],
        "background": [(284605, 793, 27, 99), (272270, 668, 28, 99), (267543, 545, 28, 99)],
        "background-responsive": [
            (226446, 413, 22, 99), (232082, 494, 23, 99), (269863, 533, 23, 99),
        ],
    },
}  # fmt: skip

# pyvmm's rows: configuration name -> what it is
CONFIGS = {
    "original": "original: syncs once per pass (x-auto-converge-sync=iteration, QEMU <= 9.1)",
    "background": "background sync (v1's watcher, x-auto-converge-sync=background)",
    "background-responsive": "background sync + responsive (cpu-responsive-throttle)",
    "rfc-periodic": "the RFC's periodic throttle (cpu-periodic-throttle, 5 s)",
    "timer-9.2": "QEMU 9.2's 5 s timer (x-auto-converge-sync=timer)",
    "2013": "QEMU 1.6's 2013 mode (x-auto-converge-legacy)",
    "dirty-limit": "dirty limit (pyvmm's virtual ring, 16 MB/s)",
}

HEADER = (
    "configuration",
    "runs",
    "total time (s)",
    "downtime (ms)",
    "iteration count",
    "max throttle (%)",
    "ratio to original",
    "series' total time (s)",
    "series' iterations",
    "series' ratio",
)


def v1_ratio(load: str, config: str) -> float | None:
    """The series' mean total time of `config` over that of `original`, or None."""
    rows = V1_TABLE.get(load, {})
    if config not in rows:
        return None
    mean = statistics.fmean(r[0] for r in rows[config])
    return mean / statistics.fmean(r[0] for r in rows["original"])


def v1_figures(load: str, config: str) -> tuple[str, str]:
    """The series' own mean total time (s) and iteration count for a row, or dashes."""
    rows = V1_TABLE.get(load, {}).get(config)
    if not rows:
        return "-", "-"
    return (f"{statistics.fmean(r[0] for r in rows) / 1000:.1f}",
            f"{statistics.fmean(r[2] for r in rows):.1f}")  # fmt: skip


def _split(name: str) -> tuple[str, str]:
    load, _, config = name.partition("-")
    return load, config


def _ratio(results: list[dict[str, Any]], original_s: float | None) -> str:
    if not original_s:
        return "-"
    done = [r["total_time"] / 1000 for r in results if r["status"] == "completed"]
    if not done:  # stopped before it converged: a lower bound
        return f"> {max(r['total_time'] for r in results) / 1000 / original_s:.2f}"
    ratio = f"{statistics.fmean(done) / original_s:.2f}"
    return ratio if len(done) == len(results) else f"{ratio} ({len(done)}/{len(results)})"


def table(reports: list[dict[str, Any]]) -> str:
    """One table per load, in the v1 cover letter's layout, with the ratios."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    shapes: dict[str, str] = {}
    for r in reports:
        load, config = _split(r["scenario"]["name"])
        vmm = r["hardware"]["vmm"]
        key = config if vmm == "pyvmm" else f"{config} [{vmm}]"
        groups.setdefault(load, {}).setdefault(key, []).append(r["result"])
        hw, mib_s = r["hardware"], r["scenario"]["bandwidth"]
        link_mbit = r["scenario"]["link_mbit"]
        if link_mbit:  # a shaped link slower than max-bandwidth decides the pass
            mib_s = min(mib_s, round(link_mbit * 1e6 / 8 / (1 << 20)))
        ws = hw["stress_mem"] or hw["mem"] // hw["cpus"]
        shapes.setdefault(load, f"{hw['cpus']} vCPUs x {ws} MiB at {mib_s} MiB/s, a pass "
                                f"over them {hw['cpus'] * ws / mib_s:.0f} s")  # fmt: skip
    out = []
    for load, by_config in groups.items():
        original = by_config.get("original", [])
        done = [r["total_time"] / 1000 for r in original if r["status"] == "completed"]
        original_s = statistics.fmean(done) if done else None
        order = {c: i for i, c in enumerate(CONFIGS)}
        rows = []
        for config in sorted(by_config, key=lambda c: (c.endswith("]"), order.get(c, 99))):
            results = by_config[config]
            completed = [r for r in results if r["status"] == "completed"]
            theirs = v1_ratio(load, config)
            rows.append((
                config,
                str(len(results)),
                total_time(results),
                summarize([r["downtime"] for r in completed if r["downtime"] is not None]),
                summarize([r["iteration_count"] for r in results]),
                summarize([r["max_throttle_pcent"] for r in results]),
                _ratio(results, original_s),
                *v1_figures(load, config),
                "-" if theirs is None else f"{theirs:.2f}",
            ))  # fmt: skip
        stress = V1_STRESS_MB.get(load)
        series = f"; the series: {stress} MB of stress" if stress else ""
        out += [f"**{load}** ({shapes[load]}{series})", "", render(HEADER, rows)]
    return "\n".join(out)
