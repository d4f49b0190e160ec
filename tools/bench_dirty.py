#!/usr/bin/env python3
"""Dirty-tracking figures: the Cython scan loops (tools/bench_scan.py) and the cost of one
dirty sync of a 4 GiB guest in bitmap and ring mode, with a guest dirtying memory.

Usage: python tools/bench_dirty.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scan

from pyvmm.dirty.factory import make_tracker
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.elf import load_pvh_image
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig


def sync_cost_ms(mode: str, rounds: int, interval_s: float = 0.1) -> tuple[float, float, int]:
    """(median ms per sync, max ms, median pages per sync) for a 4 GiB guest with memstress
    dirtying 256 MiB on one vCPU as fast as it can."""
    ring = 65536 if mode == "ring" else None
    config = MachineConfig(4 << 30, 1, "mb=256", dirty_ring_entries=ring)
    with Machine(config, SerialConsole(io.StringIO())) as machine:
        machine.boot(load_pvh_image(resolve_image("memstress")))
        tracker = make_tracker(machine)
        view = tracker.open_view("bench")
        machine.start()
        time.sleep(0.5)
        view.sync()
        costs, pages = [], []
        for _ in range(rounds):
            time.sleep(interval_s)
            t0 = time.perf_counter()
            view.sync()
            costs.append((time.perf_counter() - t0) * 1000)
            pages.append(view.dirty_pages())  # then start the next round from nothing
            with view.lock:
                for bitmap in view.bitmaps:
                    bitmap.fill(0)
        tracker.close()
    return statistics.median(costs), max(costs), int(statistics.median(pages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows, memcpy_gbs = bench_scan.run(args.quick)
    print(f"memcpy ceiling (numpy.copyto, 1 GiB): {memcpy_gbs:.1f} GB/s\n")
    print(f"{'function':<16} {'case':<30} {'pyvmm':>10} {'numpy':>10} {'speed-up':>9}  unit")
    for row in rows:
        ref = "-" if row.numpy_ref is None else f"{row.numpy_ref:10.3f}"
        print(f"{row.function:<16} {row.case:<30} {row.ours:10.3f} {ref:>10} "
              f"{row.speedup():>9}  {row.unit}")  # fmt: skip
    print("\none dirty sync of a 4 GiB guest (memstress mb=256 unpaced on 1 vCPU, every 100 ms)")
    rounds = 10 if args.quick else 30
    for mode in ("bitmap", "ring"):
        median, worst, pages = sync_cost_ms(mode, rounds)
        print(f"  {mode:<7} median {median:7.2f} ms   max {worst:7.2f} ms   {pages:>7} pages/sync")


if __name__ == "__main__":
    main()
