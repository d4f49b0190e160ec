#!/usr/bin/env python3
"""Cost curves of dirty tracking and the migration's walk, against guest size and dirty
pages, in bitmap and ring mode, on real VMs.

For guests of 1, 4, 16 and 64 GiB, the ringprobe guest (at CPL3) writes 0.1 %, 1 % or
100 % of the pages, or a fixed 16384 pages (64 MiB) whatever the size, and ends; then:

- sync: one dirty sync of an eager view (bitmap: KVM_GET_DIRTY_LOG, then
  KVM_CLEAR_DIRTY_LOG of what it reported; ring: harvest every ring, KVM_RESET_DIRTY_RINGS,
  and hand the pages to the view). In ring mode the reaper and ring-full exits harvested
  most entries while the guest ran: "harvest" adds up every harvest and reset of the run,
  the ring's whole cost, which the chart shows for both modes (bitmap: the sync);
- walk: one pass (best of --rounds) of the migration's walk over those dirty pages
  (Precopy.send over DirtyPages with the zero test, a page writer that sends nothing);
- first pass: what a migration does first: open its view with every page dirty (dirty
  logging starts again), the setup sync, and the first pass over all of RAM, reading only
  the chunks the guest populated (bitmap mode re-arms the INITIALLY_SET bits as it goes).

The fixed 16384 pages show what grows with RAM: bitmap mode's GET copies the whole
bitmap, the ring's harvest only what was written. 100 % of 64 GiB cannot be populated on
this 24 GiB host; --max-populate-gib bounds what is written (default 16).
Prints a table and draws docs/cost-curves.png (log-log).
Usage: python tools/bench_curves.py [--sizes 1,4,16,64] [--out docs/cost-curves.png]
"""

from __future__ import annotations

import argparse
import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nullwriter import NullPageWriter, null_precopy

from pyvmm.dirty.bitmap import BitmapTracker
from pyvmm.dirty.ring import RingTracker
from pyvmm.dirty.tracker import DirtyTracker
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.elf import load_pvh_image
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.machine.memory import GuestMemory
from pyvmm.migration.dirtypages import DirtyPages

GIB = 1 << 30
PAGE = 4096
RING_ENTRIES = 65536
FIXED_PAGES = 16384
RESERVED_PAGES = 8192  # the guest's own 32 MiB stay out of a 100 % sweep


@dataclass
class Point:
    mode: str
    gib: int
    label: str  # "0.1%", "1%", "100%", "64 MiB"
    dirty: int  # pages the guest wrote (and the sync found)
    sync_ms: float  # the sync call itself
    harvest_ms: float  # ring: every harvest and reset while the guest ran, and the sync's
    harvest_cpu_ms: float  # ... their CPU time (thread_time), without waits
    walk_ms: float
    first_pass_ms: float
    first_pass_read: int


class HarvestClock:
    """Adds up the time a RingTracker spends harvesting and resetting, on any thread."""

    def __init__(self, tracker: RingTracker) -> None:
        self.seconds = 0.0  # wall time, waits for the GIL and locks included
        self.cpu_seconds = 0.0  # CPU time of the harvesting threads only
        self._lock = threading.Lock()
        reap_one, vm = tracker._reap_one, tracker.machine.vm
        reset = vm.reset_dirty_rings

        def timed_reap(index: int) -> int:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return reap_one(index)
            finally:
                self._add(time.perf_counter() - t0, time.thread_time() - c0)

        def timed_reset() -> int:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return reset()
            finally:
                self._add(time.perf_counter() - t0, time.thread_time() - c0)

        tracker._reap_one = timed_reap  # type: ignore[method-assign]
        vm.reset_dirty_rings = timed_reset  # type: ignore[method-assign]

    def reset(self) -> None:
        self.seconds = self.cpu_seconds = 0.0

    def _add(self, seconds: float, cpu_seconds: float) -> None:
        with self._lock:
            self.seconds += seconds
            self.cpu_seconds += cpu_seconds


