#!/usr/bin/env python3
"""Downtime against its limit: a running 512 MiB, 2-vCPU memverify guest migrated at
unlimited bandwidth, N times; per run the downtime pyvmm expected at switchover, the one
it got and where it went (query-migrate's x-downtime-parts), then the percentiles.

Usage: python tools/bench_downtime.py [--runs 20] [--limit-ms 300]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_migrate import UNLIMITED, migrate_once, warm_host_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--limit-ms", type=int, default=300)
    parser.add_argument("--mem-mib", type=int, default=512)
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--vmm", choices=["pyvmm", "qemu"], default="pyvmm")
    args = parser.parse_args()
    warm_host_memory(4)
    work = Path(tempfile.mkdtemp(prefix="pyvmm-downtime-"))
    params = {"max-bandwidth": UNLIMITED, "downtime-limit": args.limit_ms}
    got = []
    print(f"{'run':>3} {'downtime':>9} {'expected':>9}  parts (ms)")
    for i in range(args.runs):
        info = migrate_once(
            args.vmm, work, "memverify", args.mem_mib, "", r"ok pages=[1-9]", False, params,
            vcpus=args.vcpus,
        )  # fmt: skip
        if info["status"] != "completed":
            print(f"{i:>3} {info['status']}: {info.get('error-desc')}")
            continue
        parts = dict(info.get("x-downtime-parts", {}))
        expected = parts.pop("expected", float("nan"))
        got.append(info["downtime"])
        print(
            f"{i:>3} {info['downtime']:>6} ms {expected:>6.0f} ms  "
            + " ".join(f"{k}={v:g}" for k, v in parts.items())
        )
    shutil.rmtree(work, ignore_errors=True)
    if got:
        q = statistics.quantiles(got, n=10) if len(got) > 1 else [got[0]] * 9
        print(
            f"\n{len(got)} runs: median {statistics.median(got):.0f} ms, p90 {q[8]:.0f} ms, "
            f"max {max(got)} ms; limit {args.limit_ms} ms (goal: p90 <= limit + 50)"
        )


if __name__ == "__main__":
    main()
