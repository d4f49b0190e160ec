"""Where a throttled vCPU's time goes: one vCPU of memstress (64 MiB, flat out) under
pyvmm's CpuThrottle at P %, for 5 s. Prints the vCPU thread's share of time on a CPU and
waiting in the run queue (/proc/self/task/TID/schedstat), how long each sleep lasted
beyond what was asked, the delay from a tick's kick to its sleep, and the gap between two
sleeps (the run the throttle leaves: 10 ms).

    python tools/throttle_probe.py [PCT] [--track]

At p % the vCPU should be on a CPU 1 - p of the time. What it loses shows up as run-queue
wait: the 10 ms windows are the same for every vCPU (one tick queues every sleep), so
they all wake at once and compete for the host's cores with the migration thread, the
destination and whatever else runs (docs/sim.md, "The wake lag").
"""

from __future__ import annotations

import argparse
import io
import itertools
import re
import statistics
import time

from pyvmm.dirty.factory import make_tracker
from pyvmm.machine import vcpu as vcpu_mod
from pyvmm.machine.devices import SerialConsole, SerialLine
from pyvmm.machine.elf import load_pvh_image
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.migration.convergence.throttle import TIMESLICE_MS, CpuThrottle

WINDOW_S = 5.0
PROGRESS = re.compile(r"memstress vcpu=0 mib=(\d+)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pct", type=int, nargs="?", default=90)
    ap.add_argument("--track", action="store_true", help="dirty logging on, synced every 250 ms")
    a = ap.parse_args()
    sleeps: list[tuple[float, float, int]] = []  # (start, end, asked us)
    kicks: list[float] = []
    plain_sleep, plain_kick = vcpu_mod.Vcpu.sleep_us, vcpu_mod.Vcpu.kick

    def sleep_us(self: vcpu_mod.Vcpu, us: int, kind: str | None = None) -> None:
        t0 = time.monotonic()
        plain_sleep(self, us, kind)
        sleeps.append((t0, time.monotonic(), us))

    def kick(self: vcpu_mod.Vcpu) -> None:
        kicks.append(time.monotonic())
        plain_kick(self)

    vcpu_mod.Vcpu.sleep_us, vcpu_mod.Vcpu.kick = sleep_us, kick  # type: ignore[method-assign]
    progress: list[int] = []

    def on_line(line: SerialLine) -> None:
        if m := PROGRESS.search(line.text):
            progress.append(int(m.group(1)))

    serial = SerialConsole(io.StringIO())
    serial.listeners.append(on_line)
    with Machine(MachineConfig(320 << 20, 1, "mb=64"), serial) as machine:
        machine.boot(load_pvh_image(resolve_image("memstress")))
        machine.start()
        while not progress or progress[-1] < 128:  # past the first touch
            time.sleep(0.05)
        tracker = make_tracker(machine) if a.track else None
        view = tracker.open_view("probe") if tracker else None
        throttle = CpuThrottle(lambda: machine.vcpus)
        thread = machine.vcpus[0].thread
        assert thread is not None and thread.native_id is not None
        schedstat = f"/proc/self/task/{thread.native_id}/schedstat"

        def run_wait_s() -> tuple[float, float]:
            with open(schedstat) as f:
                run_ns, wait_ns, _ = f.read().split()
            return int(run_ns) / 1e9, int(wait_ns) / 1e9

        throttle.set_percentage(a.pct)
        time.sleep(1)
        sleeps.clear()
        kicks.clear()
        (run0, wait0), t0 = run_wait_s(), time.monotonic()
        while time.monotonic() - t0 < WINDOW_S:
            if view is not None:
                view.sync()
            time.sleep(0.25)
        (run1, wait1), t1 = run_wait_s(), time.monotonic()
        throttle.stop()
        if tracker is not None and view is not None:
            view.close()
            tracker.close()
    over = [(end - start) * 1000 - us / 1000 for start, end, us in sleeps]
    lat = [(s[0] - max(k for k in kicks if k <= s[0])) * 1000 for s in sleeps if kicks[0] <= s[0]]
    gaps = [(b[0] - a_[1]) * 1000 for a_, b in itertools.pairwise(sleeps)]
    wall = t1 - t0
    print(f"throttle {a.pct} %{' (tracking)' if a.track else ''}: on a CPU "
          f"{(run1 - run0) / wall:.3f}, waiting in the run queue {(wait1 - wait0) / wall:.3f} "
          f"(the throttle leaves {1 - a.pct / 100:.3f}); {len(sleeps)} sleeps, beyond what "
          f"was asked: median {statistics.median(over):.2f} ms; kick to sleep: median "
          f"{statistics.median(lat):.2f} ms; between sleeps: median {statistics.median(gaps):.2f}"
          f" ms (the throttle's {TIMESLICE_MS:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
