"""`pyvmm migrate`: set parameters and capabilities, start, and optionally follow a
migration over the source's QMP socket. Only QMP: this works against QEMU too, except
`--trace`, which asks pyvmm (source, and destination with --dest-qmp) to record its own
timeline and writes both into one Trace Event Format file (docs/timeline.md)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from pyvmm.migration.params import ParameterError, parse_cli_value
from pyvmm.monitor.client import QmpCommandError, SyncQmp
from pyvmm.monitor.recording_client import RecordingError, fetch_timeline, start_recording
from pyvmm.timeline import merge, write

FINAL = ("completed", "failed", "cancelled")
POLL_S = 0.1


class MigrateError(Exception):
    pass


def _parse_pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MigrateError(f"{what} '{item}' is not NAME=VALUE")
        pairs.append((name, value))
    return pairs


def run_migrate(args: argparse.Namespace) -> int:
    try:
        params = {n: parse_cli_value(n, v) for n, v in _parse_pairs(args.set, "--set")}
        caps = []
        for name, value in _parse_pairs(args.cap, "--cap"):
            if value not in ("on", "off"):
                raise MigrateError(f"--cap {name}={value}: use on or off")
            caps.append({"capability": name, "state": value == "on"})
        trace = Path(args.trace) if args.trace else None
        if args.dest_qmp and trace is None:
            raise MigrateError("--dest-qmp is only for --trace (the destination's timeline)")
        if args.cancel_after is not None and not (args.wait or trace):
            raise MigrateError("--cancel-after needs --wait or --trace")
        if trace is not None and not trace.parent.is_dir():
            raise MigrateError(f"--trace {trace}: no directory {trace.parent}")
    except (ParameterError, MigrateError) as exc:
        print(f"pyvmm: error: {exc}", file=sys.stderr)
        return 1
    with ExitStack() as stack:
        qmp = stack.enter_context(SyncQmp(args.address, timeout_s=30))
        recorded = [qmp]
        try:
            if trace is not None:  # before anything changes, so the parameters are in it
                if args.dest_qmp:
                    recorded.append(stack.enter_context(SyncQmp(args.dest_qmp, timeout_s=30)))
                for name, q in zip(("source", "destination"), recorded, strict=False):
                    start_recording(q, name)
            if caps:
                qmp.execute("migrate-set-capabilities", {"capabilities": caps})
            if params:
                qmp.execute("migrate-set-parameters", params)
            qmp.execute("migrate", {"uri": args.uri})
        except (QmpCommandError, RecordingError) as exc:
            print(f"pyvmm: error: {getattr(exc, 'desc', exc)}", file=sys.stderr)
            return 1
        if not args.wait and trace is None:
            if args.json:
                print(json.dumps(qmp.execute("query-migrate")))
            return 0
        final = _follow(qmp, args.cancel_after)
        if trace is not None:
            merged = merge(*(fetch_timeline(q) for q in recorded))
            write(trace, merged)
            print(f"timeline: {trace} ({len(merged['traceEvents'])} events; open it in "
                  "ui.perfetto.dev)", file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps(final))
    status = final.get("status")
    if status != "completed":
        reason = final.get("error-desc", status)
        print(f"pyvmm: migration {status}: {reason}", file=sys.stderr)
        return 1
    if not args.json:
        ram = final.get("ram", {})
        print(
            f"migration completed: {ram.get('transferred', 0)} bytes in "
            f"{final.get('total-time')} ms, downtime {final.get('downtime')} ms",
            file=sys.stderr,
        )
    return 0


def _follow(qmp: SyncQmp, cancel_after_s: float | None = None) -> dict[str, Any]:
    """Poll query-migrate until the end; Ctrl-C, or `cancel_after_s` passing, cancels the
    migration (and waits for it)."""
    deadline = None if cancel_after_s is None else time.monotonic() + cancel_after_s
    interrupted = threading.Event()
    old = signal.signal(signal.SIGINT, lambda s, f: interrupted.set())
    progress = None
    try:
        if sys.stderr.isatty():
            progress = Progress(
                TextColumn("{task.fields[status]}"), BarColumn(), DownloadColumn(),
                TextColumn("{task.fields[mbps]:.0f} Mbit/s"), TimeElapsedColumn(),
                transient=True, console=Console(stderr=True),
            )  # fmt: skip
            progress.start()
            task = progress.add_task("migrate", total=None, status="setup", mbps=0.0)
        cancelled = False
        while True:
            info = qmp.execute("query-migrate")
            status = info.get("status", "none")
            if status in FINAL:
                return info
            late = deadline is not None and time.monotonic() > deadline
            if (interrupted.is_set() or late) and not cancelled:
                qmp.execute("migrate_cancel")
                cancelled = True
            if progress is not None:
                ram = info.get("ram", {})
                done = ram.get("transferred", 0)
                total = done + ram.get("remaining", 0)
                progress.update(task, completed=done, total=total or None, status=status,
                                mbps=ram.get("mbps", 0.0))  # fmt: skip
            time.sleep(POLL_S)
    finally:
        if progress is not None:
            progress.stop()
        signal.signal(signal.SIGINT, old)
