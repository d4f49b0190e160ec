"""The comparison table: one row per run label, repeats of a label summarised as mean ± spread.

Pure functions of loaded reports (see report.py), so `pyvmm bench table` and the HTML page
written by plot.py show the same numbers.
"""

from __future__ import annotations

import statistics
from typing import Any

from pyvmm.bench import report

HEADER = (
    "run",
    "runs",
    "completed",
    "total time (s)",
    "downtime (ms)",
    "dirty syncs",
    "iterations",
    "max throttle (%)",
)


def summarize(values: list[float]) -> str:
    """ "-" for nothing, the value for one, "mean ± pstdev" (1 decimal) for several."""
    if not values:
        return "-"
    if len(values) == 1:
        value = float(values[0])
        return str(int(value)) if value.is_integer() else f"{value:.1f}"
    # Population spread: the repeats are all the runs there are, not a sample of more.
    return f"{statistics.fmean(values):.1f} ± {statistics.pstdev(values):.1f}"


def group(reports: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Reports by label, labels in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        groups.setdefault(report.label(r), []).append(r)
    return groups


def total_time(results: list[dict[str, Any]]) -> str:
    done = [r["total_time"] / 1000 for r in results if r["status"] == "completed"]
    if done:
        return summarize(done)
    # No run finished: its time says only when it was stopped, a lower bound.
    longest = max(r["total_time"] for r in results) / 1000
    why = "/".join(sorted({r["status"] for r in results}))
    return f"> {summarize([longest])} ({why})"


def rows(reports: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The table's cells as text, one tuple per label, in HEADER's column order."""
    out = []
    for name, runs in group(reports).items():
        results = [r["result"] for r in runs]
        completed = [r for r in results if r["status"] == "completed"]
        downtimes = [r["downtime"] for r in completed if r["downtime"] is not None]
        out.append(
            (
                name,
                str(len(results)),
                f"{len(completed)}/{len(results)}",
                total_time(results),
                summarize(downtimes),
                summarize([r["dirty_syncs"] for r in results]),
                summarize([r["iteration_count"] for r in results]),
                summarize([r["max_throttle_pcent"] for r in results]),
            )
        )
    return out


def markdown(reports: list[dict[str, Any]]) -> str:
    """The comparison table in Markdown, padded so that it also reads as plain text."""
    return render(HEADER, rows(reports))


def render(header: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    """A Markdown table, padded so that it also reads as plain text."""
    body = [tuple(cell.replace("|", "\\|") for cell in row) for row in cells]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        # The label column reads left to right; the numbers line up on the right.
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(row) for row in body)]) + "\n"
