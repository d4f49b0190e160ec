"""QMP: pyvmm's own timeline recording (docs/timeline.md).

x-pyvmm-timeline-start and x-pyvmm-timeline-stop change what the VMM does, so they run on
the control loop like every state change; x-pyvmm-query-timeline and
x-pyvmm-query-heatmap only read (a stopped recording, page by page) and are queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.dirty.heatmap import MAX_CELLS
from pyvmm.monitor.recording import (
    DEFAULT_MAX_EVENTS,
    MAX_CHUNK_EVENTS,
    MAX_CHUNK_ROWS,
    Recording,
    RecordingOptions,
)
from pyvmm.monitor.schema import ArgSpec, QmpError

if TYPE_CHECKING:
    from pyvmm.monitor.vmm import Vmm

MAX_EVENTS_LIMIT = 10_000_000  # about 4 GB of memory: a bound, not a suggestion


def _error(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


def _range(args: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = args.get(name, default)
    if not low <= value <= high:
        raise _error(f"Parameter '{name}' expects a value between {low} and {high}")
    return int(value)


def register_timeline_commands(vmm: Vmm) -> None:
    qmp = vmm.qmp
    assert qmp is not None

    def start(args: dict[str, Any]) -> None:
        if vmm.recording is not None and vmm.recording.active:
            raise _error("a timeline is already being recorded (x-pyvmm-timeline-stop ends it)")
        options = RecordingOptions(
            max_events=_range(args, "max-events", 1000, MAX_EVENTS_LIMIT, DEFAULT_MAX_EVENTS),
            heatmap=bool(args.get("heatmap", False)),
            heatmap_cells=_range(args, "heatmap-cells", 1, MAX_CELLS, MAX_CELLS),
        )
        vmm.recording = Recording(vmm, options)
        vmm.recording.start()

    def stop(args: dict[str, Any]) -> dict[str, Any]:
        recording = vmm.recording
        if recording is None or not recording.active:
            raise _error("no timeline is being recorded (x-pyvmm-timeline-start begins one)")
        recording.stop()
        return recording.status()

    def query_timeline(args: dict[str, Any]) -> dict[str, Any]:
        recording = vmm.recording
        if recording is None:
            if "from" in args:
                raise _error("no timeline has been recorded")
            return {"recording": False, "events": 0, "dropped": 0, "heatmap": False}
        if "from" not in args:
            return recording.status()
        first = _range(args, "from", 0, 2**62, 0)
        count = _range(args, "count", 1, MAX_CHUNK_EVENTS, MAX_CHUNK_EVENTS)
        try:
            return recording.events_chunk(first, count)
        except RuntimeError as exc:
            raise _error(str(exc)) from None

    def query_heatmap(args: dict[str, Any]) -> dict[str, Any]:
        recording = vmm.recording
        if recording is None:
            raise _error("no timeline has been recorded")
        first = _range(args, "from", 0, 2**62, 0)
        count = _range(args, "count", 1, MAX_CHUNK_ROWS, MAX_CHUNK_ROWS)
        try:
            return recording.heatmap_chunk(first, count)
        except RuntimeError as exc:
            raise _error(str(exc)) from None

    qmp.register(
        "x-pyvmm-timeline-start",
        start,
        args={
            "max-events": ArgSpec("int", optional=True),
            "heatmap": ArgSpec("bool", optional=True),
            "heatmap-cells": ArgSpec("int", optional=True),
        },
    )
    qmp.register("x-pyvmm-timeline-stop", stop)
    qmp.register(
        "x-pyvmm-query-timeline",
        query_timeline,
        args={"from": ArgSpec("int", optional=True), "count": ArgSpec("int", optional=True)},
        query=True,
    )
    qmp.register(
        "x-pyvmm-query-heatmap",
        query_heatmap,
        args={"from": ArgSpec("int", optional=True), "count": ArgSpec("int", optional=True)},
        query=True,
    )
