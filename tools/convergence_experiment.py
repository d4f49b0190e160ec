#!/usr/bin/env python3
"""The 2024 auto-converge series' comparison, at small scale, on pyvmm.

Each run: a memstress guest on 2 vCPUs rewriting WS MiB each as fast as it can, migrated
over loopback with max-bandwidth capped (default 64 MiB/s) so that one pass over the
working set takes many seconds, under one convergence configuration. Columns: total
time, downtime, dirty syncs, max throttle. A run that does not finish within --max-time
is cancelled and reported as such.

Usage: python tools/convergence_experiment.py [--loads heavy] [--configs ...] [--runs 3]
Prints a Markdown table (mean and spread over runs) for docs/convergence.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_migrate import spawn, wait_path, wait_serial

from pyvmm.monitor.client import SyncQmp

LOADS = {"light": 64, "moderate": 256, "heavy": 512}  # MiB per vCPU
CONFIGS: dict[str, tuple[dict[str, bool], dict[str, object], bool]] = {
    # name: (capabilities, parameters, dirty ring)
    "no throttle": ({}, {}, False),
    "auto-converge, QEMU <= 9.1": (
        {"auto-converge": True}, {"x-cpu-throttle-periodic-sync": False}, False),
    "auto-converge + periodic sync (9.2)": ({"auto-converge": True}, {}, False),
    "9.2 + responsive throttle": (
        {"auto-converge": True}, {"cpu-throttle-responsive": True}, False),
    "2013 auto-converge": ({"auto-converge": True}, {"x-auto-converge-legacy": True}, False),
    "dirty limit": ({"dirty-limit": True}, {}, True),
}  # fmt: skip


def run_once(work: Path, load_mib: int, config: str, bandwidth: int, max_time_s: float) -> dict:
    caps, params, ring = CONFIGS[config]
    run_dir = Path(tempfile.mkdtemp(dir=work))
    mem = f"{2 * load_mib + 256}M"
    py = [sys.executable, "-m", "pyvmm.cli", "run", "--mem", mem, "--vcpus", "2"]
    extra = ["--dirty-ring"] if ring else []
    mig = f"unix:{run_dir}/mig.sock"
    dst = [*py, *extra, "--incoming", mig, "--qmp", f"unix:{run_dir}/d.qmp"]
    # The guest name goes before --dirty-ring, whose value is optional.
    src = [*py, "memstress", *extra, "--append", f"mb={load_mib}",
           "--qmp", f"unix:{run_dir}/s.qmp", "--serial", str(run_dir / "s.serial")]  # fmt: skip
    with ExitStack() as stack:
        stack.enter_context(spawn(dst, run_dir / "d.log"))
        stack.enter_context(spawn(src, run_dir / "s.log"))
        wait_path(run_dir / "s.qmp")
        wait_serial(run_dir / "s.serial", r"vcpu=1 mib=")
        with SyncQmp(f"unix:{run_dir}/s.qmp", timeout_s=60) as q:
            if caps:
                q.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": c, "state": v} for c, v in caps.items()]})  # fmt: skip
            q.execute("migrate-set-parameters", {"max-bandwidth": bandwidth, **params})
            q.execute("migrate", {"uri": mig})
            t0, max_pct, cancelled = time.monotonic(), 0, False
            while True:
                info = q.execute("query-migrate")
                max_pct = max(max_pct, info.get("cpu-throttle-percentage", 0))
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > max_time_s and not cancelled:
                    q.execute("migrate_cancel")
                    cancelled = True
                time.sleep(0.2)
    ram = info.get("ram", {})
    return {
        "status": info.get("status"),
        "total_s": info.get("total-time", 0) / 1000,
        "downtime_ms": info.get("downtime"),
        "syncs": ram.get("dirty-sync-count", 0),
        "max_throttle": max_pct,
    }


def summarize(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bandwidth-mib", type=int, default=64)
    parser.add_argument("--max-time", type=float, default=180.0, help="seconds, then cancel")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyvmm-convergence-"))
    print(f"2 vCPUs, memstress unpaced, max-bandwidth {args.bandwidth_mib} MiB/s, "
          f"{args.runs} run(s) each, cancelled after {args.max_time:.0f} s\n")  # fmt: skip
    print(
        "| load (MiB/vCPU) | configuration | completed | total time (s) | downtime (ms) "
        "| dirty syncs | max throttle (%) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for load in args.loads:
        for config in args.configs:
            runs = [run_once(work, LOADS[load], config, args.bandwidth_mib << 20, args.max_time)
                    for _ in range(args.runs)]  # fmt: skip
            done = [r for r in runs if r["status"] == "completed"]
            print(
                f"| {load} ({LOADS[load]}) | {config} | {len(done)}/{len(runs)} | "
                f"{summarize([r['total_s'] for r in done])} | "
                f"{summarize([float(r['downtime_ms']) for r in done])} | "
                f"{summarize([float(r['syncs']) for r in runs])} | "
                f"{summarize([float(r['max_throttle']) for r in runs])} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
