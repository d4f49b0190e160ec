"""`pyvmm timeline show FILE...` and `pyvmm timeline record ADDR... --seconds S --output FILE`:
read timelines back as text, and record running pyvmm VMs' own timelines for a while
(docs/timeline.md). Printing only; the work is in pyvmm.timeline and the recording client."""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

from pyvmm.monitor.client import SyncQmp
from pyvmm.monitor.recording_client import RecordingError, fetch_timeline, start_recording
from pyvmm.timeline import load, merge, summarize, validate, write


class TimelineError(Exception):
    """A file that is not a timeline, a VMM that cannot record: one line."""


def show_timeline(files: list[Path]) -> int:
    for path in files:
        try:
            trace = load(path)
        except OSError as exc:
            raise TimelineError(f"{path}: {exc.strerror}") from None
        except ValueError as exc:
            raise TimelineError(f"{path}: not JSON ({exc})") from None
        problems = validate(trace)
        if problems:
            raise TimelineError(f"{path}: not a Trace Event Format file ({problems[0]})")
        print(f"== {path}")
        print("\n".join(summarize(trace)))
    return 0


def record_timeline(addresses: list[str], seconds: float, output: Path) -> int:
    if not output.parent.is_dir():
        raise TimelineError(f"--output {output}: no directory {output.parent}")
    with ExitStack() as stack:
        clients = [stack.enter_context(SyncQmp(a, timeout_s=30)) for a in addresses]
        try:
            for address, qmp in zip(addresses, clients, strict=True):
                start_recording(qmp, address)
        except RecordingError as exc:
            raise TimelineError(str(exc)) from None
        time.sleep(seconds)
        merged = merge(*(fetch_timeline(q) for q in clients))
    write(output, merged)
    print(f"timeline: {output} ({len(merged['traceEvents'])} events)", file=sys.stderr)
    return 0
