"""`pyvmm sim calibrate`: the same configurations run for real (`pyvmm bench`'s engine) and
in simulation, side by side with the relative error.

What the simulation takes from the real guest is measured on it (measure_guest): its
dirty rate under tracking, unthrottled, and how a CPU throttle slows it. A pyvmm machine
of the configuration's guest runs in this process, memstress reaches steady state, and
new pages are counted over short windows through an eager dirty view (what calc-dirty-rate
does in dirty-bitmap mode). That rate is not memstress's store rate: every first write to
a page after a sync faults (tens of microseconds on this host, docs/convergence.md). Then
pyvmm's own CpuThrottle holds the guest at 50 to 99 %: at p % each vCPU should write for
10 ms in every 10 ms / (1 - p), so the rate it keeps says how much of each 10 ms it loses
after waking from its sleep (the wake lag, SimModel.wake_lag_ms). Each guest is measured
once; everything else is one SimModel for every row.

The real side is either run here (DIR/COMPARISON/NAME-real.json, reused when present) or
taken from a `pyvmm bench batch` output directory (--real DIR: every repeat of each
configuration; the simulation is compared with their mean).
"""

from __future__ import annotations

import fnmatch
import io
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyvmm.bench import report
from pyvmm.bench.batch import selected as bench_selected
from pyvmm.bench.display import Quiet
from pyvmm.bench.engine import RunOptions, run
from pyvmm.bench.scenario import (
    Hardware,
    Scenario,
    hardware_from_dict,
    scenario_from_dict,
)
from pyvmm.bench.table import render
from pyvmm.bench.vms import GUEST, BenchError
from pyvmm.sim.engine import simulate
from pyvmm.sim.model import SimModel, format_lag


@dataclass
class Pair:
    name: str
    reals: list[dict[str, Any]]  # one report per real run (repeats of one configuration)
    sims: list[dict[str, Any]] = field(default_factory=list)  # one per seed


@dataclass
class GuestMeasure:
    rate_mib_s: float  # new pages per vCPU per second under tracking, unthrottled
    lag: list[tuple[float, float]] = field(default_factory=list)  # (sleep ms, wake lag ms)
    rates_by_pct: dict[int, float] = field(default_factory=dict)  # MiB/s per vCPU


WINDOW_S = 0.5  # short, so that a fast guest does not exhaust its set in one window
WINDOWS = 3
THROTTLE_PCTS = (50, 80, 90, 95, 99)
TIMESLICE_MS = 10.0  # CpuThrottle's: the run between two sleeps
STEADY_TIMEOUT_S = 120.0
PROGRESS = re.compile(r"memstress vcpu=(\d+) mib=(\d+)")
MIB = 1 << 20


