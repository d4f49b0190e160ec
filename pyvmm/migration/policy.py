"""What a convergence policy sees of a migration, and the hooks it implements.

A policy (pyvmm/migration/convergence/) is one class with three hooks. The source
calls on_setup once the stream is open, on_sync after every dirty sync (with the closed
dirty-rate period when the sync closed one, else None), and on_end whatever the outcome.
Through the `PolicyHost` it may read the settings and statistics, reach the vCPUs, ask
for an extra sync, and publish fields in query-migrate (`stats.extra`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pyvmm.machine.machine import Machine
    from pyvmm.migration.params import MigrationSettings
    from pyvmm.migration.stats import MigrationStats


@dataclass
class PeriodStats:
    """One dirty-rate period (>= 1 s between syncs): what convergence policies judge."""

    elapsed_ms: float
    dirty_pages: int  # pages newly dirtied in the period
    bytes_transferred: int  # bytes sent in the period
    sync_count: int


class PolicyHost(Protocol):
    """The migration as a policy sees it (MigrationSource implements it)."""

    machine: Machine
    settings: MigrationSettings
    stats: MigrationStats

    @property
    def active(self) -> bool: ...

    @property
    def in_downtime(self) -> bool: ...

    def force_sync(self) -> bool: ...


class ConvergencePolicy(Protocol):
    def on_setup(self, source: PolicyHost) -> None: ...
    def on_sync(self, source: PolicyHost, period: PeriodStats | None) -> None: ...
    def on_end(self, source: PolicyHost) -> None: ...
