"""`pyvmm sim calibrate`: the same configurations run for real (`pyvmm bench`'s engine) and
in simulation, side by side with the relative error.

The one figure the simulation takes from the real guest is its unthrottled dirty rate:
measure_guest_rate boots the configuration's guest alone, lets it reach steady state and
asks it for `calc-dirty-rate` in dirty-bitmap mode over short windows. That is the rate at
which it dirties *new* pages while something tracks it, which on this host is not
memstress's store rate: every first write to a page after a sync faults (tens of
microseconds, docs/convergence.md). The windows are short enough that the working set is
not exhausted in one. Each guest gets its own measured rate; everything else is one
SimModel for every row.
"""

from __future__ import annotations

import fnmatch
import shutil
import statistics
import tempfile
import time
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
    hardware_from_dict,
    scenario_from_dict,
)
from pyvmm.bench.table import render
from pyvmm.bench.vms import BenchError, host_tsc_khz, start_vm, vm_command, wait_for_socket
from pyvmm.monitor.client import SyncQmp
from pyvmm.sim.engine import simulate
from pyvmm.sim.model import SimModel


@dataclass
class Pair:
    name: str
    real: dict[str, Any]
    sim: dict[str, Any] | None = None


WINDOW_MS = 500  # calc-dirty-rate window: short, so that a fast guest is not capped by its set
WINDOWS = 3
STEADY_TIMEOUT_S = 120.0


def measure_guest_rate(hw: Hardware, say: Callable[[str], None]) -> float:
    """MiB/s of new pages per vCPU that this guest dirties under tracking, unthrottled: the
    median of WINDOWS calc-dirty-rate windows of WINDOW_MS on a pyvmm VM of its own."""
    work = Path(tempfile.mkdtemp(prefix="pyvmm-calibrate-"))
    qmp, serial = work / "src.qmp", work / "src.serial"
    vm = start_vm("src", vm_command("pyvmm", hw, qmp, serial, None, host_tsc_khz()), work,
                  qmp, serial)  # fmt: skip
    try:
        wait_for_socket(vm)
        ws = hw.working_set_mib()
        deadline = time.monotonic() + STEADY_TIMEOUT_S
        while True:  # every vCPU has rewritten its set once: first touch is over
            vm.check_alive()
            vm.console.poll()
            latest = vm.console.latest_mib()
            if len(latest) == hw.cpus and min(latest.values()) >= ws:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the guest did not reach steady state (progress {latest})")
            time.sleep(0.05)
        rates = []
        mode = "dirty-ring" if hw.dirty_ring_size else "dirty-bitmap"  # what the guest has
        with SyncQmp(f"unix:{qmp}", timeout_s=30) as q:
            for _ in range(WINDOWS):
                q.execute("calc-dirty-rate", {"calc-time": WINDOW_MS,
                          "calc-time-unit": "millisecond", "mode": mode})  # fmt: skip
                while (info := q.execute("query-dirty-rate"))["status"] != "measured":
                    time.sleep(0.05)
                rates.append(info["dirty-rate"] / hw.cpus)
        rate = statistics.median(rates)
        cap = ws * 1000 / WINDOW_MS  # the whole set in one window: a lower bound only
        if rate >= 0.9 * cap:
            say(f"warning: the guest dirtied its whole working set in {WINDOW_MS} ms windows: "
                f"{rate:.0f} MiB/s is a lower bound")  # fmt: skip
        say(f"{hw.cpus} vCPU(s) x {ws} MiB: calc-dirty-rate ({mode}) {rates} MiB/s per vCPU")
        return rate
    finally:
        vm.stop()
        shutil.rmtree(work, ignore_errors=True)


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
        pairs.append(Pair(tag, rpt))
    return pairs


def simulate_pairs(
    pairs: list[Pair], model: SimModel, rates: dict[tuple[int, int, int, int, str], float]
) -> None:
    """Simulate each real run with the model, and its guest's measured rate."""
    for pair in pairs:
        scenario = scenario_from_dict(pair.real["scenario"])
        hw = hardware_from_dict(pair.real["hardware"])
        rate = rates.get(guest_key(hw), model.guest_rate_mib_s)
        pair.sim = simulate(scenario, hw, replace(model, guest_rate_mib_s=rate))


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


def guest_key(hw: Hardware) -> tuple[int, int, int, int, str]:
    """What makes two configurations the same guest (its rate is measured once)."""
    return (hw.cpus, hw.working_set_mib(), hw.vm_mem_mib(), hw.stress_rate, hw.stress_pattern)


def measured_rates(
    runs: list[tuple[str, Scenario, Hardware]], say: Callable[[str], None]
) -> dict[tuple[int, int, int, int, str], float]:
    """Each distinct guest's rate, measured on it (measure_guest_rate)."""
    guests = {guest_key(hw): hw for _, _, hw in runs}
    return {key: measure_guest_rate(hw, say) for key, hw in guests.items()}
