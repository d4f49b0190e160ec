"""A VMM recording its own timeline (and dirty-page heatmaps), turned on over QMP.

The vCPU tracks exist only inside the VMM process, so the VMM records them itself: the
`Recording` hands one `Timeline` (pyvmm/timeline.py) to the machine (every vCPU, and
vCPUs created later), to the outgoing migration (its phases, spans and counters) and to a
logging handler on the `pyvmm.convergence` logger, which turns each structured decision
line of the convergence policies into an instant (trigger verdicts, throttle steps, the
dirty limit's adjustments) and, where the line carries one, a counter. Parameter changes
made over QMP are instants too (commands_*.py call `Vmm.record_event`).

The QMP commands (commands_timeline.py): x-pyvmm-timeline-start, x-pyvmm-timeline-stop,
and the read-outs x-pyvmm-query-timeline and x-pyvmm-query-heatmap, which page through
a stopped recording so that no reply comes near the monitor's 16 MiB limit.
docs/timeline.md explains what is recorded and why it costs nothing when off.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyvmm.dirty.heatmap import MAX_CELLS, Heatmap
from pyvmm.timeline import Timeline

if TYPE_CHECKING:
    from pyvmm.migration.source import MigrationSource
    from pyvmm.monitor.vmm import Vmm

CONVERGENCE_LOGGER = "pyvmm.convergence"
DEFAULT_MAX_EVENTS = 1_000_000
MAX_CHUNK_EVENTS = 20_000  # events per read-out: about 3 MiB of JSON
MAX_CHUNK_ROWS = 200  # heatmap rows per read-out: at most about 4.4 MiB
_PAIR = re.compile(r"(?:^|\s)([A-Za-z_][\w-]*)=")


def parse_decision_line(text: str) -> tuple[str, dict[str, Any]]:
    """`kind key=value ...` (a convergence log line) as (kind, fields).

    A value runs to the next ` key=`, so values with spaces survive ("action=limit all
    vCPUs"); integers and floats become numbers, True/False booleans."""
    kind, _, rest = text.partition(" ")
    if "=" in kind:  # no kind word: the line starts with a pair
        kind, rest = "", text
    fields: dict[str, Any] = {}
    matches = list(_PAIR.finditer(rest))
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        end = nxt.start() if nxt is not None else len(rest)
        fields[m.group(1)] = _value(rest[m.end() : end].strip())
    return kind, fields


def _value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def decision_events(kind: str, f: dict[str, Any]) -> tuple[str, dict[str, dict[str, float]]]:
    """The instant's name for one decision line, and the counters it carries."""
    counters: dict[str, dict[str, float]] = {}
    if kind == "period":  # the trigger's verdict on one closed period
        verdict = "fire" if f.get("fire") is True else "no fire"
        return f"trigger: {verdict}", counters
    if kind == "decision" and "vcpu" in f and "rule" in f:  # the dirty limit's controller
        vcpu = f["vcpu"]
        if isinstance(f.get("new_us"), int):
            counters["dirty-limit sleep per ring (ms)"] = {f"vCPU {vcpu}": f["new_us"] / 1000}
        if isinstance(f.get("current_mbps"), int):
            counters["vCPU dirty rate (MB/s)"] = {f"vCPU {vcpu}": f["current_mbps"]}
        return f"dirty limit vCPU {vcpu}: {f['rule']}", counters
    if kind == "decision" and "old" in f and "new" in f:  # a throttle step
        if isinstance(f["new"], int):
            counters["throttle (%)"] = {"throttle": f["new"]}
        why = f.get("criterion", f.get("trigger", ""))
        return f"throttle {f['old']} -> {f['new']} ({why})", counters
    if kind == "decision" and "trigger" in f:  # the dirty limit's migration trigger
        return f"trigger fired ({f['trigger']}): {f.get('action', '')}", counters
    return kind or "convergence", counters


class ConvergenceRecorder(logging.Handler):
    """Turns pyvmm.convergence's lines into timeline events while a recording runs.

    Recording needs every line, DEBUG included (the trigger's per-period verdicts), so the
    logger's level is lowered while it runs; to leave what the user sees unchanged, the
    logger stops propagating and this handler forwards to the parent's handlers exactly the
    records the old level would have let through."""

    # Recorders installed now (two VMMs in one process, in tests): the first saves the
    # logger's state and the last gives it back; only the first forwards, so a line is
    # shown once.
    _installed: list[ConvergenceRecorder] = []
    _saved: tuple[int, bool, int] = (logging.NOTSET, True, logging.WARNING)

    def __init__(self, timeline: Timeline) -> None:
        super().__init__(logging.DEBUG)
        self.timeline = timeline
        self.track = timeline.new_track("convergence policies", sort_index=200)
        self._logger = logging.getLogger(CONVERGENCE_LOGGER)

    def install(self) -> None:
        logger, cls = self._logger, type(self)
        if self in cls._installed:
            return
        if not cls._installed:
            cls._saved = (logger.level, logger.propagate, logger.getEffectiveLevel())
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
        cls._installed.append(self)
        logger.addHandler(self)

    def remove(self) -> None:
        logger, cls = self._logger, type(self)
        if self not in cls._installed:
            return
        logger.removeHandler(self)
        cls._installed.remove(self)
        if not cls._installed:
            logger.setLevel(cls._saved[0])
            logger.propagate = cls._saved[1]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._record(record.getMessage())
        except Exception:  # a line we cannot read must not break the policy that logged it
            self.handleError(record)
        cls = type(self)
        _level, propagate, forward_from = cls._saved
        first = bool(cls._installed) and cls._installed[0] is self
        if first and propagate and record.levelno >= forward_from:
            parent = self._logger.parent
            if parent is not None:
                parent.handle(record)

    def _record(self, text: str) -> None:
        kind, fields = parse_decision_line(text)
        name, counters = decision_events(kind, fields)
        tl = self.timeline
        now = tl.now_us()
        tl.instant(name, self.track, now, cat="convergence", args={"line": text, **fields})
        for counter, values in counters.items():
            tl.counter(counter, values, now)


@dataclass
class RecordingOptions:
    max_events: int = DEFAULT_MAX_EVENTS
    heatmap: bool = False
    heatmap_cells: int = MAX_CELLS


class Recording:
    """One recording of one VMM process: start, attach what appears, stop, read out."""

    def __init__(self, vmm: Vmm, options: RecordingOptions) -> None:
        self.vmm = vmm
        self.options = options
        self.timeline = Timeline(max_events=options.max_events)
        self.heatmap: Heatmap | None = None
        self.active = False
        self._frozen: list[dict[str, Any]] | None = None
        self._log = ConvergenceRecorder(self.timeline)
        self._lock = threading.Lock()

    # --- life ------------------------------------------------------------------------------

    def start(self) -> None:
        vmm, tl = self.vmm, self.timeline
        machine = vmm.machine
        if self.options.heatmap and machine is not None and machine.memory is not None:
            slots = [r.size_bytes // 4096 for r in machine.memory.regions]
            self.heatmap = Heatmap(slots, self.options.heatmap_cells)
        main = threading.main_thread().native_id
        if main is not None:
            tl.name_track(main, "control loop (main thread)", sort_index=150)
        self.active = True
        if machine is not None:
            machine.timeline = tl
            for vcpu in machine.vcpus:
                vcpu.start_timeline(tl)
        if vmm.migration is not None and vmm.migration.active:
            self.attach_migration(vmm.migration)
        self._log.install()
        tl.instant("recording started", 0, scope="g", cat="recording")

    def attach_migration(self, source: MigrationSource) -> None:
        """A migration started (or running) while recording: it records too."""
        source.timeline, source.heatmap = self.timeline, self.heatmap
        precopy = source.precopy
        if precopy is not None:
            precopy.timeline, precopy.heatmap = self.timeline, self.heatmap
        self.timeline.instant("migration started", 0, scope="g", cat="migration")

    def event(self, name: str, args: dict[str, Any] | None = None) -> None:
        """An instant for the whole process (a parameter change, the destination's steps)."""
        if self.active:
            self.timeline.instant(name, 0, scope="p", cat="vmm", args=args)

    def stop(self) -> None:
        """Stop recording; the events are kept (sorted, named) for the read-outs."""
        if not self.active:
            return
        self._log.remove()
        vmm, tl = self.vmm, self.timeline
        machine = vmm.machine
        if machine is not None:
            machine.timeline = None
            for vcpu in machine.vcpus:
                vcpu.stop_timeline()
        migration = vmm.migration
        if migration is not None:
            migration.timeline = migration.heatmap = None
            if migration.precopy is not None:
                migration.precopy.timeline = migration.precopy.heatmap = None
        tl.instant("recording stopped", 0, scope="g", cat="recording")
        self._name_tracks()
        self.active = False
        with self._lock:
            self._frozen = tl.events()

    def _name_tracks(self) -> None:
        vmm, tl = self.vmm, self.timeline
        role = (
            "destination" if vmm.options.incoming is not None
            else "source" if vmm.migration is not None else "VM"
        )  # fmt: skip
        tl.name_process(f"pyvmm {role} (pid {os.getpid()})",
                        sort_index=1 if role == "destination" else 0)  # fmt: skip
        tl.name_track(0, "process events", sort_index=300)
        machine = vmm.machine
        for vcpu in machine.vcpus if machine is not None else []:
            thread = vcpu.thread
            if thread is not None and thread.native_id is not None:
                tl.name_track(thread.native_id, f"vCPU {vcpu.index}", sort_index=vcpu.index)
        tl.other_data.update(pyvmm_role=role, pid=os.getpid())

    # --- read-outs -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "recording": self.active,
            "events": len(self.timeline) if self._frozen is None else len(self._frozen),
            "dropped": self.timeline.dropped,
            "heatmap": self.heatmap is not None,
        }
        if self.heatmap is not None:
            out["heatmap-rows"] = len(self.heatmap.rows)
        return out

    def events_chunk(self, start: int, count: int) -> dict[str, Any]:
        with self._lock:
            frozen = self._frozen
        if frozen is None:
            raise RuntimeError("the timeline is still recording: stop it first "
                               "(x-pyvmm-timeline-stop)")  # fmt: skip
        end = min(start + min(count, MAX_CHUNK_EVENTS), len(frozen))
        out = self.status()
        out["trace-events"] = frozen[start:end]
        out["next"] = end if end < len(frozen) else None
        if start == 0:
            out["other-data"] = {**self.timeline.other_data, "clock": "CLOCK_MONOTONIC",
                                 "dropped_events": self.timeline.dropped}  # fmt: skip
        return out

    def heatmap_chunk(self, start: int, count: int) -> dict[str, Any]:
        heatmap = self.heatmap
        if heatmap is None:
            raise RuntimeError("this recording has no heatmap: start it with heatmap: true")
        rows = heatmap.rows[start : start + min(count, MAX_CHUNK_ROWS)]
        end = start + len(rows)
        return {
            **heatmap.header(),
            "from": start,
            "rows": [row.to_qmp() for row in rows],
            "next": end if end < len(heatmap.rows) else None,
        }
