"""Sending pages: zero pages as ZERO_RUN records, the rest as RAM_RUN records whose data
goes to the socket straight from guest RAM (sendmsg on memoryviews, no copy). Each record's
checksum is computed over the guest pages in place, before the send (stream.py)."""

from __future__ import annotations

import numpy as np

from pyvmm.dirty.scan import pages_to_runs, zero_pages
from pyvmm.machine.memory import PAGE_SIZE, GuestMemory
from pyvmm.migration.stats import RamStats
from pyvmm.migration.stream import MAX_RUN_PAGES, StreamWriter


class PageWriter:
    def __init__(self, memory: GuestMemory, writer: StreamWriter, ram: RamStats) -> None:
        self.memory = memory
        self.writer = writer
        self.ram = ram
        self.in_downtime = False  # bytes count as downtime-bytes from now on

    def send(self, slot: int, pages: np.ndarray) -> int:
        """Send these pages of one slot (ascending); returns the bytes written."""
        region = self.memory.regions[slot]
        writer = self.writer
        is_zero = np.empty(len(pages), np.uint8)
        nzero = zero_pages(region.array, pages, is_zero)
        parts: list[bytes | memoryview] = []
        starts = np.empty(len(pages), np.uint64)
        lengths = np.empty(len(pages), np.uint64)
        zero_mask = is_zero.view(bool)
        if nzero:
            for i in range(pages_to_runs(pages[zero_mask], starts, lengths)):
                parts.append(writer.zero_run(slot, int(starts[i]), int(lengths[i])))
        normal = pages[~zero_mask] if nzero else pages
        if len(normal):
            mem = memoryview(region.array)
            for i in range(pages_to_runs(normal, starts, lengths)):
                first, n = int(starts[i]), int(lengths[i])
                while n:
                    take = min(n, MAX_RUN_PAGES)
                    data = mem[first * PAGE_SIZE : (first + take) * PAGE_SIZE]
                    # Before the downtime the guest may write these pages until sendmsg has
                    # copied them, after the checksum: the destination tolerates that.
                    parts.extend(writer.ram_run_parts(slot, first, data, not self.in_downtime))
                    first += take
                    n -= take
        before = writer.bytes_sent
        writer.send(parts)
        sent = writer.bytes_sent - before
        ram = self.ram
        ram.duplicate += nzero
        ram.normal += len(normal)
        ram.transferred = writer.bytes_sent
        if self.in_downtime:
            ram.downtime_bytes += sent
        else:
            ram.precopy_bytes += sent
        return sent
