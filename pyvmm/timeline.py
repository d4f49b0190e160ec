"""Timelines in the Chrome Trace Event Format: JSON that ui.perfetto.dev and chrome://tracing open.

A `Timeline` collects events in memory and writes one JSON object:

    {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}

Tracks are threads: every event carries a `pid` (the process) and a `tid` (the track),
and metadata events ("M") give both their names. The event kinds used here:

| ph  | what                  | fields beyond name, ph, ts, pid, tid            |
| --- | --------------------- | ----------------------------------------------- |
| X   | complete event (span) | dur (us), cat, args                             |
| i   | instant               | s: "t" thread, "p" process or "g" global scope  |
| C   | counter               | args: {series: number}; one track per name      |
| M   | metadata              | name: process_name / thread_name / *_sort_index |

Timestamps are microseconds of CLOCK_MONOTONIC (time.monotonic_ns() / 1000), the same
clock in every process on a host, so timelines written by different processes (the
tracer, the VMMs of a migration) line up when merged with `merge`.

Recording is cheap and safe from any thread: an event is one tuple appended to a list
(atomic under the GIL); the JSON is built only by `write`. Past `max_events` events are
counted in `dropped` instead of stored, so a long run cannot exhaust memory.

This module imports nothing from pyvmm and nothing outside the standard library, so
any layer can record with it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_MAX_EVENTS = 2_000_000
# Synthetic tracks (not real threads) get ids above Linux's largest possible tid (2^22).
FIRST_SYNTHETIC_TID = (1 << 22) + 1
INSTANT_SCOPES = ("t", "p", "g")
METADATA_NAMES = (
    "process_name",
    "process_labels",
    "process_sort_index",
    "thread_name",
    "thread_sort_index",
)
PHASES = "BEXiICMbensftPONDcR"  # every phase letter the format documents


def monotonic_us() -> float:
    return time.monotonic_ns() / 1000.0


class Timeline:
    """An in-memory Trace Event Format recorder for one process (more may be named)."""

    def __init__(
        self,
        pid: int | None = None,
        process_name: str | None = None,
        max_events: int = DEFAULT_MAX_EVENTS,
        clock_us: Callable[[], float] = monotonic_us,
    ) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.max_events = max_events
        self.clock_us = clock_us
        self.dropped = 0
        self.other_data: dict[str, Any] = {}
        # (ph, name, cat, ts_us, dur_us or scope or None, pid, tid, args)
        self._events: list[tuple[str, str, str, float, Any, int, int, Any]] = []
        self._metadata: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._next_synthetic_tid = FIRST_SYNTHETIC_TID
        if process_name is not None:
            self.name_process(process_name)

    def __len__(self) -> int:
        return len(self._events)

    def now_us(self) -> float:
        return self.clock_us()

    # --- names -------------------------------------------------------------------------------

    def name_process(
        self, name: str, pid: int | None = None, sort_index: int | None = None
    ) -> None:
        pid = self.pid if pid is None else pid
        self._metadata[("process_name", pid, 0)] = {"name": name}
        if sort_index is not None:
            self._metadata[("process_sort_index", pid, 0)] = {"sort_index": sort_index}

    def name_track(
        self, tid: int, name: str, pid: int | None = None, sort_index: int | None = None
    ) -> None:
        """Name a track (a thread id, real or from new_track); the last name given wins."""
        pid = self.pid if pid is None else pid
        self._metadata[("thread_name", pid, tid)] = {"name": name}
        if sort_index is not None:
            self._metadata[("thread_sort_index", pid, tid)] = {"sort_index": sort_index}

    def thread_track(self, name: str | None = None, sort_index: int | None = None) -> int:
        """The calling thread's track (its native id), named once: `name` or the thread's."""
        tid = threading.get_native_id()
        if ("thread_name", self.pid, tid) not in self._metadata:
            self.name_track(tid, name or threading.current_thread().name, sort_index=sort_index)
        return tid

    def new_track(self, name: str, pid: int | None = None, sort_index: int | None = None) -> int:
        """A track that is not a thread (say, "migration"); returns its tid."""
        tid = self._next_synthetic_tid
        self._next_synthetic_tid += 1
        self.name_track(tid, name, pid, sort_index)
        return tid

    # --- events ------------------------------------------------------------------------------

    def _add(self, event: tuple[str, str, str, float, Any, int, int, Any]) -> None:
        if len(self._events) >= self.max_events:
            self.dropped += 1
            return
        self._events.append(event)

    def complete(
        self,
        name: str,
        ts_us: float,
        dur_us: float,
        tid: int,
        *,
        cat: str = "",
        args: Mapping[str, Any] | None = None,
        pid: int | None = None,
    ) -> None:
        """A span ("X") from ts_us lasting dur_us on track tid."""
        self._add(("X", name, cat, ts_us, max(dur_us, 0.0), self.pid if pid is None else pid,
                   tid, args))  # fmt: skip

    @contextmanager
    def span(
        self, name: str, tid: int, *, cat: str = "", args: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Record the with-block as a complete event; the yielded dict becomes its args."""
        extra: dict[str, Any] = dict(args or {})
        start = self.clock_us()
        try:
            yield extra
        finally:
            self.complete(name, start, self.clock_us() - start, tid, cat=cat, args=extra or None)

    def instant(
        self,
        name: str,
        tid: int,
        ts_us: float | None = None,
        *,
        scope: str = "t",
        cat: str = "",
        args: Mapping[str, Any] | None = None,
        pid: int | None = None,
    ) -> None:
        """A point in time ("i"); scope "t" marks the track, "p" the process, "g" all."""
        if scope not in INSTANT_SCOPES:
            raise ValueError(f"instant scope {scope!r}: use one of {INSTANT_SCOPES}")
        ts = self.clock_us() if ts_us is None else ts_us
        self._add(("i", name, cat, ts, scope, self.pid if pid is None else pid, tid, args))

    def counter(
        self,
        name: str,
        values: Mapping[str, float],
        ts_us: float | None = None,
        *,
        tid: int = 0,
        cat: str = "",
        pid: int | None = None,
    ) -> None:
        """Counter samples ("C"): one track named `name` with one series per key."""
        ts = self.clock_us() if ts_us is None else ts_us
        self._add(("C", name, cat, ts, None, self.pid if pid is None else pid, tid, dict(values)))

    # --- output ------------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """All events as Trace Event dicts: metadata first, then by timestamp."""
        out: list[dict[str, Any]] = [
            {"name": kind, "ph": "M", "ts": 0, "pid": pid, "tid": tid, "args": args}
            for (kind, pid, tid), args in self._metadata.items()
        ]
        for ph, name, cat, ts, extra, pid, tid, args in sorted(self._events, key=_by_ts):
            event: dict[str, Any] = {"name": name, "ph": ph, "ts": round(ts, 3), "pid": pid,
                                     "tid": tid}  # fmt: skip
            if cat:
                event["cat"] = cat
            if ph == "X":
                event["dur"] = round(extra, 3)
            elif ph == "i":
                event["s"] = extra
            if args:
                event["args"] = args
            out.append(event)
        return out

    def to_dict(self) -> dict[str, Any]:
        other = {**self.other_data, "clock": "CLOCK_MONOTONIC", "dropped_events": self.dropped}
        return {"traceEvents": self.events(), "displayTimeUnit": "ms", "otherData": other}

    def write(self, path: str | Path) -> int:
        """Write the JSON file; returns the number of events written."""
        data = self.to_dict()
        _write_json(Path(path), data)
        return len(data["traceEvents"])