def best_pass_ms(view: object, memory: object, laps: int, rounds: int,
                 refill: object) -> tuple[float, NullPageWriter]:  # fmt: skip
    """Best of `rounds` passes; refill() puts the dirty bits back before each."""
    best, writer = float("inf"), NullPageWriter()
    for _ in range(rounds):
        refill()  # type: ignore[operator]
        pages = DirtyPages(view, memory)  # type: ignore[arg-type]
        pages.laps = laps
        ms, writer = one_pass_ms(pages)
        best = min(best, ms)
    return best, writer


def one_pass_ms(pages: DirtyPages) -> tuple[float, NullPageWriter]:
    writer = NullPageWriter()
    precopy = null_precopy(pages, writer)
    t0 = time.perf_counter()
    while not precopy.send(float("inf"), limited=False):
        pass
    return (time.perf_counter() - t0) * 1000, writer


def measure(mode: str, gib: int, label: str, npages: int, rounds: int) -> Point:
    ring = RING_ENTRIES if mode == "ring" else None
    config = MachineConfig(gib * GIB, 1, f"pages={npages} cpl=3", None, ring)
    with Machine(config, SerialConsole(io.StringIO())) as machine:
        machine.boot(load_pvh_image(resolve_image("ringprobe")))
        memory = machine.memory
        assert memory is not None
        tracker: DirtyTracker
        clock = None
        if mode == "ring":
            tracker = RingTracker(machine)
            clock = HarvestClock(tracker)
        else:
            tracker = BitmapTracker(machine)
        try:
            view = tracker.open_view("curves")  # eager: a sync re-arms what it reported
            view.sync()  # the boot's own pages (and, bitmap mode, INITIALLY_SET): not ours
            for bitmap in view.bitmaps:
                bitmap.fill(0)
            if clock is not None:
                clock.reset()
            machine.start()
            end = machine.wait(600)
            if end is None or end.code != 0:
                raise RuntimeError(f"ringprobe pages={npages} on {gib} GiB: {end}")
            t0 = time.perf_counter()
            view.sync()
            sync_ms = (time.perf_counter() - t0) * 1000
            harvest_ms = clock.seconds * 1000 if clock is not None else sync_ms
            harvest_cpu_ms = clock.cpu_seconds * 1000 if clock is not None else sync_ms
            found = view.dirty_pages()
            dirty = [b.copy() for b in view.bitmaps]

            def refill_dirty() -> None:
                with view.lock:
                    for bitmap, saved in zip(view.bitmaps, dirty, strict=True):
                        np.copyto(bitmap, saved)

            walk_ms, writer = best_pass_ms(view, memory, 1, rounds, refill_dirty)
            assert writer.pages == found, (writer.pages, found)

            view.close()  # dirty logging off: the first pass starts it again, as migrations do
            first_ms, read = float("inf"), 0
            for _ in range(rounds):
                ms, read = first_pass_ms(tracker, memory)
                first_ms = min(first_ms, ms)
        finally:
            tracker.close()
    return Point(mode, gib, label, found, sync_ms, harvest_ms, harvest_cpu_ms, walk_ms,
                 first_ms, read)  # fmt: skip


def first_pass_ms(tracker: DirtyTracker, memory: GuestMemory) -> tuple[float, int]:
    """What a migration does first (MigrationSource._setup, then the first pass): open its
    view, every page dirty (logging starts: bitmap mode with INITIALLY_SET, whose bits the
    walk re-arms chunk by chunk; ring mode write-protects everything), the setup sync,
    then one pass over all of RAM."""
    t0 = time.perf_counter()
    view = tracker.open_view("migration", defer_clear=True, initially_dirty=True)
    try:
        view.sync()
        _, writer = one_pass_ms(DirtyPages(view, memory))
        return (time.perf_counter() - t0) * 1000, writer.read
    finally:
        view.close()


