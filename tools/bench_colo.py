#!/usr/bin/env python3
"""What COLO costs here: how long one checkpoint takes, how long it stops the primary,
and the service's throughput and latency without COLO, in COLO mode and in passive
mode (docs/colo.md, "What it costs").

Each scenario runs a fresh primary (guest/colosvc.c, 1 vCPU, 64 MiB) and secondary with
the comparator of pyvmm/colo, and a load client that keeps `--depth` requests in
flight, as fast as they are answered, for `--seconds`:

  plain          the primary alone behind the comparator (no x-colo)
  idle           COLO without requests, x-colo-max-time 250 ms: a checkpoint of a guest
                 that dirties almost nothing (the fixed cost)
  colo           COLO, deterministic requests (inc; each rewrites one page of the
                 guest's region): checkpoints only at x-colo-max-time
  passive        clock answers until passive mode, then deterministic requests in it
                 (colo-passive-count so large that it stays): every answer waits for
                 the checkpoint that commits it (colo-passive-time)

It prints one row per scenario and the load average, for docs/colo.md; figures taken on
a shared machine vary from run to run, so run it a few times.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm.colo.client import INC, TIME, LoadClient
from pyvmm.colo.proxy import CompareProxy, ProxyConfig
from pyvmm.monitor.client import SyncQmp

logging.getLogger("pyvmm.colo").setLevel(logging.ERROR)  # the teardown's "gone" lines


def spawn(work: Path, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm.cli", "run", *args, "--qmp", f"unix:{work}/{name}.qmp",
         "--serial", str(work / f"{name}.console")],
        stdout=subprocess.DEVNULL, stderr=(work / f"{name}.log").open("wb"),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (work / f"{name}.qmp").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start: {(work / f'{name}.log').read_text()}")
        time.sleep(0.05)
    return proc


def qmp(work: Path, name: str, command: str, **args: object) -> dict:
    with SyncQmp(f"unix:{work}/{name}.qmp", timeout_s=20) as q:
        return q.execute(command, args or None)


def scenario(name: str, opts: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="colo-bench-", dir="/tmp"))
    proxy = CompareProxy(ProxyConfig(
        "tcp:127.0.0.1:0", f"unix:{work}/p.com2", f"unix:{work}/s.com2", f"unix:{work}/ctl",
        timeout_ms=1000, check_ms=200,
    ))  # fmt: skip
    proxy.open()
    proxy.start()
    procs = []
    client = None
    try:
        machine = ["--mem", "64M", "--vcpus", "1"]
        if name != "plain":
            procs.append(spawn(work, "svm", [*machine, "--incoming", f"unix:{work}/mig",
                                             "--serial2", f"unix:{work}/s.com2"]))  # fmt: skip
        procs.append(spawn(work, "pvm", ["colosvc", *machine, "--append", "mb=4",
                                         "--serial2", f"unix:{work}/p.com2",
                                         "--colo-compare", f"unix:{work}/ctl"]))  # fmt: skip
        client = LoadClient(*proxy.client_address, INC, depth=opts.depth)
        client.start()
        if name != "plain":
            qmp(work, "pvm", "migrate-set-capabilities",
                capabilities=[{"capability": "x-colo", "state": True}])  # fmt: skip
            max_time = 250 if name == "idle" else opts.max_time
            params = {"x-colo-max-time": max_time, "max-bandwidth": 0}
            if name == "passive":
                params.update({"colo-passive-count": 1_000_000,
                               "colo-passive-time": opts.passive_time})  # fmt: skip
            qmp(work, "pvm", "migrate-set-parameters", **params)
            qmp(work, "pvm", "migrate", uri=f"unix:{work}/mig")
            deadline = time.monotonic() + 30
            while qmp(work, "pvm", "query-migrate").get("status") != "colo":
                assert time.monotonic() < deadline, "COLO did not start"
                time.sleep(0.1)
        if name == "passive":
            client.set_op(TIME)
            deadline = time.monotonic() + 20
            while qmp(work, "pvm", "x-query-colo-stats")["mode"] != "passive":
                assert time.monotonic() < deadline, "no passive mode"
                time.sleep(0.1)
            client.set_op(INC)
        if name == "idle":
            client.pause(True)
        time.sleep(1.0)  # settle
        start_stats = qmp(work, "pvm", "x-query-colo-stats")
        client.stats.latencies_ms.clear()
        answered, t0 = client.stats.answered, time.monotonic()
        time.sleep(opts.seconds)
        rate = (client.stats.answered - answered) / (time.monotonic() - t0)
        stats = qmp(work, "pvm", "x-query-colo-stats")
        lat = sorted(client.stats.latencies_ms)
        new = [r for r in stats["recent"] if r["number"] > start_stats["checkpoints"]]
        return {
            "scenario": name, "req/s": rate,
            "p50 ms": statistics.median(lat) if lat else 0.0,
            "p99 ms": lat[int(len(lat) * 0.99) - 1] if lat else 0.0,
            "checkpoints": len(new),
            "duration ms": statistics.mean(r["duration-ms"] for r in new) if new else 0.0,
            "pause ms": statistics.mean(r["pause-ms"] for r in new) if new else 0.0,
            "max pause ms": max((r["pause-ms"] for r in new), default=0.0),
            "bytes": int(statistics.mean(r["bytes"] for r in new)) if new else 0,
            "pages": statistics.mean(r["pages"] for r in new) if new else 0.0,
            "errors": len(client.stats.errors),
        }  # fmt: skip
    finally:
        if client is not None:
            client.stop()
        for proc in procs:
            proc.kill()
            proc.wait()
        proxy.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--depth", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-time", type=int, default=2000, help="x-colo-max-time, ms")
    parser.add_argument("--passive-time", type=int, default=250, help="colo-passive-time, ms")
    parser.add_argument("--only", nargs="*", default=["plain", "idle", "colo", "passive"])
    opts = parser.parse_args()
    rows = [scenario(name, opts) for name in opts.only]
    cols = list(rows[0])
    print("  ".join(f"{c:>12}" for c in cols))
    for row in rows:
        print("  ".join(f"{v:>12.1f}" if isinstance(v, float) else f"{v!s:>12}"
                        for v in row.values()))  # fmt: skip
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
