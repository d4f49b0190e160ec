"""The modelled wire: a PageWriter and a StreamWriter whose sends take virtual time.

Precopy hands SimPageWriter the pages it took, as it hands PageWriter the real ones; the
page writer counts them as pyvmm's stream does (RamStats: normal and zero pages, bytes,
pre-copy and downtime bytes) and moves the clock on by the time the link needs for the
bytes (a RAM_RUN's headers and 4 KiB per page with data, a ZERO_RUN record per step for
pages never written) plus the time the source needs to find the zero pages. Timers
that expire on the way (throttle ticks, sync timers) fire inside that step, as they would
on their own threads while the migration thread sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.migration.clock import VirtualClock
from pyvmm.migration.stats import RamStats

if TYPE_CHECKING:
    from pyvmm.dirty.ranges import RangeTable

PAGE_SIZE = 4096
RECORD_HEADER_BYTES = 24  # every record's header (docs/migration-stream.md)
RAM_RUN_OVERHEAD_BYTES = 40  # a RAM_RUN's record and run headers, per run of data pages
ZERO_RUN_BYTES = 48  # one record for any number of zero pages


@dataclass
class Link:
    bytes_per_ms: float
    latency_ms: float  # one way
    zero_pages_per_ms: float  # the source's zero-page test

    @classmethod
    def of(cls, mbit: float, latency_ms: float, zero_scan_gib_s: float) -> Link:
        zero_pages_per_ms = zero_scan_gib_s * (1 << 30) / PAGE_SIZE / 1000
        return cls(mbit * 1e6 / 8 / 1000, latency_ms, zero_pages_per_ms)

    def transfer_ms(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_ms


class SimStreamWriter:
    """The part of StreamWriter that Precopy uses: the byte count and ITERATION records."""

    def __init__(self, clock: VirtualClock, link: Link) -> None:
        self.clock = clock
        self.link = link
        self.bytes_sent = 0
        self.iterations: list[int] = []

    def iteration(self, number: int) -> None:
        self.iterations.append(number)
        self.send_bytes(RECORD_HEADER_BYTES)

    def send_bytes(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.clock.advance(self.link.transfer_ms(nbytes))


class SimPageWriter:
    def __init__(
        self, writer: SimStreamWriter, ram: RamStats, nonzero_pages: int, link: Link
    ) -> None:
        self.writer = writer
        self.ram = ram
        self.nonzero_pages = nonzero_pages
        self.link = link
        self.clock = writer.clock
        self.in_downtime = False
        self.busy_ms = 0.0  # migration-thread time owed (a sync's cost), paid at the next send

    def send(self, table: RangeTable) -> int:
        """Send one RangeTable DirtyPages took; returns the bytes written. With no
        GuestMemory the walk calls every page data: zero pages (those past what the guest
        ever wrote) are decided here."""
        end = self.nonzero_pages
        n = table.count
        normal = data_runs = 0
        # A take holds a run or a few here (the working sets are ranges): integers, not
        # numpy, whose per-call cost dominated a 1 TiB simulation.
        for first, npages in zip(table.first[:n].tolist(), table.npages[:n].tolist(), strict=True):
            below = min(first + npages, end) - first
            if below > 0:
                normal += below
                data_runs += 1
        zero = int(table.pages) - normal
        sent = (
            data_runs * RAM_RUN_OVERHEAD_BYTES
            + normal * PAGE_SIZE
            + (ZERO_RUN_BYTES if zero else 0)
        )
        writer, ram = self.writer, self.ram
        writer.bytes_sent += sent
        ram.duplicate += zero
        ram.normal += normal
        ram.transferred = writer.bytes_sent
        if self.in_downtime:
            ram.downtime_bytes += sent
        else:
            ram.precopy_bytes += sent
        busy, self.busy_ms = self.busy_ms, 0.0
        self.clock.advance(busy + self.link.transfer_ms(sent) + zero / self.link.zero_pages_per_ms)
        return sent

    def sync_point(self) -> None:
        """Multifd's sync point at each sync: one modelled connection, nothing to drain."""

    def finish(self) -> None:
        """The end of the page stream: nothing buffered."""
