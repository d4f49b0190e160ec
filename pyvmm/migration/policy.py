"""What a convergence policy sees of a migration, and the hooks it implements.

A policy (pyvmm/migration/convergence/) is one class with three hooks. The source
calls on_setup once the stream is open, on_sync after every dirty sync (with the closed
dirty-rate period when the sync closed one, else None), and on_end whatever the outcome.
A policy may also have a fourth, optional hook, `on_send_step(now_ms)`: the pre-copy send
loop calls it after every step it sends (at most 2 MiB), and never while it waits for its
rate limit; QEMU 1.6's 2013 throttle was driven from that place (check_guest_throttling).
Through the `PolicyHost` it may read the settings and statistics, reach the vCPUs, ask
for an extra sync, arm timers on the migration's clock, and publish fields in
query-migrate (`stats.extra`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pyvmm.machine.machine import Machine
    from pyvmm.migration.clock import Clock
    from pyvmm.migration.params import MigrationSettings
    from pyvmm.migration.stats import MigrationStats

# What a sync is, for the counters and for the migration bitmap:
SYNC_ITERATION = "iteration"  # the loop's own syncs (setup, end of a pass, final): iteration-count
SYNC_FORCED = "forced"  # asked for from outside the loop (9.2's timer)
SYNC_BACKGROUND = "background"  # the 2024 RFC's periodic and v1's background sync: counted
#                                 for the throttle, queued for sending only at the next iteration


@dataclass
class PeriodStats:
    """One dirty-rate period (>= 1 s between syncs): what convergence policies judge."""

    elapsed_ms: float
    dirty_pages: int  # pages newly dirtied in the period
    bytes_transferred: int  # bytes sent in the period
    sync_count: int
    # dirty-pages-rate as it stood before this period closed: QEMU judges the period
    # before it updates the rate (1.6's trigger reads it; it is 0 in the first period)
    prev_dirty_pages_rate: int = 0
    kind: str = SYNC_ITERATION  # the kind of sync that closed the period


class PolicyHost(Protocol):
    """The migration as a policy sees it (MigrationSource implements it)."""

    machine: Machine
    settings: MigrationSettings
    stats: MigrationStats
    clock: Clock

    @property
    def active(self) -> bool: ...

    @property
    def in_downtime(self) -> bool: ...

    @property
    def period_start_ms(self) -> float:
        """When the current dirty-rate period began: QEMU's rs->time_last_bitmap_sync."""
        ...

    def force_sync(self, kind: str = SYNC_FORCED) -> bool: ...


class ConvergencePolicy(Protocol):
    def on_setup(self, source: PolicyHost) -> None: ...
    def on_sync(self, source: PolicyHost, period: PeriodStats | None) -> None: ...
    def on_end(self, source: PolicyHost) -> None: ...
