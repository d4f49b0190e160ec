"""Sending pages: a RangeTable's zero runs as ZERO_RUN records, its data runs as RAM_RUN
records whose data goes to the socket straight from guest RAM (sendmsg on memoryviews,
no copy). Each record's checksum is computed over the guest pages in place, before the
send (stream.py). Which pages, and which of them are zero, the walk decided
(dirtypages.py); this only frames and sends, so that several writers (one per
connection) can share the tables of one walk."""

from __future__ import annotations

from pyvmm.dirty.ranges import RangeTable
from pyvmm.machine.memory import PAGE_SIZE, GuestMemory
from pyvmm.migration.stats import RamStats
from pyvmm.migration.stream import MAX_RUN_PAGES, StreamWriter


class PageWriter:
    def __init__(self, memory: GuestMemory, writer: StreamWriter, ram: RamStats) -> None:
        self.memory = memory
        self.writer = writer
        self.ram = ram
        self.in_downtime = False  # bytes count as downtime-bytes from now on

    def send(self, table: RangeTable) -> int:
        """Send one table's runs, in order; returns the bytes written."""
        slot = table.slot
        writer = self.writer
        may_change = not self.in_downtime
        parts: list[bytes | memoryview] = []
        mem = memoryview(self.memory.regions[slot].mm)
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
        before = writer.bytes_sent
        writer.send(parts)
        sent = writer.bytes_sent - before
        ram = self.ram
        ram.duplicate += table.zero_pages
        ram.normal += table.data_pages
        ram.read_pages += table.read_pages
        ram.unpopulated_pages += table.unpopulated_pages
        ram.transferred = writer.bytes_sent
        if self.in_downtime:
            ram.downtime_bytes += sent
        else:
            ram.precopy_bytes += sent
        return sent
