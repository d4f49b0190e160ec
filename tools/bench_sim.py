#!/usr/bin/env python3
"""How fast `pyvmm sim` runs the largest scenarios it ships: beyond-series' 1 TiB,
128-vCPU moderate and heavy original runs and series-2024-full's 100 GiB moderate
original, one seed each, each printed with its wall time, the migration time it
simulated and the ratio of the two. Beside them, in the same run, what the bitmap alone
costs: one count of every set bit in a 1 TiB bitmap (count_set), which is
what the pre-copy loop paid once per turn (a send window of at most 50 ms) before it
stopped counting during the first pass (docs/performance.md, "The simulator at 1 TiB").

Usage: python tools/bench_sim.py [--only COMPARISON/RUN]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pyvmm.dirty.scan import count_set
from pyvmm.sim.comparisons import COMPARISONS, MODEL_DEFAULTS
from pyvmm.sim.engine import simulate
from pyvmm.sim.model import SimModel

RUNS = [
    ("beyond-series", "moderate-original"),
    ("beyond-series", "heavy-original"),
    ("series-2024-full", "moderate-original"),
]
TIB_WORDS = (1 << 40) // 4096 // 64


def count_cost_ms(rounds: int = 5) -> float:
    bitmap = np.full(TIB_WORDS, np.uint64(0xFFFF_FFFF_FFFF_FFFF))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        count_set(bitmap)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="one run, COMPARISON/RUN (default: all three)")
    args = ap.parse_args()
    print(f"one count of a 1 TiB bitmap (32 MiB, best of 5): {count_cost_ms():.2f} ms")
    for comparison, name in RUNS:
        if args.only and args.only != f"{comparison}/{name}":
            continue
        model = SimModel(**MODEL_DEFAULTS.get(comparison, {}))
        scenario, hw = next(
            (sc, hw) for sc, hw in COMPARISONS[comparison]().runs if sc.name == name
        )
        report = simulate(scenario, hw, model)
        wall_s = report["simulation"]["wall_s"]
        simulated_s = report["result"]["total_time"] / 1000
        print(
            f"{comparison}/{name}: {hw.cpus} vCPUs, {hw.mem / 1024:.0f} GiB: {wall_s:.1f} s wall "
            f"for {simulated_s:.1f} s of migration ({simulated_s / wall_s:.0f}x real time), "
            f"{report['result']['status']}"
        )


if __name__ == "__main__":
    main()
