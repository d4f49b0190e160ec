"""The client side of timeline recording: start it on a VMM, and fetch what it recorded
(a Trace Event Format object, or the heatmap rows) page by page over QMP. Used by
`pyvmm migrate --trace` and `pyvmm bench --trace/--heatmap`; see docs/timeline.md."""

from __future__ import annotations

from typing import Any

from pyvmm.monitor.client import QmpCommandError, SyncQmp


class RecordingError(Exception):
    """A VMM that cannot record (QEMU, an old pyvmm) or refused; one line."""


def start_recording(
    qmp: SyncQmp, name: str, heatmap: bool = False, max_events: int | None = None
) -> None:
    args: dict[str, Any] = {"heatmap": heatmap}
    if max_events is not None:
        args["max-events"] = max_events
    try:
        qmp.execute("x-pyvmm-timeline-start", args)
    except QmpCommandError as exc:
        if exc.error_class == "CommandNotFound":
            raise RecordingError(
                f"the {name} VMM cannot record a timeline (no x-pyvmm-timeline-start: "
                "it is not pyvmm)"
            ) from None
        raise RecordingError(f"the {name} VMM: {exc.desc}") from None


def stop_recording(qmp: SyncQmp) -> None:
    if qmp.execute("x-pyvmm-query-timeline").get("recording"):
        qmp.execute("x-pyvmm-timeline-stop")


def fetch_timeline(qmp: SyncQmp) -> dict[str, Any]:
    """Stop the recording (if it runs) and return its trace object."""
    stop_recording(qmp)
    events: list[dict[str, Any]] = []
    other: dict[str, Any] = {}
    start: int | None = 0
    while start is not None:
        chunk = qmp.execute("x-pyvmm-query-timeline", {"from": start})
        events.extend(chunk["trace-events"])
        other = chunk.get("other-data", other)
        start = chunk["next"]
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def fetch_heatmap(qmp: SyncQmp) -> dict[str, Any]:
    """The heatmap of a stopped recording: its header and every row (QMP names)."""
    stop_recording(qmp)
    rows: list[dict[str, Any]] = []
    header: dict[str, Any] = {}
    start: int | None = 0
    while start is not None:
        chunk = qmp.execute("x-pyvmm-query-heatmap", {"from": start})
        rows.extend(chunk.pop("rows"))
        start = chunk.pop("next")
        chunk.pop("from", None)
        header = chunk
    return {**header, "rows": rows}
