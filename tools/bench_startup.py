#!/usr/bin/env python3
"""Start-up cost of a whole `pyvmm run hello` process, beside `python -c pass` measured in
the same run: medians of --runs runs of each, interleaved (pass, pyvmm, pass, pyvmm, ...)
so that a drift of this shared machine hits both alike. Goal (issue 13): pyvmm within
60 ms of the bare interpreter.

--importtime also prints the modules `pyvmm run hello` imports that cost the most
(python -X importtime, cumulative microseconds, one run).
Usage: python tools/bench_startup.py [--runs 20] [--importtime]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYVMM = [sys.executable, "-m", "pyvmm.cli", "run", "hello"]
BARE = [sys.executable, "-c", "pass"]


def env() -> dict[str, str]:
    """This tree first on the path, and bytecode caching on: an installed pyvmm has its .pyc
    files (pip compiles them), while this workplace sets PYTHONDONTWRITEBYTECODE, which
    made every run compile every pyvmm module again (about 20 ms here)."""
    out = dict(os.environ)
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), out.get("PYTHONPATH")) if p)
    return out


def wall_ms(cmd: list[str], environ: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=environ, capture_output=True, check=False)
    elapsed = (time.perf_counter() - t0) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()}")
    return elapsed


def importtime(environ: dict[str, str], top: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *PYVMM[1:]], env=environ, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        rows.append((int(cumulative_us), int(own_us), name.rstrip()))
    print("\nlargest imports of `pyvmm run hello` (python -X importtime, one run):")
    print(f"{'cumulative ms':>14} {'self ms':>8}  module")
    for cumulative, own, name in sorted(rows, reverse=True)[:top]:
        print(f"{cumulative / 1000:>14.1f} {own / 1000:>8.1f}  {name}")
    names = {name.strip() for _, _, name in rows}
    for heavy in ("numpy", "pyvmm.migration.source", "pyvmm.migration.destination",
                  "pyvmm.dirty.tracker", "hashlib"):  # fmt: skip
        print(f"  {heavy}: {'imported' if heavy in names else 'not imported'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    environ = env()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    wall_ms(PYVMM, environ)  # page cache, and the .pyc files written once
    bare, pyvmm = [], []
    for _ in range(args.runs):
        bare.append(wall_ms(BARE, environ))
        pyvmm.append(wall_ms(PYVMM, environ))
    b, p = statistics.median(bare), statistics.median(pyvmm)
    for label, runs, median in (("python -c pass", bare, b),
                                ("python -m pyvmm.cli run hello", pyvmm, p)):  # fmt: skip
        print(f"{label:<30} median {median:6.1f} ms  (min {min(runs):.1f}, max {max(runs):.1f})")
    print(f"difference of the medians {p - b:.1f} ms (goal: at most 60 ms), {args.runs} runs each")
    if args.importtime:
        importtime(environ, args.top)


if __name__ == "__main__":
    main()
