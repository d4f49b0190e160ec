#!/usr/bin/env python3
"""How fast a flat-out guest dirties memory again right after a sync: memstress on one
vCPU rewrites N MiB (one store per page) as fast as it can; a migration-style dirty view
(the bitmap, get/clear/copy) is drained and synced again after a pause, and the pages the
sync finds are the pages the guest managed to write in that pause. Each first write
after a sync faults to KVM (the page was write-protected again), so on a host where that
fault is slow (nested, shadow paging) the count is far below the guest's nominal rate.

Usage: python tools/bench_refault.py [--mib 8] [--pauses-ms 0,1,5,50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from pyvmm.dirty.factory import make_tracker
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.elf import load_pvh_image
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.migration.dirtypages import DirtyPages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=8)
    parser.add_argument("--pauses-ms", default="0,1,5,50")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pauses = [float(p) for p in args.pauses_ms.split(",")]
    serial = SerialConsole(io.StringIO())
    config = MachineConfig((args.mib + 64) << 20, 1, f"mb={args.mib}")
    with Machine(config, serial) as machine:
        machine.boot(load_pvh_image(resolve_image("memstress")))
        machine.start()
        time.sleep(1)  # first touch over
        tracker = make_tracker(machine)
        view = tracker.open_view("refault", defer_clear=True, initially_dirty=True)
        pages = DirtyPages(view)
        total = args.mib * 256
        print(f"tracker {type(tracker).__name__}; memstress rewrites {total} pages flat out")
        print(f"{'pause ms':>8} {'pages found (median)':>21} {'pages/ms':>9}")
        for pause_ms in pauses:
            found = []
            for _ in range(args.rounds):
                while pages.take() is not None:  # send everything: re-arms tracking
                    pass
                time.sleep(pause_ms / 1000)
                found.append(view.sync())
            median = statistics.median(found)
            rate = f"{median / pause_ms:.0f}" if pause_ms else "-"
            print(f"{pause_ms:>8g} {median:>21.0f} {rate:>9}")
        view.close()


if __name__ == "__main__":
    main()
