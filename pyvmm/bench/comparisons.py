"""The named comparisons that `pyvmm bench batch` runs (guestperf's COMPARISONS, for
pyvmm's questions). Each is a list of (scenario, hardware) pairs that differ in one thing.

series-2024 is the 2024 auto-converge series' experiment at small scale. What decides
its shape is how long an iteration lasts against the 5 s after which the series' syncs
come (v1's watcher, the RFC's interval, 9.2's timer), i.e. the ratio of working set to
max-bandwidth, not the absolute size. The series' own table implies iterations of about
16 s (moderate) and 27 s (heavy). At 64 MiB/s: moderate 2 x 512 MiB (a 16 s pass; the
"memstress over 1 GiB" the convergence goals were set on), heavy 2 x 1 GiB (32 s) and
light 2 x 384 MiB (12 s, so that every iteration lasts well over 5 s); docs/convergence.md
explains the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pyvmm.bench import series
from pyvmm.bench.scenario import Hardware, Scenario


@dataclass
class Comparison:
    name: str
    description: str
    runs: list[tuple[Scenario, Hardware]]
    # Which runs share a chart (a crowded chart says nothing): scenario name -> chart key.
    chart: Callable[[str], str] = field(default=lambda _name: "")
    # More Markdown after the table (series-2024: the series' own layout and ratios).
    summary: Callable[[list[dict[str, Any]]], str] | None = None


SERIES_LOADS_MIB = {"light": 384, "moderate": 512, "heavy": 1024}  # per vCPU, 2 vCPUs
SERIES_BANDWIDTH_MIB_S = 64
RING = 4096  # QEMU's usual dirty-ring-size; dirty limit's (virtual) ring here

# pyvmm's rows (series.CONFIGS names them): scenario changes, and the cap in passes
SERIES_CONFIGS: dict[str, tuple[dict[str, object], float]] = {
    # One throttle step per two passes, nine steps to 99 %: about 19 passes.
    "original": ({"auto_converge": True, "sync": "iteration"}, 40),
    "background": ({"auto_converge": True, "sync": "background"}, 20),
    "background-responsive": ({"auto_converge": True, "sync": "background",
                               "responsive": True}, 20),
    "rfc-periodic": ({"auto_converge": True, "sync": "iteration",
                      "periodic_throttle": True}, 20),
    "timer-9.2": ({"auto_converge": True, "sync": "timer"}, 20),
    # Seven passes to the seventh bad period, then a minute of its fixed sleeps.
    "2013": ({"auto_converge": True, "sync": "iteration", "auto_converge_legacy": True}, 7),
    "dirty-limit": ({"dirty_limit": True, "vcpu_dirty_limit": 16}, 20),
}  # fmt: skip
LEGACY_EXTRA_S = 60


def series_2024() -> Comparison:
    runs = []
    for load, mib in SERIES_LOADS_MIB.items():
        hw = Hardware(cpus=2, mem=2 * mib, stress_mem=mib)
        pass_s = 2 * mib / SERIES_BANDWIDTH_MIB_S
        # No iteration cap: background and periodic syncs make many short periods.
        base = Scenario(bandwidth=SERIES_BANDWIDTH_MIB_S, max_iters=1000)
        for config, (changes, passes) in SERIES_CONFIGS.items():
            max_time = int(pass_s * passes) + (LEGACY_EXTRA_S if config == "2013" else 0)
            ring = RING if changes.get("dirty_limit") else 0
            runs.append((replace(base, name=f"{load}-{config}", max_time=max_time,
                                 **changes),  # type: ignore[arg-type]
                         replace(hw, dirty_ring_size=ring)))  # fmt: skip
    return Comparison(
        "series-2024",
        'The 2024 auto-converge series ("migration: auto-converge refinements for huge VM": '
        "RFC 9 Sep, v1 16 Sep, v2 30 Sep 2024) at small scale: 2 vCPUs running memstress "
        "flat out over light (384 MiB), moderate (512 MiB) and heavy (1 GiB) working sets "
        "per vCPU, max-bandwidth 64 MiB/s (passes of 12, 16 and 32 s), downtime-limit "
        "500 ms, no iteration cap. Rows: the series' original, background sync and "
        "background sync + responsive, then the RFC's periodic throttle, QEMU 9.2's timer, "
        "the 2013 mode and the dirty limit; with --binary, QEMU's original. Runs are "
        "cancelled after 40 passes (original), 7 passes and a minute (2013 mode) or 20 "
        "passes (the rest). The tables after the first one are in the v1 cover letter's "
        "layout, with each configuration's ratio to original beside the series' own.",
        runs,
        chart=lambda name: name.split("-", 1)[0],
        summary=series.table,
    )


def qemu_reference() -> Comparison:
    hw = Hardware(cpus=1, mem=256)
    runs = [(Scenario(name="ac-9.1-256mib", bandwidth=64, auto_converge=True,
                      sync="iteration"), hw)]  # fmt: skip
    return Comparison(
        "qemu-reference",
        "Plain auto-converge (no periodic sync) on one vCPU dirtying 256 MiB flat out at "
        "max-bandwidth 64 MiB/s: the guest the QEMU comparison of the convergence issue names. "
        "Run with --binary qemu-system-x86_64 for the QEMU row.",
        runs,
    )


# The one-knob comparisons share a smaller scale: 2 vCPUs x 128 MiB at 32 MiB/s (8 s pass).
SMALL_HW = Hardware(cpus=2, mem=256)
SMALL = Scenario(bandwidth=32, max_time=120)


def _sweep(name: str, description: str, runs: list[tuple[str, dict[str, object]]],
           hw: Hardware = SMALL_HW) -> Comparison:  # fmt: skip
    return Comparison(
        name,
        description,
        [(replace(SMALL, name=run, **changes), hw) for run, changes in runs],  # type: ignore[arg-type]
    )


def auto_converge_step() -> Comparison:
    return _sweep(
        "auto-converge-step",
        "cpu-throttle-increment 5, 10 and 20 % (guestperf's auto-converge-iters).",
        [
            (f"auto-converge-step-{n}", {"auto_converge": True, "auto_converge_step": n})
            for n in (5, 10, 20)
        ],
    )


def dirty_limit_rate() -> Comparison:
    return _sweep(
        "dirty-limit-rate",
        "vcpu-dirty-limit 10, 20 and 50 MB/s (guestperf's compr-dirty-limit).",
        [
            (f"dirty-limit-{n}MB", {"dirty_limit": True, "vcpu_dirty_limit": n})
            for n in (10, 20, 50)
        ],
        replace(SMALL_HW, dirty_ring_size=RING),
    )


def dirty_limit_period() -> Comparison:
    return _sweep(
        "dirty-limit-period",
        "x-vcpu-dirty-limit-period 500, 800 and 1000 ms (guestperf's compr-dirty-limit-period).",
        [
            (f"dirty-limit-period-{n}", {"dirty_limit": True, "x_vcpu_dirty_limit_period": n})
            for n in (500, 800, 1000)
        ],
        replace(SMALL_HW, dirty_ring_size=RING),
    )


def bandwidth() -> Comparison:
    return _sweep(
        "bandwidth",
        "Auto-converge at max-bandwidth 16, 32, 64 and 128 MiB/s.",
        [
            (f"auto-converge-bw-{n}mib", {"auto_converge": True, "bandwidth": n})
            for n in (16, 32, 64, 128)
        ],
    )


def downtime() -> Comparison:
    return _sweep(
        "downtime",
        "Auto-converge with downtime-limit 100, 300, 500 and 1000 ms.",
        [
            (f"downtime-{n}ms", {"auto_converge": True, "downtime": n})
            for n in (100, 300, 500, 1000)
        ],
    )


COMPARISONS: dict[str, Callable[[], Comparison]] = {
    "series-2024": series_2024,
    "qemu-reference": qemu_reference,
    "auto-converge-step": auto_converge_step,
    "dirty-limit-rate": dirty_limit_rate,
    "dirty-limit-period": dirty_limit_period,
    "bandwidth": bandwidth,
    "downtime": downtime,
}
