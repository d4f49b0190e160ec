"""`pyvmm trace`: wire the tracer to its outputs (live lines, summary, timeline) and
detach on Ctrl-C, SIGTERM or after --duration."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pyvmm.timeline import Timeline
from pyvmm.trace.calls import IoctlCall
from pyvmm.trace.errors import TraceError
from pyvmm.trace.lines import CallFilter, format_line
from pyvmm.trace.record import TimelineRecorder
from pyvmm.trace.summary import Summary

log = logging.getLogger(__name__)

DETACH_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
# A traced KVM_RUN holds about 400 bytes until the file is written (measured with
# tracemalloc): half a million of them, 200 MB, is half a minute of iospin traced.
TIMELINE_MAX_EVENTS = 500_000


@dataclass
class TraceOptions:
    pid: int | None = None  # attach to this process ...
    command: list[str] = field(default_factory=list)  # ... or start this one
    filters: list[str] = field(default_factory=list)  # live lines: ioctl names or fd kinds
    summary: bool = False  # tables at the end instead of live lines
    quiet: bool = False  # no live lines
    output: Path | None = None  # Trace Event Format JSON
    duration_s: float | None = None  # detach after this long


@dataclass
class TraceResult:
    exit_code: int
    summary: Summary
    detached: bool
    calls: int


def parse_target(target: list[str]) -> tuple[int | None, list[str]]:
    """`PID` or `COMMAND...` (argparse has already removed the `--` before a command)."""
    if not target:
        raise TraceError("give a PID to attach to, or -- COMMAND... to start under the tracer")
    if len(target) == 1 and target[0].isdigit():
        return int(target[0]), []
    return None, list(target)


def load_tracer() -> type:
    try:
        from pyvmm.trace.ptracer import Tracer
    except ImportError as exc:
        if exc.name in ("ptrace", "ptrace.binding", "ptrace.error", "ptrace.syscall"):
            raise TraceError(
                "python-ptrace is not installed: pip install -e '.[trace]' "
                "(or pip install python-ptrace)"
            ) from None
        raise
    return Tracer


def run_trace(options: TraceOptions, out: TextIO, err: TextIO) -> TraceResult:
    """Trace until the target exits or we are told to detach; return what was seen.

    Live lines go to `out` as calls happen, the summary when tracing ends; notes about
    attaching and detaching go to `err`."""
    call_filter = CallFilter.parse(options.filters)
    if options.output is not None and not options.output.parent.is_dir():
        raise TraceError(f"--output {options.output}: directory {options.output.parent} not found")
    tracer_class = load_tracer()
    t0_ns = time.monotonic_ns()
    summary = Summary(t0_ns)
    timeline: Timeline | None = None
    recorder: TimelineRecorder | None = None
    live = not (options.summary or options.quiet)
    count = 0

    def sink(call: IoctlCall) -> None:
        nonlocal count
        count += 1
        summary.add(call)
        if recorder is not None:
            recorder.add(call)
        if live and call_filter.matches(call):
            out.write(format_line(call, t0_ns) + "\n")

    tracer = tracer_class(sink)
    if options.pid is not None:
        tracer.attach(options.pid)
        what = f"pid {options.pid} ({tracer.process_name()})"
        err.write(f"pyvmm trace: attached to {what}, {len(tracer.threads)} threads\n")
    else:
        pid = tracer.launch(options.command)
        what = f"pid {pid} ({options.command[0]})"
    if options.output is not None:
        timeline = Timeline(pid=tracer.pid, max_events=TIMELINE_MAX_EVENTS)
        timeline.name_process(f"{tracer.process_name()} (pid {tracer.pid}), KVM ioctls")
        timeline.other_data.update(
            source="pyvmm trace", target_pid=tracer.pid,
            command=options.command or None, t0_us=t0_ns / 1000,
        )  # fmt: skip
        timeline.instant("trace start", 0, t0_ns / 1000, scope="g")
        recorder = TimelineRecorder(timeline, tracer.thread_name)
    end = _run_with_signals(tracer, options.duration_s)
    out.flush()
    duration_s = max((end.end_ns - t0_ns) / 1e9, 1e-9)
    if end.detached:
        err.write(f"pyvmm trace: detached from {what} after {duration_s:.1f} s\n")
    elif end.exit_code is not None:
        err.write(f"pyvmm trace: {what} exited with code {end.exit_code}\n")
    if options.summary:
        out.write(f"pyvmm trace: {what}, {end.threads_seen} threads, {duration_s:.2f} s, "
                  f"{count} KVM ioctls\n\n")  # fmt: skip
        out.write(summary.render(duration_s) + "\n")
        out.flush()
    if timeline is not None and recorder is not None and options.output is not None:
        recorder.finish()
        label = "detached" if end.detached else "target exited"
        timeline.instant(label, 0, end.end_ns / 1000, scope="g")
        n = timeline.write(options.output)
        dropped = f" ({timeline.dropped} dropped past the limit)" if timeline.dropped else ""
        err.write(f"pyvmm trace: wrote {n} events to {options.output}{dropped}\n")
    code = end.exit_code if (options.command and not end.detached and end.exit_code) else 0
    return TraceResult(code, summary, end.detached, count)


def _run_with_signals(tracer: Any, duration_s: float | None) -> Any:
    def on_signal(signum: int, frame: object) -> None:
        tracer.request_detach()

    previous: dict[int, Callable | int | None] = {}
    for signum in DETACH_SIGNALS:
        previous[signum] = signal.signal(signum, on_signal)
    if duration_s is not None:
        signal.setitimer(signal.ITIMER_REAL, duration_s)
    try:
        return tracer.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
