"""`pyvmm sim calibrate`: the same configurations run for real (`pyvmm bench`'s engine) and
in simulation, side by side with the relative error.

The one figure the simulation takes from the real runs is the guest's unthrottled dirty
rate, measured from the source's dirty-pages-rate (unthrottled_rate_mib_s), averaged
over the real runs. One SimModel then serves every row.
"""

from __future__ import annotations

import fnmatch
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pyvmm.bench import report
from pyvmm.bench.batch import selected as bench_selected
from pyvmm.bench.display import Quiet
from pyvmm.bench.engine import RunOptions, run
from pyvmm.bench.scenario import (
    Hardware,
    Scenario,
    ScenarioError,
    hardware_from_dict,
    scenario_from_dict,
)
from pyvmm.bench.table import render
from pyvmm.sim.engine import simulate
from pyvmm.sim.model import SimModel

PAGE_SIZE = 4096


@dataclass
class Pair:
    name: str
    real: dict[str, Any]
    sim: dict[str, Any] | None = None


def unthrottled_rate_mib_s(rpt: dict[str, Any]) -> float | None:
    """MiB/s of pages each vCPU newly dirties when nothing throttles it, from the source's
    own dirty-pages-rate: the highest that any period showed, divided by the share of time
    the throttle left the guest in that period (rate / (1 - p)).

    memstress's store rate is not it: under tracking every first write to a page after a
    sync faults (tens of microseconds here, docs/convergence.md), so the rate at which a
    guest dirties *new* pages is the fault rate, not its store rate, and unthrottled it is
    often capped by the working set (the whole set is dirty every period). The period that
    tells is one where the throttle brought the guest below that cap."""
    cpus = rpt["hardware"]["cpus"]
    best, prev_rate, prev_pct = 0.0, 0, 0
    for p in rpt["progress_history"]:
        rate = p["ram"]["dirty_pages_rate"]
        if rate != prev_rate and rate > 0:  # a period closed; prev_pct ruled it
            best = max(best, rate / max(1 - prev_pct / 100, 0.01))
        prev_rate, prev_pct = rate, p["throttle_pcent"]
    if best <= 0:
        return None
    return best * PAGE_SIZE / (1 << 20) / cpus


def selected_runs(
    names: list[str], filter_: str, max_time: int | None
) -> list[tuple[str, Scenario, Hardware]]:
    """The bench comparisons' runs that the simulator can model (no dirty limit)."""
    runs = []
    for comp in bench_selected(names):
        for scenario, hw in comp.runs:
            tag = f"{comp.name}/{scenario.name}"
            if scenario.dirty_limit or not fnmatch.fnmatch(tag, filter_):
                continue
            if max_time is not None:
                scenario = replace(scenario, max_time=min(scenario.max_time, max_time))
            runs.append((tag, scenario, hw))
    return runs


def real_runs(
    runs: list[tuple[str, Scenario, Hardware]], out: Path, sleep_s: float,
    say: Callable[[str], None],
) -> list[Pair]:  # fmt: skip
    """Run each configuration for real, or reuse its report from an earlier calibration."""
    pairs = []
    for tag, scenario, hw in runs:
        path = out / f"{tag}-real.json"
        if path.exists():
            rpt = report.load(path)
            say(f"{tag}: real run kept from {path}")
        else:
            say(f"{tag}: real run")
            rpt = run(scenario, hw, RunOptions("pyvmm", sleep_s), Quiet())
            report.write(rpt, path)
        pairs.append(Pair(tag, rpt))
    return pairs


def simulate_pairs(pairs: list[Pair], model: SimModel) -> None:
    for pair in pairs:
        scenario = scenario_from_dict(pair.real["scenario"])
        hw = hardware_from_dict(pair.real["hardware"])
        pair.sim = simulate(scenario, hw, model)


def _err(real: float, sim: float) -> str:
    return f"{(sim - real) / real * 100:+.1f} %" if real else "-"


HEADER = (
    "configuration", "status (real / sim)", "total time real (s)", "sim (s)", "error",
    "iterations real", "sim", "diff", "max throttle real (%)", "sim (%)",
)  # fmt: skip


def table(pairs: list[Pair]) -> str:
    rows = []
    for p in pairs:
        assert p.sim is not None
        r, s = p.real["result"], p.sim["result"]
        rows.append((
            p.name, f"{r['status']} / {s['status']}",
            f"{r['total_time'] / 1000:.1f}", f"{s['total_time'] / 1000:.1f}",
            _err(r["total_time"], s["total_time"]),
            str(r["iteration_count"]), str(s["iteration_count"]),
            f"{s['iteration_count'] - r['iteration_count']:+d}",
            str(r["max_throttle_pcent"]), str(s["max_throttle_pcent"]),
        ))  # fmt: skip
    return render(HEADER, rows)


def measured_model(pairs: list[Pair], base: SimModel) -> tuple[SimModel, list[float]]:
    rates = [r for p in pairs if (r := unthrottled_rate_mib_s(p.real)) is not None]
    if not rates:
        raise ScenarioError(
            "no real run closed a dirty-rate period (a sync >= 1 s after the previous one): "
            "cannot measure the guest's rate"
        )
    return replace(base, guest_rate_mib_s=statistics.fmean(rates)), rates
