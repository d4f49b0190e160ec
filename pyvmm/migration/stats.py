"""Migration statistics with QEMU's field names and meanings (query-migrate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAGE_SIZE = 4096
ACTIVE_STATES = ("setup", "active", "device", "cancelling")


@dataclass
class RamStats:
    transferred: int = 0  # bytes on the wire, record headers included
    remaining: int = 0  # bytes still dirty in the migration bitmap
    total: int = 0  # guest RAM bytes
    duplicate: int = 0  # zero pages (QEMU's historical name)
    normal: int = 0  # pages sent with their contents
    dirty_pages_rate: int = 0  # pages/s over the last >= 1 s period
    mbps: float = 0.0
    dirty_sync_count: int = 0  # every sync: the loop's, the timers', the background ones
    iteration_count: int = 0  # the loop's own syncs only (the 2024 RFC and v1's statistic)
    pages_per_second: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    read_pages: int = 0  # pyvmm's own: pages whose memory the source read (zero test)
    unpopulated_pages: int = 0  # pyvmm's own: zero pages never populated, so never read
    multifd_bytes: int = 0  # bytes handed to the multifd channels (included in transferred)

    def to_qmp(self, completed: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "transferred": self.transferred,
            "total": self.total,
            "duplicate": self.duplicate,
            "skipped": 0,
            "normal": self.normal,
            "normal-bytes": self.normal * PAGE_SIZE,
            "mbps": round(self.mbps, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "iteration-count": self.iteration_count,
            "pages-per-second": self.pages_per_second,
            "page-size": PAGE_SIZE,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
            "multifd-bytes": self.multifd_bytes,
            "postcopy-requests": 0,
            "dirty-sync-missed-zero-copy": 0,
            "x-read-pages": self.read_pages,
            "x-unpopulated-pages": self.unpopulated_pages,
        }
        if not completed:
            out["remaining"] = self.remaining
            out["dirty-pages-rate"] = self.dirty_pages_rate
        return out


@dataclass
class MigrationStats:
    status: str = "none"
    error_desc: str | None = None
    start_ms: float = 0.0
    setup_time_ms: float = 0.0
    end_ms: float = 0.0
    downtime_ms: float | None = None
    expected_downtime_ms: float = 0.0
    ram: RamStats = field(default_factory=RamStats)
    extra: dict[str, Any] = field(default_factory=dict)  # fields added by convergence policies

    def to_qmp(self, now_ms: float) -> dict[str, Any]:
        """query-migrate's reply; now_ms (the migration's clock) for a live total-time."""
        if self.status == "none":
            return {}
        out: dict[str, Any] = {"status": self.status}
        if self.status in ("setup", *ACTIVE_STATES, "colo", "completed", "failed", "cancelled"):
            live = self.status in ACTIVE_STATES or self.status == "colo"
            end = now_ms if live else self.end_ms
            out["total-time"] = int(end - self.start_ms)
            out["setup-time"] = int(self.setup_time_ms)
        if self.status != "setup":
            out["ram"] = self.ram.to_qmp(self.status == "completed")
        if self.status in ACTIVE_STATES:
            out["expected-downtime"] = int(self.expected_downtime_ms)
        if self.status in ("completed", "colo") and self.downtime_ms is not None:
            out["downtime"] = int(self.downtime_ms)
        if self.error_desc is not None:
            out["error-desc"] = self.error_desc
        out.update(self.extra)
        return out
