"""Applying the page records of an incoming stream to guest RAM: RAM_RUN and ZERO_RUN.

The main stream (destination.py) and every multifd channel (multifd/recv.py) carry the
same two page records and apply them the same way, so both call these functions with the
guest memory they fill and the counts they keep (IncomingResult). Each record is checked
against the stream's slots before a byte reaches RAM (StreamValidator.check_pages), and
with checksums the page checker sees the pages before they are overwritten and after.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.dirty.scan import zero_range
from pyvmm.machine.memory import PAGE_SIZE, GuestMemory
from pyvmm.migration.pagecheck import PageChecker
from pyvmm.migration.stream import (
    PAGE_HASH_BYTES,
    RUN,
    RUN_MAY_CHANGE,
    ZERO,
    StreamReader,
    StreamValidator,
)


@dataclass
class IncomingResult:
    guest_running: bool  # the source's guest was running: start ours
    iterations: int
    bytes_received: int
    pages_received: int
    zero_pages: int
    changed_pages: int = 0  # pages that changed while they were sent (then sent again)
    zero_pages_read: int = 0  # pages of ZERO_RUNs that had to be read (populated here)
    zero_pages_written: int = 0  # ... and written (they were not zero)
    colo: bool = False  # COLO followed the migration (until its failover)
    multifd_channels: int = 0  # pages came over this many multifd channels
    multifd_bytes: int = 0  # bytes received on them


def load_ram_run(
    memory: GuestMemory, reader: StreamReader, validator: StreamValidator,
    checker: PageChecker | None, arg: int, length: int, result: IncomingResult,
) -> None:  # fmt: skip
    """A RAM_RUN record: its header and hash table, then its pages received straight into
    guest RAM."""
    slot, _, first = RUN.unpack(reader.read(RUN.size, "a RAM_RUN record"))
    npages = validator.run_pages(length)
    table = reader.read(npages * PAGE_HASH_BYTES if reader.checksum else 0,
                        "a page-hash table")  # fmt: skip
    reader.end_record("RAM_RUN")  # the run header and the table: now trusted
    validator.check_pages(slot, first, npages)
    if checker is not None:
        checker.before_write(slot, first, npages)
    region = memory.regions[slot]
    view = memoryview(region.array)[first * PAGE_SIZE : (first + npages) * PAGE_SIZE]
    reader.read_into(view, "page data", hashed=False)
    if checker is not None:
        may_change = bool(arg & RUN_MAY_CHANGE)
        checker.ram_run(reader.record_index, slot, first, table, may_change)
    result.pages_received += npages


def load_zero_run(
    memory: GuestMemory, reader: StreamReader, validator: StreamValidator,
    checker: PageChecker | None, result: IncomingResult,
) -> None:  # fmt: skip
    """A ZERO_RUN record: pages that are zero at the source. Only the pages that are not
    zero already are zeroed, so untouched memory stays untouched. Chunks this process never
    populated are zero without a look (a fresh destination's RAM is all such chunks, so a
    ZERO_RUN over never-written memory costs one pagemap query and nothing per page); the
    others are read, and written only where not zero (zero_range, docs/scan.md)."""
    payload = reader.read(ZERO.size, "a ZERO_RUN record")
    reader.end_record("ZERO_RUN")
    slot, _, first, npages = ZERO.unpack(payload)
    validator.check_pages(slot, first, npages)
    result.zero_pages += npages
    if checker is not None:
        checker.before_write(slot, first, npages)
    populated, first_chunk = memory.populated_chunks(slot, first, npages)
    read, written = zero_range(memory.regions[slot].mm, first, npages, populated, first_chunk)
    result.zero_pages_read += read
    result.zero_pages_written += written
    if checker is not None:
        checker.zero_run(slot, first, npages)
