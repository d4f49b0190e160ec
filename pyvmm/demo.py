"""`pyvmm demo`: the main job on embedded defaults, a live migration you can watch.

1. Boot memverify on 2 vCPUs: each fills its memory with content derived from
   (page, generation) and keeps rewriting and checking it.
2. Start a destination pyvmm process on loopback (`--incoming`, held with -S).
3. Live-migrate the running guest over QMP, showing each pre-copy pass.
4. Compare a hash of guest RAM on both sides at switchover, let the guest go on
   on the destination for a few seconds, and check it found no corrupt page.
Everything runs as real processes; they are stopped whatever happens.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pyvmm.monitor.client import SyncQmp

GUEST_MB_PER_VCPU = 48
VCPUS = 2
MEM = "256M"
OK_LINE = re.compile(r"memverify vcpu=(\d+) ok pages=(\d+)")


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pyvmm.cli", "run", *args],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"a pyvmm process did not start (see {path.parent})")
        time.sleep(0.05)


def _verified(serial: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    if serial.exists():
        for m in OK_LINE.finditer(serial.read_text()):
            out[int(m.group(1))] = int(m.group(2))
    return out


def run_demo(seconds: float = 5.0) -> int:
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="pyvmm-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        return _demo(console, work, procs, seconds)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _demo(console: Console, work: Path, procs: list, seconds: float) -> int:
    mig = f"unix:{work}/migration.sock"
    src_qmp, dst_qmp = work / "source.qmp", work / "destination.qmp"
    src_serial, dst_serial = work / "source.console", work / "destination.console"
    console.rule("[bold]pyvmm demo: live migration of a running guest")
    console.print(f"work directory: {work}")
    machine = ["--mem", MEM, "--vcpus", str(VCPUS)]
    dst = _spawn([*machine, "--incoming", mig, "-S", "--qmp", f"unix:{dst_qmp}",
                  "--serial", str(dst_serial)], work / "destination.log")  # fmt: skip
    procs.append(dst)
    src = _spawn(["memverify", *machine, "--append", f"mb={GUEST_MB_PER_VCPU}",
                  "--qmp", f"unix:{src_qmp}", "--serial", str(src_serial)],
                 work / "source.log")  # fmt: skip
    procs.append(src)
    _wait_for(src_qmp, src)
    _wait_for(dst_qmp, dst)
    console.print(f"source: memverify on {VCPUS} vCPUs, {GUEST_MB_PER_VCPU} MiB each, "
                  "rewriting and checking its pages as fast as it can")  # fmt: skip
    deadline = time.monotonic() + 30
    while min(_verified(src_serial).values() or [0]) == 0 or len(_verified(src_serial)) < VCPUS:
        if time.monotonic() > deadline or src.poll() is not None:
            console.print("[red]the source guest did not start verifying[/]")
            return 1
        time.sleep(0.1)
    checked = sum(_verified(src_serial).values())
    console.print(f"source: verifying, {checked:,} pages checked so far")

    with SyncQmp(f"unix:{src_qmp}") as sq:
        sq.execute("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})  # fmt: skip
        sq.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
        console.print(f"migrating to {mig} (max-bandwidth 1 GiB/s, downtime-limit 300 ms)")
        sq.execute("migrate", {"uri": mig})
        info: dict = {}

        def show_events() -> None:
            for event in sq.events():
                if event["event"] == "MIGRATION_PASS":
                    console.print(f"  dirty sync {event['data']['pass']}")
                elif event["event"] == "MIGRATION":
                    console.print(f"  status: {event['data']['status']}")

        while info.get("status") not in ("completed", "failed", "cancelled"):
            time.sleep(0.05)
            show_events()
            info = sq.execute("query-migrate")
        show_events()  # the final status's event came in before the answer that saw it
        src_hash = ""
        if info["status"] == "completed":  # the source is paused now: its RAM is final
            src_hash = sq.execute("x-pyvmm-query-memory-hash")["sha256"]
    if info["status"] != "completed":
        console.print(f"[red]migration {info['status']}: {info.get('error-desc')}[/]")
        return 1
    with SyncQmp(f"unix:{dst_qmp}") as dq:
        dst_hash = dq.execute("x-pyvmm-query-memory-hash")["sha256"]
        dq.execute("cont")
    _print_stats(console, info)
    same = src_hash == dst_hash
    verdict = "[green]equal[/]" if same else "[red]DIFFERENT[/]"
    console.print(f"guest RAM hash at switchover: source {src_hash[:16]}..., "
                  f"destination {dst_hash[:16]}... {verdict}")  # fmt: skip
    console.print(f"destination: letting the guest run and verify for {seconds:g} s")
    start = _verified(dst_serial)
    time.sleep(seconds)
    end = _verified(dst_serial)
    text = dst_serial.read_text() if dst_serial.exists() else ""
    corrupt = [line for line in text.splitlines() if "CORRUPT" in line]
    progressed = all(end.get(v, 0) > start.get(v, 0) for v in range(VCPUS))
    if corrupt or not progressed or not same or dst.poll() is not None:
        console.print(f"[bold red]FAIL[/]: {corrupt[:1] or 'the guest did not keep verifying'}")
        return 1
    checked = sum(end.values()) - sum(start.values())
    console.print(f"[bold green]PASS[/]: the guest verified {checked:,} more pages on the "
                  "destination and found every one intact")  # fmt: skip
    return 0


def _print_stats(console: Console, info: dict) -> None:
    ram = info["ram"]
    table = Table(title="query-migrate (QEMU's field names)")
    table.add_column("field")
    table.add_column("value", justify="right")
    rows = [
        ("status", info["status"]),
        ("total-time", f"{info['total-time']} ms"),
        ("downtime", f"{info['downtime']} ms"),
        ("setup-time", f"{info['setup-time']} ms"),
        ("ram.transferred", f"{ram['transferred']:,} bytes"),
        ("ram.normal (pages sent)", f"{ram['normal']:,}"),
        ("ram.duplicate (zero pages)", f"{ram['duplicate']:,}"),
        ("ram.dirty-sync-count", str(ram["dirty-sync-count"])),
        ("ram.mbps", f"{ram['mbps']:.0f} Mbit/s"),
        ("ram.precopy-bytes", f"{ram['precopy-bytes']:,}"),
        ("ram.downtime-bytes", f"{ram['downtime-bytes']:,}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
