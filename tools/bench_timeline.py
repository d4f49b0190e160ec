#!/usr/bin/env python3
"""What recording a timeline costs a migration: interleaved runs with and without it.

Each run starts a destination and a source (`pyvmm run`, real processes), waits until the
guest is in steady state, turns recording on on both (or not), migrates over QMP and
reads query-migrate's total time and downtime. Runs alternate, off then on, so that a
machine that gets busier or quieter affects both sides alike; the figures are medians.
The goal (issue 15): recording changes the total time by less than 2 %.

Scenarios:
  paced      memstress on 2 vCPUs at 50 MiB/s each (it paces itself with the sleep port,
             so every pacing sleep is a span: the most vCPU events per second), 512 MiB,
             max-bandwidth 256 MiB/s: converges on its own in a few seconds
  throttled  memverify on 2 vCPUs x 8 MiB flat out, 16 MiB/s, auto-converge from 60 %
             in steps of 20: throttle sleeps, trigger verdicts and throttle steps

Usage: python tools/bench_timeline.py [--runs 5] [--scenario paced|throttled]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from pyvmm.monitor.client import SyncQmp
from pyvmm.monitor.recording_client import fetch_timeline, start_recording

MIB = 1 << 20
SCENARIOS = {
    "paced": {
        "guest": ["memstress", "--vcpus", "2", "--mem", "512M", "--append", "mb=128 rate=50"],
        "dest": ["--vcpus", "2", "--mem", "512M"],
        "ready": "memstress vcpu=1 mib=",
        "caps": {},
        "params": {"max-bandwidth": 256 * MIB},
    },
    "throttled": {
        "guest": ["memverify", "--vcpus", "2", "--mem", "128M", "--append", "mb=8"],
        "dest": ["--vcpus", "2", "--mem", "128M"],
        "ready": "ok pages=",
        "caps": {"auto-converge": True},
        "params": {
            "max-bandwidth": 16 * MIB,
            "cpu-throttle-initial": 60,
            "cpu-throttle-increment": 20,
            "downtime-limit": 100,
        },
    },
}


def pyvmm(args: list[str], work: Path, name: str) -> subprocess.Popen[bytes]:
    qmp, serial = work / f"{name}.qmp", work / f"{name}.serial"
    cmd = [sys.executable, "-m", "pyvmm.cli", "run", *args, "--qmp", f"unix:{qmp}",
           "--serial", str(serial)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_timeline: {what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.05)


def one_run(scenario: dict, record: bool) -> tuple[float, float, int]:
    """(total ms, downtime ms, events recorded) of one migration."""
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyvmm-tl-")))
        uri = f"unix:{work}/mig.sock"
        procs = [pyvmm([*scenario["dest"], "--incoming", uri], work, "dst"),
                 pyvmm(scenario["guest"], work, "src")]  # fmt: skip
        for proc in procs:
            stack.callback(proc.wait, 10)
            stack.callback(proc.kill)
        serial = work / "src.serial"
        wait_for(lambda: serial.exists() and serial.read_text().count(scenario["ready"]) >= 2,
                 "the guest's steady state")  # fmt: skip
        src = stack.enter_context(SyncQmp(f"unix:{work}/src.qmp", timeout_s=30))
        dst = stack.enter_context(SyncQmp(f"unix:{work}/dst.qmp", timeout_s=30))
        if record:
            start_recording(src, "source")
            start_recording(dst, "destination")
        caps = [{"capability": c, "state": v} for c, v in scenario["caps"].items()]
        if caps:
            src.execute("migrate-set-capabilities", {"capabilities": caps})
        src.execute("migrate-set-parameters", scenario["params"])
        src.execute("migrate", {"uri": uri})
        info: dict = {}

        def ended() -> bool:
            info.update(src.execute("query-migrate"))
            return info.get("status") in ("completed", "failed", "cancelled")

        wait_for(ended, "the migration's end", 300)
        if info["status"] != "completed":
            raise SystemExit(f"bench_timeline: the migration {info['status']}: {info}")
        events = 0
        if record:
            events = sum(len(fetch_timeline(q)["traceEvents"]) for q in (src, dst))
        return float(info["total-time"]), float(info["downtime"]), events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="paced")
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for i in range(args.runs):
        for record in (False, True):
            results[record].append(one_run(scenario, record))
            total, down, events = results[record][-1]
            print(f"run {i + 1} recording {'on ' if record else 'off'}: total {total:.0f} ms, "
                  f"downtime {down:.0f} ms, {events} events", flush=True)  # fmt: skip
    off = statistics.median(r[0] for r in results[False])
    on = statistics.median(r[0] for r in results[True])
    down_off = statistics.median(r[1] for r in results[False])
    down_on = statistics.median(r[1] for r in results[True])
    events = statistics.median(r[2] for r in results[True])
    cost = (on - off) / off * 100
    spread = (max(r[0] for r in results[False]) - min(r[0] for r in results[False])) / off * 100
    print(f"\nscenario {args.scenario}, {args.runs} runs each, interleaved; load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'':24} {'off':>10} {'on':>10}")
    print(f"{'total time (median)':24} {off:>8.0f} ms {on:>8.0f} ms")
    print(f"{'downtime (median)':24} {down_off:>8.0f} ms {down_on:>8.0f} ms")
    print(f"{'events recorded (median)':24} {'':>10} {events:>10.0f}")
    print(f"recording changes the total time by {cost:+.1f} % (goal: under 2 %; the off runs "
          f"themselves spread over {spread:.1f} %)")  # fmt: skip


if __name__ == "__main__":
    main()
