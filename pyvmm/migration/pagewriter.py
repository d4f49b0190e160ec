"""Sending pages: a RangeTable's zero runs as ZERO_RUN records, its data runs as RAM_RUN
records whose data goes to the socket straight from guest RAM (sendmsg on memoryviews,
no copy). Each record's checksum is computed over the guest pages in place, before the
send (stream.py). Which pages, and which of them are zero, the walk decided
(dirtypages.py); this only frames and sends, so that several writers (one per
connection) can share the tables of one walk: multifd's channels (migration/multifd/)
frame tables with frame_table on their own threads."""

from __future__ import annotations

from pyvmm.dirty.ranges import RangeTable
from pyvmm.machine.memory import PAGE_SIZE, GuestMemory
from pyvmm.migration.stats import RamStats
from pyvmm.migration.stream import MAX_RUN_PAGES, StreamWriter


def frame_table(
    writer: StreamWriter, mem: memoryview, table: RangeTable, may_change: bool
) -> list[bytes | memoryview]:
    """One table's records as buffers for sendmsg: ZERO_RUNs, and RAM_RUNs whose data are
    memoryviews of the slot's guest RAM `mem`. Frames (and hashes) them now, so they must
    be sent in this order, before anything else this writer frames."""
    slot = table.slot
    parts: list[bytes | memoryview] = []
    for first, n, zero in table.runs():
        if zero:
            parts.append(writer.zero_run(slot, first, n))
            continue
        while n:  # the walk already caps data runs at MAX_RUN_PAGES
            take = min(n, MAX_RUN_PAGES)
            data = mem[first * PAGE_SIZE : (first + take) * PAGE_SIZE]
            # Before the downtime the guest may write these pages until sendmsg has
            # copied them, after the checksum: the destination tolerates that.
            parts.extend(writer.ram_run_parts(slot, first, data, may_change))
            first += take
            n -= take
    return parts


class PageWriter:
    def __init__(self, memory: GuestMemory, writer: StreamWriter, ram: RamStats) -> None:
        self.memory = memory
        self.writer = writer
        self.ram = ram
        self.in_downtime = False  # bytes count as downtime-bytes from now on

    def send(self, table: RangeTable) -> int:
        """Send one table's runs, in order; returns the bytes written."""
        writer = self.writer
        mem = memoryview(self.memory.regions[table.slot].mm)
        parts = frame_table(writer, mem, table, not self.in_downtime)
        before = writer.bytes_sent
        writer.send(parts)
        sent = writer.bytes_sent - before
        self.count(table, sent)
        ram = self.ram
        ram.transferred = writer.bytes_sent
        return sent

    def count(self, table: RangeTable, sent_bytes: int) -> None:
        """A table's pages and bytes in the statistics."""
        ram = self.ram
        ram.duplicate += table.zero_pages
        ram.normal += table.data_pages
        ram.read_pages += table.read_pages
        ram.unpopulated_pages += table.unpopulated_pages
        if self.in_downtime:
            ram.downtime_bytes += sent_bytes
        else:
            ram.precopy_bytes += sent_bytes

    def sync_point(self) -> None:
        """After a dirty sync (an iteration's end): nothing to do on one connection, where
        the order of records is the order of the pages' iterations."""

    def finish(self) -> None:
        """Every page is sent: nothing to do on one connection (multifd drains here)."""