def measure_guest(hw: Hardware, say: Callable[[str], None]) -> GuestMeasure:
    """This guest's unthrottled rate and its wake lag at THROTTLE_PCTS (none for a guest
    that keeps to a --stress-rate: it would make up what a sleep took)."""
    from pyvmm.dirty.factory import make_tracker
    from pyvmm.dirty.rate import new_pages_in_window
    from pyvmm.machine.devices import SerialConsole, SerialLine
    from pyvmm.machine.elf import load_pvh_image
    from pyvmm.machine.images import resolve_image
    from pyvmm.machine.machine import Machine, MachineConfig
    from pyvmm.machine.memory import PAGE_SIZE
    from pyvmm.migration.convergence.throttle import CpuThrottle

    progress: dict[int, int] = {}

    def on_line(line: SerialLine) -> None:
        if m := PROGRESS.search(line.text):
            progress[int(m.group(1))] = int(m.group(2))

    serial = SerialConsole(io.StringIO())
    serial.listeners.append(on_line)
    ws = hw.working_set_mib()
    config = MachineConfig(hw.vm_mem_mib() * MIB, hw.cpus, hw.guest_cmdline())
    with Machine(config, serial) as machine:
        machine.boot(load_pvh_image(resolve_image(GUEST)))
        machine.start()
        deadline = time.monotonic() + STEADY_TIMEOUT_S
        while len(progress) < hw.cpus or min(progress.values()) < ws:  # first touch over
            if time.monotonic() > deadline:
                raise BenchError(f"the guest did not reach steady state (progress {progress})")
            time.sleep(0.05)
        tracker = make_tracker(machine)
        throttle = CpuThrottle(lambda: machine.vcpus)
        try:
            with tracker.open_view("calibrate") as view:

                def rate(seconds: float, windows: int) -> float:
                    counts = [new_pages_in_window(view, lambda: time.sleep(seconds))
                              for _ in range(windows)]  # fmt: skip
                    return statistics.median(
                        pages * PAGE_SIZE / MIB * 1000 / ms / hw.cpus for pages, ms in counts
                    )

                base = rate(WINDOW_S, WINDOWS)
                measure = GuestMeasure(base, rates_by_pct={0: base})
                if base * WINDOW_S >= 0.9 * ws:
                    say(f"warning: the guest dirtied its whole working set in {WINDOW_S} s "
                        f"windows: {base:.0f} MiB/s is a lower bound")  # fmt: skip
                if hw.stress_rate:
                    return measure
                for pct in THROTTLE_PCTS:
                    p = pct / 100
                    cycle_s = TIMESLICE_MS / (1 - p) / 1000
                    throttle.set_percentage(pct)
                    time.sleep(2 * cycle_s)  # the first sleeps at this percentage are over
                    r = rate(max(WINDOW_S, 4 * cycle_s), 2)
                    measure.rates_by_pct[pct] = r
                    # At p a vCPU should write 10 ms per cycle; r / base of the cycle it did.
                    lag_ms = TIMESLICE_MS - r / base * cycle_s * 1000
                    sleep_ms = p / (1 - p) * TIMESLICE_MS
                    measure.lag.append((round(sleep_ms, 1), min(TIMESLICE_MS, max(0.0, lag_ms))))
                return measure
        finally:
            throttle.stop()
            tracker.close()


def selected_runs(
    names: list[str], filter_: str, max_time: int | None
) -> list[tuple[str, Scenario, Hardware]]:
    """The bench comparisons' runs, filtered."""
    runs = []
    for comp in bench_selected(names):
        for scenario, hw in comp.runs:
            tag = f"{comp.name}/{scenario.name}"
            if not fnmatch.fnmatch(tag, filter_):
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
        pairs.append(Pair(tag, [rpt]))
    return pairs


def batch_runs(runs: list[tuple[str, Scenario, Hardware]], batch_dir: Path) -> list[Pair]:
    """Every pyvmm repeat of each configuration from a `pyvmm bench batch --output` tree
    (DIR/COMPARISON/NAME-N.json); a configuration with none is left out."""
    pairs = []
    for tag, _scenario, _hw in runs:
        comp, name = tag.split("/", 1)
        paths = sorted((batch_dir / comp).glob(f"{name}-[0-9]*.json"))
        reports = [report.load(p) for p in paths if re.fullmatch(rf"{re.escape(name)}-\d+", p.stem)]
        if reports:
            pairs.append(Pair(tag, reports))
    return pairs


def simulate_pairs(
    pairs: list[Pair],
    model: SimModel,
    measures: dict[tuple[int, int, int, int, str], GuestMeasure],
    seeds: int = 1,
) -> None:
    """Simulate each configuration with the model and its guest's measured rate and lag,
    with seeds model.seed, model.seed + 1, ... (with --jitter-pct, a spread like the real
    runs')."""
    for pair in pairs:
        scenario = scenario_from_dict(pair.reals[0]["scenario"])
        hw = hardware_from_dict(pair.reals[0]["hardware"])
        m = measures.get(guest_key(hw))
        guest = model
        if m is not None:
            guest = replace(model, guest_rate_mib_s=m.rate_mib_s, wake_lag_ms=format_lag(m.lag))
        pair.sims = [
            simulate(scenario, hw, replace(guest, seed=guest.seed + n)) for n in range(seeds)
        ]


