"""`pyvmm demo`: the main job on embedded defaults.

For now: boot memstress on 2 vCPUs, let it run, and report each vCPU's update
rate from the guest's own progress lines. (The live-migration work turns this
into a migration between two local pyvmm processes.)
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from pyvmm.machine.devices import SerialLine
from pyvmm.monitor.vmm import RunOptions, Vmm

PROGRESS = re.compile(r"memstress vcpu=(\d+) mib=(\d+)")


@dataclass
class RateTracker:
    """Per-vCPU (time, MiB) samples taken from memstress's progress lines."""

    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)

    def on_line(self, line: SerialLine) -> None:
        match = PROGRESS.search(line.text)
        if match:
            vcpu, mib = int(match.group(1)), int(match.group(2))
            self.samples.setdefault(vcpu, []).append((line.wall_time_s, mib))

    def rate_mib_s(self, vcpu: int) -> float | None:
        points = self.samples.get(vcpu, [])
        if len(points) < 2:
            return None
        (t0, m0), (t1, m1) = points[0], points[-1]
        return (m1 - m0) / (t1 - t0) if t1 > t0 else None


def run_demo(seconds: float = 5.0, vcpus: int = 2, mb: int = 64) -> int:
    console = Console()
    console.print(f"[bold]pyvmm demo[/]: memstress on {vcpus} vCPUs, {mb} MiB each, {seconds} s")
    tracker = RateTracker()
    options = RunOptions(
        image="memstress",
        mem_bytes=(vcpus * mb + 64) << 20,
        vcpus=vcpus,
        cmdline=f"mb={mb}",
        time_limit_s=seconds,
    )
    vmm = Vmm(options, out=io.StringIO())
    vmm.build()
    assert vmm.machine is not None
    vmm.machine.serial.listeners.append(tracker.on_line)
    result = vmm.run()
    table = Table(title="guest update rate (from the guest's progress lines)")
    table.add_column("vCPU", justify="right")
    table.add_column("MiB/s", justify="right")
    table.add_column("progress lines", justify="right")
    ok = True
    for vcpu in range(vcpus):
        rate = tracker.rate_mib_s(vcpu)
        ok &= rate is not None and rate > 0
        shown = f"{rate:.0f}" if rate is not None else "no data"
        table.add_row(str(vcpu), shown, str(len(tracker.samples.get(vcpu, []))))
    console.print(table)
    console.print(f"VM ended: {result.reason}")
    if result.error or not ok:
        console.print("[red]demo failed[/]")
        return 1
    return 0
