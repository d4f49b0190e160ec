"""`pyvmm bench plot` and `table` on synthetic reports: no KVM, no VMM, no network."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import image

from pyvmm.bench import plot, report, series, table

T0 = 1_700_000_000.0
MIB = 1 << 20


def make_report(
    name: str = "perfreport",
    *,
    vmm: str = "pyvmm",
    status: str = "completed",
    total_s: float = 10.0,
    downtime: int | None = 120,
    syncs: int = 5,
    iterations: int | None = None,
    max_throttle: int = 40,
    cpus: int = 2,
    rate: float = 100.0,  # MiB/s per vCPU
    timings: bool = True,
) -> dict[str, Any]:
    """A schema-valid report: 41 progress samples; guest timings every second per vCPU,
    as memstress prints them."""
    n = 40
    step = total_s / n
    history = []
    for i in range(n + 1):
        frac = i / n
        history.append(
            {
                "now": T0 + i * step,
                "elapsed": i * step,
                "status": status if i == n else "active",
                "total_time": int(i * step * 1000),
                "downtime": (downtime or 0) if i == n else 0,
                "expected_downtime": 300,
                "setup_time": 5,
                "throttle_pcent": min(max_throttle, int(frac * max_throttle * 1.5)),
                "dirty_limit_throttle_time_per_round": 0,
                "dirty_limit_ring_full_time": 0,
                "ram": {
                    "transferred": int(frac * 600 * MIB),
                    "remaining": int((1 - frac) * 512 * MIB),
                    "total": 1280 * MIB,
                    "duplicate": 1000,
                    "normal": 2000,
                    "normal_bytes": 2000 * 4096,
                    "dirty_pages_rate": int(rate * cpus * MIB / 4096 * (1 - frac / 2)),
                    "mbps": 4000.0,
                    "dirty_sync_count": 1 + int(frac * (syncs - 1)),
                    "iteration_count": 1 + int(frac * ((iterations or syncs) - 1)),
                },
            }
        )
    guest: dict[str, dict[str, list[dict[str, Any]]]] = {"src": {}, "dst": {}}
    if timings:
        switchover = total_s - 0.5
        for vcpu in range(cpus):
            # Start before `migrate`, stagger the vCPUs, continue the counter on the dst.
            ts = np.arange(-1.0, total_s + 2.0, 1.0) + 0.37 * vcpu
            for t in ts:
                side = "src" if t < switchover else "dst"
                sample = {"t": T0 + float(t), "mib": int(rate * (t + 1.0))}
                guest[side].setdefault(str(vcpu), []).append(sample)
    r = {
        "version": report.VERSION,
        "scenario": {
            "name": name,
            "downtime": 500,
            "bandwidth": 125000,
            "max_iters": 30,
            "max_time": 300,
            "auto_converge": True,
            "auto_converge_step": 10,
            "dirty_limit": False,
            "x_vcpu_dirty_limit_period": 500,
            "vcpu_dirty_limit": 1,
            "sync": "timer",
            "periodic_throttle": False,
            "responsive": False,
            "auto_converge_legacy": False,
            "link_mbit": 0,
            "transport": "unix",
        },
        "hardware": {
            "cpus": cpus,
            "mem": 1024,
            "dirty_ring_size": 0,
            "stress_mem": 0,
            "stress_rate": 0,
            "stress_pattern": "word",
            "vmm": vmm,
            "binary": "/usr/bin/qemu-system-x86_64" if vmm == "qemu" else "pyvmm",
            "vmm_version": "9.2.0" if vmm == "qemu" else "0.1.0",
            "host": {
                "kernel": "6.8.0",
                "cpu_model": "Test CPU <&>",
                "cpus": 8,
                "tsc_khz": 2_000_000,
                "python": "3.11.9",
            },
        },
        "progress_history": history,
        "guest_timings": guest,
        "vcpu_cpu": {
            "src": {str(v): [{"t": T0, "cpu_ms": 1.0, "tid": 100 + v}] for v in range(cpus)},
            "dst": {},
        },
        "result": {
            "status": status,
            "success": status == "completed",
            "cancelled": status == "cancelled",
            "cancel_reason": "max-time" if status == "cancelled" else None,
            "error": None,
            "started_at": T0,
            "total_time": int(total_s * 1000),
            "downtime": downtime if status == "completed" else None,
            "dirty_syncs": syncs,
            "iteration_count": syncs if iterations is None else iterations,
            "max_throttle_pcent": max_throttle,
            "transferred_bytes": 600 * MIB,
        },
    }
    report.validate(r)
    return r


@pytest.fixture
def reports() -> list[dict[str, Any]]:
    return [
        make_report("ac", total_s=10.0, downtime=100, syncs=4),
        make_report("ac", total_s=20.0, downtime=300, syncs=6),
        make_report("precopy", status="cancelled", total_s=30.0, syncs=30, max_throttle=0),
        make_report("ac", vmm="qemu", total_s=12.0, downtime=200),
    ]


def test_guest_rate_sums_vcpus_across_switchover() -> None:
    r = make_report(cpus=2, rate=100.0)
    edges, rate = plot.guest_rate(r)
    # Two staggered vCPUs over the span both cover: each one's samples are edges.
    assert len(edges) == len(rate) + 1 > 20
    # The source and destination halves join into one series: no gap at the switchover.
    assert edges[0] < 0 < 9.5 < edges[-1]
    assert rate == pytest.approx(np.full(len(rate), 200.0), abs=3.0)  # whole-MiB counters


def test_render_writes_png_and_self_contained_html(
    tmp_path: Path, reports: list[dict[str, Any]]
) -> None:
    png, html_path = plot.render(reports, tmp_path / "cmp.png")
    assert (png, html_path) == (tmp_path / "cmp.png", tmp_path / "cmp.html")
    pixels = image.imread(png)
    height, width = pixels.shape[:2]
    assert width >= 1000 and height >= 600

    page = html_path.read_text()
    assert "<title>" in page and "<h1>" in page and "<svg" in page
    assert not re.search(r"<script[^>]*\ssrc=", page)
    assert not re.search(r"<link[^>]*\shref=", page)
    assert not re.search(r"<image[^>]*href=\"https?:", page)
    # Text from the reports is escaped, and every report gets its own table.
    assert "Test CPU &lt;&amp;&gt;" in page and "Test CPU <&>" not in page
    assert page.count("<h3>") == len(reports)
    for name in ("ac", "ac #2", "precopy", "ac [qemu]"):
        assert f"<h3>{name}</h3>" in page


def test_render_without_guest_timings(tmp_path: Path) -> None:
    r = make_report(timings=False)
    assert plot.guest_rate(r)[0].size == 0
    # A run that failed before its first progress sample has nothing to draw either.
    bare = make_report("bare", status="failed", timings=False)
    bare["progress_history"] = []
    bare["result"]["error"] = "destination exited"
    report.validate(bare)
    png, html_path = plot.render([r, bare], tmp_path / "out" / "one.png")
    assert image.imread(png).shape[1] >= 1000
    assert "failed: destination exited" in html_path.read_text()


def test_render_needs_a_report(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one report"):
        plot.render([], tmp_path / "none.png")
    assert not list(tmp_path.iterdir())


def test_table_one_row_per_label(reports: list[dict[str, Any]]) -> None:
    lines = table.markdown(reports).splitlines()
    header, rule, *rows = lines
    assert [c.strip() for c in header.strip("|").split("|")] == list(table.HEADER)
    assert re.fullmatch(r"\|(-+:?\|)+", rule)
    assert [row.split("|")[1].strip() for row in rows] == ["ac", "precopy", "ac [qemu]"]


def test_table_mean_and_spread(reports: list[dict[str, Any]]) -> None:
    cells = {row[0]: row for row in table.rows(reports)}
    _, runs, completed, total, downtime, syncs, iterations, throttle = cells["ac"]
    assert (runs, completed) == ("2", "2/2")
    assert total == "15.0 ± 5.0"
    assert downtime == "200.0 ± 100.0"
    assert syncs == iterations == "5.0 ± 1.0"
    assert throttle == "40.0 ± 0.0"
    # One run: the value alone.
    assert cells["ac [qemu]"][3:5] == ("12", "200")
    # Nothing completed: a lower bound on the time, and no downtime.
    assert cells["precopy"][2:5] == ("0/1", "> 30 (cancelled)", "-")


def test_table_counts_only_completed_runs() -> None:
    runs = [
        make_report("mix", total_s=8.0, downtime=50),
        make_report("mix", status="cancelled", total_s=300.0),
    ]
    (row,) = table.rows(runs)
    assert row[2:5] == ("1/2", "8", "50")


def test_summarize() -> None:
    assert table.summarize([]) == "-"
    assert table.summarize([3.0]) == "3"
    assert table.summarize([2.5]) == "2.5"
    assert table.summarize([10.0, 20.0]) == "15.0 ± 5.0"


def test_markdown_escapes_pipes() -> None:
    text = table.markdown([make_report("a|b")])
    assert "a\\|b" in text
    assert all(line.count("|") - line.count("\\|") == 9 for line in text.splitlines())


def test_series_2024_table_in_the_v1_layout_with_both_ratios() -> None:
    """pyvmm bench batch series-2024 prints, per load, the v1 cover letter's columns and
    each configuration's ratio to original beside the series' own mean total time,
    iteration count and ratio."""
    runs = [
        make_report("heavy-original", total_s=300.0, syncs=20, iterations=20, max_throttle=99),
        make_report("heavy-original", total_s=310.0, syncs=21, iterations=21, max_throttle=99),
        make_report("heavy-background", total_s=122.0, syncs=40, iterations=12),
        make_report("heavy-background-responsive", total_s=91.5, syncs=30, iterations=9),
        make_report("heavy-2013", status="cancelled", total_s=290.0, max_throttle=0),
        make_report("heavy-original", vmm="qemu", total_s=320.0),
        make_report("light-original", total_s=100.0),
        make_report("light-background", total_s=100.0),
    ]
    for r in runs:
        r["hardware"]["stress_mem"] = 1024 if r["scenario"]["name"].startswith("heavy") else 384
        r["scenario"]["bandwidth"] = 64
    text = series.table(runs)
    assert "**heavy** (2 vCPUs x 1024 MiB at 64 MiB/s, a pass over them 32 s; the series: " \
        "5000 MB of stress)" in text  # fmt: skip
    header = next(line for line in text.splitlines() if line.startswith("| configuration"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(series.HEADER)
    heavy = text[: text.index("**light**")]
    rows = {
        cells[0]: cells
        for line in heavy.splitlines()
        if line.startswith("| ") and not line.startswith("| configuration")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert rows["original"][1:] == ["2", "305.0 ± 5.0", "120.0 ± 0.0", "20.5 ± 0.5",
                                    "99.0 ± 0.0", "1.00", "592.3", "22.3", "1.00"]  # fmt: skip
    assert rows["background"][4] == "12"
    assert rows["background"][6:] == ["0.40", "274.8", "27.7", "0.46"]
    assert rows["background-responsive"][6:] == ["0.30", "242.8", "22.7", "0.41"]
    assert rows["2013"][2] == "> 290 (cancelled)"
    assert rows["2013"][6:] == ["> 0.95", "-", "-", "-"]
    assert rows["original [qemu]"][6:] == ["1.05", "-", "-", "-"]
    # The light table has its own original and the series' light ratios.
    light = text[text.index("**light**") :]
    assert re.search(r"\| background +\|.*\| +1\.00 \| +116\.3 \| +33\.0 \| +1\.00 \|$", light,
                     re.MULTILINE)  # fmt: skip


def test_series_ratios_are_the_cover_letters() -> None:
    """The v1 cover letter's means: background 1.00 / 0.69 / 0.46, with responsive
    1.01 / 0.57 / 0.41 of original (light / moderate / heavy)."""
    got = {
        (load, config): round(series.v1_ratio(load, config) or 0, 2)
        for load in ("light", "moderate", "heavy")
        for config in ("background", "background-responsive")
    }
    assert got == {
        ("light", "background"): 1.0, ("light", "background-responsive"): 1.01,
        ("moderate", "background"): 0.69, ("moderate", "background-responsive"): 0.57,
        ("heavy", "background"): 0.46, ("heavy", "background-responsive"): 0.41,
    }  # fmt: skip
    assert series.v1_ratio("heavy", "timer-9.2") is None
