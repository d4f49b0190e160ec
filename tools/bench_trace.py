#!/usr/bin/env python3
"""What `pyvmm trace` costs the VMM it watches: iospin's port-I/O exits per second,
traced against untraced.

Each run starts `pyvmm run iospin` (one vCPU writing to port 0x80 without end, every
write one exit), waits WARMUP_S, and counts exits over --seconds with pyvmm's own
counter (QMP x-pyvmm-query-exits, read before and after). A traced run first attaches
`pyvmm trace PID` (with --summary by default: no output per call) and waits for its
"attached" line. Traced and untraced runs alternate, starting with the other kind each
round, so a machine that gets busier or quieter during the benchmark affects both; the
figures are medians of --runs runs each.
Usage: python tools/bench_trace.py [--runs 5] [--seconds 3] [--mode summary|lines|json]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvmm.monitor.client import SyncQmp

PYVMM = [sys.executable, "-m", "pyvmm.cli"]
WARMUP_S = 0.5
MODES = {"summary": ["--summary"], "lines": [], "json": ["-q", "--output"]}


def exits(qmp: SyncQmp) -> tuple[float, int]:
    total = qmp.execute("x-pyvmm-query-exits")["total"]
    return time.perf_counter(), total


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the VM exited with {proc.returncode} before opening QMP")
        if time.monotonic() > deadline:
            raise RuntimeError("the VM opened no QMP socket within 30 s")
        time.sleep(0.02)


def start_tracer(pid: int, mode: str, work: Path) -> subprocess.Popen[str]:
    args = [*MODES[mode]] + ([str(work / "trace.json")] if mode == "json" else [])
    tracer = subprocess.Popen([*PYVMM, "trace", *args, str(pid)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert tracer.stderr is not None
    line = tracer.stderr.readline()
    if "attached" not in line:
        tracer.kill()
        raise RuntimeError(f"the tracer did not attach: {line.strip() or tracer.wait()}")
    return tracer


def one_run(traced: bool, seconds: float, mode: str) -> float:
    """Exits per second of one iospin VM, traced or not."""
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as tmp:
        work = Path(tmp)
        qmp_path = work / "vm.qmp"
        cmd = [*PYVMM, "run", "iospin", "--append", f"count={10**15}",
               "--qmp", f"unix:{qmp_path}", "--serial", str(work / "serial")]  # fmt: skip
        vm = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tracer = None
        try:
            wait_for(qmp_path, vm)
            if traced:
                tracer = start_tracer(vm.pid, mode, work)
            time.sleep(WARMUP_S)
            with SyncQmp(f"unix:{qmp_path}", timeout_s=30) as qmp:
                t0, e0 = exits(qmp)
                time.sleep(seconds)
                t1, e1 = exits(qmp)
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                if tracer.wait(30) != 0:
                    raise RuntimeError(f"the tracer ended with {tracer.returncode}")
            return (e1 - e0) / (t1 - t0)
        finally:
            for proc in (tracer, vm):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="counting window per run")
    parser.add_argument("--mode", choices=sorted(MODES), default="summary",
                        help="the tracer's output: summary (default), lines or json")  # fmt: skip
    args = parser.parse_args()
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.runs):
        for traced in (False, True) if i % 2 == 0 else (True, False):
            rates[traced].append(one_run(traced, args.seconds, args.mode))
    plain, traced = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"iospin port-I/O exits per second, 1 vCPU, medians of {args.runs} interleaved runs "
          f"of {args.seconds:g} s (tracer output: {args.mode})")  # fmt: skip
    for label, kind in (("untraced", False), ("traced", True)):
        runs = ", ".join(f"{r:,.0f}" for r in rates[kind])
        print(f"{label:<12} {statistics.median(rates[kind]):>10,.0f}   runs: {runs}")
    extra_us = 1e6 / traced - 1e6 / plain
    print(f"traced/untraced {traced / plain:.1%}; each exit costs {extra_us:.1f} us more traced")


if __name__ == "__main__":
    main()
