"""COLO's statistics (x-query-colo-stats, pyvmm's own): what the ORBIT branch kept
(checkpoint_count, proxy_discompare_count, 60 s averages of length, paused time and size)
plus the hybrid mode's state, the time spent in each mode and the secondary's vCPU time.

Every checkpoint is also one structured log line (CheckpointRecord.log_line), and every
mode change and miscompare another, so a run can be followed in the log alone.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pyvmm.migration.colo.hybrid import COLO, PASSIVE

RECENT = 64  # checkpoints kept for the query and the demo's display


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint as the primary saw it."""

    number: int
    mode: str  # colo | passive
    reason: str  # max-time | miscompare | timeout | passive-time
    length_ms: float  # how long the VMs ran before it (the RFC's checkpoint length)
    pause_ms: float  # the primary stopped: stop to resume
    duration_ms: float  # request to resume: how long the checkpoint itself took
    bytes: int  # on the wire, record headers included
    pages: int  # pages sent (dirtied since the last checkpoint)
    presend_bytes: int  # sent before the stop (x-colo-migrate-ram-threshold)
    end_s: float  # monotonic seconds at its end

    def to_qmp(self) -> dict[str, Any]:
        return {
            "number": self.number, "mode": self.mode, "reason": self.reason,
            "length-ms": round(self.length_ms, 2), "pause-ms": round(self.pause_ms, 2),
            "duration-ms": round(self.duration_ms, 2), "bytes": self.bytes,
            "pages": self.pages, "presend-bytes": self.presend_bytes,
        }  # fmt: skip

    def log_line(self) -> str:
        return (
            f"colo checkpoint number={self.number} mode={self.mode} reason={self.reason} "
            f"length-ms={self.length_ms:.1f} pause-ms={self.pause_ms:.1f} "
            f"duration-ms={self.duration_ms:.1f} bytes={self.bytes} pages={self.pages}"
        )


@dataclass
class ColoStats:
    """Totals and recent checkpoints; updated by the COLO thread, read by queries."""

    role: str = "none"  # primary | secondary | none
    mode: str = COLO  # the mode the VMs are in now
    checkpoints: int = 0
    passive_checkpoints: int = 0
    miscompares: int = 0  # checkpoints the comparator asked for after a miscompare
    timeouts: int = 0  # ... after an answer waited too long for its twin
    mode_changes: int = 0
    last_reason: str | None = None
    mean_length_ms: float = 0.0  # the hybrid mode's running mean (EWMA)
    total_length_ms: float = 0.0
    total_pause_ms: float = 0.0
    total_bytes: int = 0
    time_in_ms: dict[str, float] = field(default_factory=lambda: {COLO: 0.0, PASSIVE: 0.0})
    mode_since_s: float = 0.0
    secondary_vcpu_s: float | None = None  # the secondary's vCPU CPU time (secondary only)
    applied: int = 0  # secondary: checkpoints applied
    last_applied: int = 0  # secondary: number of the last one
    last_applied_tx: int = 0  # secondary: its COM2 output position at that checkpoint's stop
    recent: deque[CheckpointRecord] = field(default_factory=lambda: deque(maxlen=RECENT))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, record: CheckpointRecord) -> None:
        with self.lock:
            self.checkpoints += 1
            if record.mode == PASSIVE:
                self.passive_checkpoints += 1
            self.last_reason = record.reason
            self.total_length_ms += record.length_ms
            self.total_pause_ms += record.pause_ms
            self.total_bytes += record.bytes
            self.recent.append(record)

    def set_mode(self, mode: str, now_s: float) -> None:
        with self.lock:
            if self.mode_since_s:
                self.time_in_ms[self.mode] += (now_s - self.mode_since_s) * 1000
            if mode != self.mode:
                self.mode_changes += 1
            self.mode, self.mode_since_s = mode, now_s

    def to_qmp(self, now_s: float) -> dict[str, Any]:
        with self.lock:
            time_in = dict(self.time_in_ms)
            if self.mode_since_s:
                time_in[self.mode] += (now_s - self.mode_since_s) * 1000
            n = self.checkpoints
            out: dict[str, Any] = {
                "role": self.role,
                "mode": self.mode,
                "checkpoints": n,
                "passive-checkpoints": self.passive_checkpoints,
                "miscompares": self.miscompares,
                "timeouts": self.timeouts,
                "mode-changes": self.mode_changes,
                "last-reason": self.last_reason,
                "mean-length-ms": round(self.mean_length_ms, 2),
                "avg-length-ms": round(self.total_length_ms / n, 2) if n else 0.0,
                "avg-pause-ms": round(self.total_pause_ms / n, 2) if n else 0.0,
                "avg-bytes": self.total_bytes // n if n else 0,
                "time-in-colo-ms": round(time_in[COLO]),
                "time-in-passive-ms": round(time_in[PASSIVE]),
                "recent": [r.to_qmp() for r in self.recent],
            }
            if self.role == "secondary":
                out["applied"] = self.applied
                out["last-applied"] = self.last_applied
                out["last-applied-tx"] = self.last_applied_tx
            return out