def plot(points: list[Point], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    colors = {"bitmap": "tab:blue", "ring": "tab:orange"}
    markers = {1: "o", 4: "s", 16: "^", 64: "D"}
    for ax, metric, title in (
        (axes[0], "harvest_ms", "dirty sync: get + clear / every harvest + reset"),
        (axes[1], "walk_ms", "the walk over the dirty pages (zero test)"),
    ):
        for mode in ("bitmap", "ring"):
            for label, style in (("0.1%", ":"), ("1%", "--"), ("100%", "-"), ("64 MiB", "-.")):
                pts = sorted((p for p in points if p.mode == mode and p.label == label),
                             key=lambda p: p.gib)  # fmt: skip
                if not pts:
                    continue
                ax.plot([p.dirty for p in pts], [getattr(p, metric) for p in pts], style,
                        color=colors[mode], alpha=0.6, label=f"{mode}, {label}")  # fmt: skip
                for p in pts:
                    ax.plot(p.dirty, getattr(p, metric), markers[p.gib], color=colors[mode])
        ax.set(xscale="log", yscale="log", xlabel="dirty pages", ylabel="ms", title=title)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    for mode in ("bitmap", "ring"):
        for label, style in (("0.1%", ":"), ("1%", "--"), ("100%", "-"), ("64 MiB", "-.")):
            pts = sorted((p for p in points if p.mode == mode and p.label == label),
                         key=lambda p: p.gib)  # fmt: skip
            if pts:
                ax.plot([p.gib for p in pts], [p.first_pass_ms for p in pts], style,
                        marker="o", color=colors[mode],
                        label=f"{mode}, {label} written")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="guest RAM (GiB)", ylabel="ms",
           title="setup + the first pass over all of RAM")  # fmt: skip
    ax.set_xticks([1, 4, 16, 64], ["1", "4", "16", "64"])
    ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[2].legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.01, "markers: o 1 GiB, s 4 GiB, ^ 16 GiB, D 64 GiB guest.  "
             "python tools/bench_curves.py", fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=100, metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16,64", help="guest sizes in GiB")
    parser.add_argument("--modes", default="bitmap,ring")
    parser.add_argument("--max-populate-gib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="passes per walk, best")
    parser.add_argument("--repeat", type=int, default=3,
                        help="VMs per case below 100 %%, the best sync kept")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("docs/cost-curves.png"))
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    points: list[Point] = []
    header = (f"{'mode':<7} {'GiB':>4} {'written':>8} {'dirty pages':>12} {'sync ms':>9} "
              f"{'harvest ms':>11} {'(CPU ms)':>9} {'walk ms':>9} {'first pass ms':>14} "
              f"{'read MiB':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for gib in (int(s) for s in args.sizes.split(",")):
        total = gib * GIB // PAGE
        cases = [("0.1%", total // 1000), ("1%", total // 100), ("64 MiB", FIXED_PAGES)]
        if gib <= args.max_populate_gib:
            cases.append(("100%", total - RESERVED_PAGES))
        for mode in args.modes.split(","):
            for label, npages in cases:
                # A sync is measured once per VM: the cheap cases take the best of --repeat.
                runs = [measure(mode, gib, label, npages, args.rounds)
                        for _ in range(1 if label == "100%" else args.repeat)]  # fmt: skip
                p = min(runs, key=lambda r: r.harvest_ms)
                points.append(p)
                harvest = (f"{p.harvest_ms:>11.2f} {p.harvest_cpu_ms:>9.2f}" if mode == "ring"
                           else f"{'-':>11} {'-':>9}")  # fmt: skip
                print(f"{mode:<7} {gib:>4} {label:>8} {p.dirty:>12} {p.sync_ms:>9.2f} "
                      f"{harvest} {p.walk_ms:>9.2f} {p.first_pass_ms:>14.1f} "
                      f"{p.first_pass_read * PAGE / (1 << 20):>9.0f}", flush=True)  # fmt: skip
    plot(points, args.out)
    print(f"chart: {args.out}")


if __name__ == "__main__":
    main()
