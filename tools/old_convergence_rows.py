"""The plain auto-converge rows of the old `convergence` comparison (commit f713af4's
pyvmm/bench/comparisons.py: 2 vCPUs x 512, 256 and 64 MiB at 64 MiB/s, periodic sync off,
which is `x-auto-converge-sync=iteration` today), run by today's `pyvmm bench batch`, for
comparing real runs before and after a change to the migration code (docs/sim.md, "The
real runs are unchanged"):

    python tools/old_convergence_rows.py batch convergence \\
        --filter '*/[lm]*ac-9.1' --repeat 3 --output /tmp/ba/after --sleep 3

Every `pyvmm bench batch` option works; the rows are named as they were (light-ac-9.1, ...).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from pyvmm.bench import comparisons
from pyvmm.bench.cli import main
from pyvmm.bench.comparisons import Comparison
from pyvmm.bench.scenario import Hardware, Scenario

LOADS_MIB = {"heavy": 512, "moderate": 256, "light": 64}  # per vCPU, as at f713af4


def convergence() -> Comparison:
    runs = []
    for load, mib in LOADS_MIB.items():
        hw = Hardware(cpus=2, mem=2 * mib, stress_mem=mib)
        base = Scenario(bandwidth=64, max_time=420, max_iters=1000)
        runs.append((replace(base, name=f"{load}-ac-9.1", auto_converge=True,
                             sync="iteration"), hw))  # fmt: skip
    return Comparison("convergence", "f713af4's plain auto-converge rows", runs)


if __name__ == "__main__":
    comparisons.COMPARISONS["convergence"] = convergence
    sys.exit(main(sys.argv[1:]))
