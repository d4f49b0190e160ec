"""The named comparisons that `pyvmm bench batch` runs (guestperf's COMPARISONS, for
pyvmm's questions). Each is a list of (scenario, hardware) pairs that differ in one thing.

The scale is small on purpose: a pass over the working set must take longer than the
periodic sync's 5 s interval for the 2024 series' effects to show, and that depends on
the ratio of working set to max-bandwidth, not on absolute size. So 2 vCPUs x 512 MiB
against 64 MiB/s (a 16 s pass) behave like the series' 100 GB against 1.59 Gbit/s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pyvmm.bench.scenario import Hardware, Scenario


@dataclass
class Comparison:
    name: str
    description: str
    runs: list[tuple[Scenario, Hardware]]
    # Which runs share a chart (a crowded chart says nothing): scenario name -> chart key.
    chart: Callable[[str], str] = field(default=lambda _name: "")


LOADS_MIB = {"heavy": 512, "moderate": 256, "light": 64}  # per vCPU; the goals are on heavy

# name: scenario changes, and whether the run needs a dirty ring
CONVERGENCE_CONFIGS: dict[str, dict[str, object]] = {
    "no-throttle": {"max_time": 60},
    # One throttle step per two passes: a heavy load needs about 350 s to reach 99 %.
    "ac-9.1": {"auto_converge": True, "periodic_sync": False, "max_time": 420},
    "ac-9.2": {"auto_converge": True},
    "ac-9.2-responsive": {"auto_converge": True, "responsive": True},
    "ac-2013": {"auto_converge": True, "throttle_legacy": True, "periodic_sync": False},
    "dirty-limit": {"dirty_limit": True},
}

# The 2013 mode throttles from the sixth bad period on, with a fixed 30 ms of every 40 ms
# that never catches a flat-out dirtier: seven passes and a minute more show it.
LEGACY_MAX_TIME_S = {"heavy": 180, "moderate": 120, "light": 120}

RING = 4096  # QEMU's usual dirty-ring-size; dirty limit's (virtual) ring here


def convergence() -> Comparison:
    runs = []
    for load, mib in LOADS_MIB.items():
        hw = Hardware(cpus=2, mem=2 * mib, stress_mem=mib)
        # No iteration cap: a dirty limit or a periodic sync makes many short iterations,
        # and what is compared is the time to converge.
        base = Scenario(bandwidth=64, max_time=240, max_iters=1000)
        for config, changes in CONVERGENCE_CONFIGS.items():
            ring = RING if changes.get("dirty_limit") else 0
            if config == "ac-2013":
                changes = {**changes, "max_time": LEGACY_MAX_TIME_S[load]}
            runs.append((replace(base, name=f"{load}-{config}", **changes),  # type: ignore[arg-type]
                         replace(hw, dirty_ring_size=ring)))  # fmt: skip
    return Comparison(
        "convergence",
        "The 2024 auto-converge series' comparison at small scale: 2 vCPUs running memstress "
        "flat out over heavy (512 MiB), moderate (256 MiB) and light (64 MiB) working sets "
        "per vCPU, max-bandwidth 64 MiB/s (a heavy pass takes 16 s), for each convergence "
        "policy, with no iteration cap. Runs are cancelled after 240 s, except auto-converge "
        "without periodic sync (420 s), no throttle (60 s) and the 2013 mode (seven passes "
        "and a minute: 180 s heavy, 120 s otherwise), which cannot converge against a "
        "flat-out guest.",
        runs,
        chart=lambda name: name.split("-", 1)[0],
    )


def qemu_reference() -> Comparison:
    hw = Hardware(cpus=1, mem=256)
    runs = [(Scenario(name="ac-9.1-256mib", bandwidth=64, auto_converge=True,
                      periodic_sync=False), hw)]  # fmt: skip
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
    "convergence": convergence,
    "qemu-reference": qemu_reference,
    "auto-converge-step": auto_converge_step,
    "dirty-limit-rate": dirty_limit_rate,
    "dirty-limit-period": dirty_limit_period,
    "bandwidth": bandwidth,
    "downtime": downtime,
}
