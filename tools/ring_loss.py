#!/usr/bin/env python3
"""Does this host lose dirty-ring entries when a ring really fills? The measurements behind
pyvmm's dirty-ring quirk (docs/dirty-tracking.md).

Each row boots the ringprobe guest on a 1-vCPU VM whose ring has ENTRIES entries; the
guest writes one word into each of PAGES fresh pages, at CPL0 (code a kvm_pvm host runs
through its instruction emulator) or CPL3 (native), then exits. The reaper is held back
unless the row says otherwise, so the ring fills and is harvested only at ring-full exits.
Afterwards the pages holding the guest's marker (the exact set written) are compared with
the pages the ring reported.

Usage: python tools/ring_loss.py [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import logging

from pyvmm.dirty.ring_quirk import RingProbeError, probe_pages, run_sweep

CASES = [  # (entries, pages, cpl, reaper)
    (1024, 3000, 0, False),
    (4096, 3000, 0, False),
    (4096, 5000, 0, False),
    (32768, probe_pages(32768), 0, False),
    (65536, probe_pages(65536), 0, False),
    (65536, probe_pages(65536), 0, True),
    (4096, 5000, 3, False),
    (65536, probe_pages(65536), 3, False),
    (65536, 150_000, 3, False),
]
QUICK = [(1024, 3000, 0, False), (4096, 5000, 0, False), (4096, 5000, 3, False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    parser.add_argument("--quick", action="store_true", help="three small cases only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"{'entries':>7} {'pages':>7} {'cpl':>3} {'reaper':>6}  "
          f"{'missing per run':<24} {'ring-full exits':<16} largest harvest")  # fmt: skip
    for entries, pages, cpl, reaper in QUICK if args.quick else CASES:
        missing, exits, largest = [], [], []
        for _ in range(args.repeat):
            try:
                sweep = run_sweep(entries, pages, cpl, reaper=reaper)
            except RingProbeError as exc:
                missing.append(f"error: {exc}")
                continue
            missing.append("livelock" if sweep.livelock else str(sweep.pages_missing))
            exits.append(str(sweep.ring_full_exits))
            largest.append(str(sweep.largest_harvest))
        print(f"{entries:>7} {pages:>7} {cpl:>3} {'on' if reaper else 'off':>6}  "
              f"{' '.join(missing):<24} {' '.join(exits):<16} {' '.join(largest)}")  # fmt: skip


if __name__ == "__main__":
    main()