def _by_ts(event: tuple[str, str, str, float, Any, int, int, Any]) -> tuple[float, float]:
    # At equal timestamps the longer span first: it encloses the shorter (a parent recorded
    # after its children still comes before them, as viewers expect).
    return event[3], -event[4] if event[0] == "X" else 0.0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # One event per line: the file stays readable with grep and diff.
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write('{"displayTimeUnit": ')
        f.write(json.dumps(data.get("displayTimeUnit", "ms")))
        f.write(', "otherData": ')
        f.write(json.dumps(data.get("otherData", {}), default=str))
        f.write(', "traceEvents": [\n')
        events = data["traceEvents"]
        for i, event in enumerate(events):
            f.write(json.dumps(event, separators=(",", ":"), default=str))
            f.write(",\n" if i + 1 < len(events) else "\n")
        f.write("]}\n")
    tmp.replace(path)


def load(path: str | Path) -> dict[str, Any]:
    """Read a trace file (object or bare-array form) as the object form."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        data = {"traceEvents": data}
    return data


def merge(*traces: Mapping[str, Any]) -> dict[str, Any]:
    """One trace from several (same clock): events concatenated, otherData kept per source."""
    events: list[dict[str, Any]] = []
    sources = []
    for trace in traces:
        events.extend(trace.get("traceEvents", []))
        sources.append(trace.get("otherData", {}))
    meta = [e for e in events if e.get("ph") == "M"]
    rest = sorted((e for e in events if e.get("ph") != "M"), key=lambda e: e.get("ts", 0))
    return {"traceEvents": meta + rest, "displayTimeUnit": "ms", "otherData": {"merged": sources}}


def write(path: str | Path, trace: Mapping[str, Any]) -> None:
    """Write a trace object (say, the result of merge) the way Timeline.write does."""
    _write_json(Path(path), dict(trace))


def validate(trace: Any) -> list[str]:
    """Problems that would keep a trace from loading as the Trace Event Format documents it.

    Checks the container, each event's required fields and types, and the fields each
    phase needs (X: dur >= 0; i: scope; C: numeric args; M: a known name with its arg).
    An empty list means the trace is well formed.
    """
    problems: list[str] = []
    if isinstance(trace, list):
        events = trace
    elif isinstance(trace, dict) and isinstance(trace.get("traceEvents"), list):
        events = trace["traceEvents"]
        unit = trace.get("displayTimeUnit", "ms")
        if unit not in ("ms", "ns"):
            problems.append(f"displayTimeUnit {unit!r} is neither 'ms' nor 'ns'")
    else:
        return ["not a JSON array nor an object with a traceEvents array"]
    for i, event in enumerate(events):
        problems.extend(f"event {i}: {p}" for p in _event_problems(event))
        if len(problems) > 50:
            problems.append("(more problems not listed)")
            break
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _event_problems(event: Any) -> list[str]:
    if not isinstance(event, dict):
        return ["not an object"]
    problems = []
    ph = event.get("ph")
    if not isinstance(ph, str) or len(ph) != 1 or ph not in PHASES:
        return [f"ph {ph!r} is not a Trace Event phase"]
    if not isinstance(event.get("name"), str):
        problems.append("name missing or not a string")
    if not _is_number(event.get("ts")):
        problems.append("ts missing or not a number")
    for key in ("pid", "tid"):
        if not isinstance(event.get(key), int):
            problems.append(f"{key} missing or not an integer")
    if "cat" in event and not isinstance(event["cat"], str):
        problems.append("cat is not a string")
    args = event.get("args")
    if args is not None and not isinstance(args, dict):
        problems.append("args is not an object")
    if ph == "X" and not (_is_number(event.get("dur")) and event["dur"] >= 0):
        problems.append("complete event without a dur >= 0")
    if ph in "iI" and event.get("s", "t") not in INSTANT_SCOPES:
        problems.append(f"instant scope {event.get('s')!r} is not t, p or g")
    if ph == "C" and not (isinstance(args, dict) and args and all(map(_is_number, args.values()))):
        problems.append("counter without numeric args")
    if ph == "M":
        name = event.get("name")
        if name not in METADATA_NAMES:
            problems.append(f"metadata name {name!r} is not one of {METADATA_NAMES}")
        elif name.endswith("_name") and not isinstance((args or {}).get("name"), str):
            problems.append(f"{name} without args.name")
        elif name.endswith("_sort_index") and not isinstance((args or {}).get("sort_index"), int):
            problems.append(f"{name} without an integer args.sort_index")
    return problems


# --- reading a trace back: a text summary (`pyvmm timeline show`) ---------------------------


def summarize(trace: Mapping[str, Any], max_instants: int = 60) -> list[str]:
    """Lines that say what a trace holds, process by process and track by track: the
    spans of each name (count, total and longest duration), the instants in time order
    and each counter's range. Times are seconds from the trace's first event."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}  # fmt: skip
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    timed = [e for e in events if e.get("ph") != "M"]
    if not timed:
        return ["(no events)"]
    t0 = min(e["ts"] for e in timed)
    lines: list[str] = []
    for pid in sorted({e["pid"] for e in timed}):
        lines.append(processes.get(pid, f"process {pid}"))
        mine = [e for e in timed if e["pid"] == pid]
        spans: dict[int, dict[str, list[float]]] = {}
        for e in mine:
            if e["ph"] == "X":
                spans.setdefault(e["tid"], {}).setdefault(e["name"], []).append(e["dur"])
        for tid in sorted(spans, key=lambda t: names.get((pid, t), str(t))):
            parts = [f"{name} x{len(d)} {sum(d) / 1e6:.3f} s (longest {max(d) / 1e3:.1f} ms)"
                     for name, d in spans[tid].items()]  # fmt: skip
            lines.append(f"  {names.get((pid, tid), f'thread {tid}')}: " + "; ".join(parts))
        instants = [e for e in mine if e["ph"] in "iI"]
        for e in instants[:max_instants]:
            lines.append(f"  {(e['ts'] - t0) / 1e6:8.3f} s  {e['name']}")
        if len(instants) > max_instants:
            lines.append(f"  ... {len(instants) - max_instants} more instants")
        counters: dict[str, list[float]] = {}
        for e in mine:
            if e["ph"] == "C":
                for series, value in e.get("args", {}).items():
                    counters.setdefault(f"{e['name']} [{series}]", []).append(value)
        for name, values in sorted(counters.items()):
            lines.append(f"  counter {name}: {len(values)} samples, min {min(values):g}, "
                         f"max {max(values):g}, last {values[-1]:g}")  # fmt: skip
    return lines