def _err(real: float, sim: float) -> str:
    return f"{(sim - real) / real * 100:+.1f} %" if real else "-"


def _spread(values: list[float], fmt: str) -> str:
    """The mean, and the range when there are several runs."""
    mean = format(statistics.fmean(values), fmt)
    if len(values) == 1:
        return mean
    return f"{mean} ({format(min(values), fmt)}-{format(max(values), fmt)})"


HEADER = (
    "configuration", "status (real / sim)", "total time real (s)", "sim (s)", "error",
    "iterations real", "sim", "diff", "max throttle real (%)", "sim (%)", "goal",
)  # fmt: skip
TIME_GOAL = 0.10  # within 10 % of the real mean total time
ITER_GOAL = 2  # within 2 of the real runs' iteration counts (of their range)


def _results(reports: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Total times (s) and iteration counts of a set of reports."""
    results = [r["result"] for r in reports]
    return [r["total_time"] / 1000 for r in results], [r["iteration_count"] for r in results]


def within_goal(pair: Pair) -> bool:
    """The simulations' mean total time within 10 % of the real mean, their mean iteration
    count within 2 of the real runs' range."""
    times, iters = _results(pair.reals)
    sim_times, sim_iters = _results(pair.sims)
    mean = statistics.fmean(times)
    return (
        abs(statistics.fmean(sim_times) - mean) <= TIME_GOAL * mean
        and min(iters) - ITER_GOAL <= statistics.fmean(sim_iters) <= max(iters) + ITER_GOAL
    )


def _statuses(reports: list[dict[str, Any]]) -> str:
    return "/".join(sorted({r["result"]["status"] for r in reports}))


def _throttles(reports: list[dict[str, Any]]) -> str:
    return "/".join(str(v) for v in sorted({r["result"]["max_throttle_pcent"] for r in reports}))


def table(pairs: list[Pair]) -> str:
    rows = []
    for p in pairs:
        assert p.sims, f"{p.name} was not simulated"
        times, iters = _results(p.reals)
        sim_times, sim_iters = _results(p.sims)
        completed = all(r["result"]["status"] == "completed" for r in p.reals)
        goal = ("yes" if within_goal(p) else "no") if completed else "-"
        rows.append((
            p.name, f"{_statuses(p.reals)} / {_statuses(p.sims)}",
            _spread(times, ".1f"), _spread(sim_times, ".1f"),
            _err(statistics.fmean(times), statistics.fmean(sim_times)),
            _spread(iters, ".0f" if len(iters) == 1 else ".1f"),
            _spread(sim_iters, ".0f" if len(sim_iters) == 1 else ".1f"),
            f"{statistics.fmean(sim_iters) - statistics.fmean(iters):+.1f}",
            _throttles(p.reals), _throttles(p.sims), goal,
        ))  # fmt: skip
    return render(HEADER, rows)


def guest_key(hw: Hardware) -> tuple[int, int, int, int, str]:
    """What makes two configurations the same guest (it is measured once)."""
    return (hw.cpus, hw.working_set_mib(), hw.vm_mem_mib(), hw.stress_rate, hw.stress_pattern)


def measured_guests(
    hws: list[Hardware], say: Callable[[str], None]
) -> dict[tuple[int, int, int, int, str], GuestMeasure]:
    """Each distinct guest, measured on it (measure_guest)."""
    guests = {guest_key(hw): hw for hw in hws}
    measures = {}
    for key, hw in guests.items():
        m = measure_guest(hw, say)
        by_pct = ", ".join(f"{pct} %: {r:.1f}" for pct, r in m.rates_by_pct.items())
        say(f"guest {hw.cpus} vCPU(s) x {hw.working_set_mib()} MiB: MiB/s per vCPU at "
            f"throttle {by_pct}; wake lag {format_lag(m.lag) or '-'}")  # fmt: skip
        measures[key] = m
    return measures
