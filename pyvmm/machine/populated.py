"""Which 2 MiB chunks of guest RAM the host kernel has ever populated.

Guest RAM is private anonymous memory. A page of it that nobody ever wrote, and that no
fault brought in, has no page-table entry at all, and its contents are zero: the
kernel's own record answers "could this page hold data?" without reading it. A chunk is
*populated* when at least one of its 512 pages is present in RAM (other than the shared
zero page) or swapped out. docs/dirty-tracking.md, "Never-populated memory", says what
that guarantees and how it meets the dirty log, MADV_HUGEPAGE and the zero page.

The answer comes from /proc/self/pagemap (pyvmm/kvm/pagemap.py): PAGEMAP_SCAN where the
kernel has it (6.7 and later), else the file's present and swapped bits, page by page.
Where /proc/self/pagemap cannot be opened the answer is "unknown" (None), and callers
read every page, as before.
"""

from __future__ import annotations

import errno
import logging
import threading

import numpy as np

from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.pagemap import (
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PM_PRESENT,
    PM_SWAP,
    PagemapFd,
    page_region,
    scan_unsupported,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
CHUNK_PAGES = 512  # 2 MiB, a transparent huge page: the unit of "populated"
CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE
SCAN_REGIONS = 4096  # page_region entries per PAGEMAP_SCAN call
READ_CHUNKS = 2048  # chunks per read of the pagemap file (8 MiB of entries, 4 GiB of RAM)


class PopulatedChunks:
    """Answers populated-chunk queries for this process's mappings."""

    def __init__(self) -> None:
        # One query at a time: the scan buffers are shared, and a sync on another thread
        # (the bitmap tracker's parked pages) asks while the migration thread walks.
        self._lock = threading.Lock()
        self._pagemap: PagemapFd | None = None
        self._unavailable = False
        self._scan = True  # PAGEMAP_SCAN until the kernel says it has none
        self._vec = (page_region * SCAN_REGIONS)()
        self.queries = 0

    def close(self) -> None:
        with self._lock:
            if self._pagemap is not None:
                self._pagemap.close()
                self._pagemap = None

    def _fd(self) -> PagemapFd | None:
        if self._pagemap is None and not self._unavailable:
            try:
                self._pagemap = PagemapFd()
            except OSError as exc:
                self._unavailable = True
                log.warning(
                    "cannot open /proc/self/pagemap (%s): every page of guest RAM will be read",
                    exc.strerror,
                )
        return self._pagemap

    def chunks(self, addr: int, nchunks: int, limit: int) -> np.ndarray | None:
        """One byte per 2 MiB chunk from host address addr on (nchunks of them, the last
        ending at limit at the latest): 1 if populated, 0 if not; None if unknown."""
        with self._lock:
            return self._chunks(addr, nchunks, limit)

    def _chunks(self, addr: int, nchunks: int, limit: int) -> np.ndarray | None:
        pagemap = self._fd()
        if pagemap is None:
            return None
        self.queries += 1
        end = min(addr + nchunks * CHUNK_BYTES, limit)
        if self._scan:
            try:
                return self._by_scan(pagemap, addr, end, nchunks)
            except KvmError as exc:
                if not scan_unsupported(exc):
                    raise
                self._scan = False
                log.info("PAGEMAP_SCAN unavailable (%s); reading /proc/self/pagemap instead", exc)
        return self._by_read(pagemap, addr, end, nchunks)

    def _by_scan(self, pagemap: PagemapFd, addr: int, end: int, nchunks: int) -> np.ndarray:
        wanted = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
        vec = self._vec
        delta = np.zeros(nchunks + 1, np.int32)
        start = addr
        while start < end:
            # Present or swapped, and not the shared zero page (PFNZERO inverted in mask).
            count, walk_end = pagemap.scan(
                start, end, vec, wanted, PAGE_IS_PFNZERO, PAGE_IS_PFNZERO, wanted
            )
            if count:
                regions = np.frombuffer(vec, np.uint64, count * 3).reshape(count, 3)
                if regions[:, 0].min() < addr or regions[:, 1].max() > end:
                    raise KvmError("PAGEMAP_SCAN", errno.EIO, "a region outside the range")
                first = (regions[:, 0] - np.uint64(addr)) // np.uint64(CHUNK_BYTES)
                last = (regions[:, 1] - np.uint64(addr + 1)) // np.uint64(CHUNK_BYTES)
                np.add.at(delta, first.astype(np.intp), 1)
                np.add.at(delta, last.astype(np.intp) + 1, -1)
            if walk_end <= start:  # no progress: never loop forever on a surprise
                raise KvmError("PAGEMAP_SCAN", errno.EIO, f"no progress at 0x{start:x}")
            start = walk_end
        return (np.cumsum(delta[:nchunks]) > 0).astype(np.uint8)

    def _by_read(self, pagemap: PagemapFd, addr: int, end: int, nchunks: int) -> np.ndarray:
        out = np.zeros(nchunks, np.uint8)
        entries = np.empty(min(nchunks, READ_CHUNKS) * CHUNK_PAGES, np.uint64)
        flags = np.uint64(PM_PRESENT | PM_SWAP)
        for c0 in range(0, nchunks, READ_CHUNKS):
            first = addr + c0 * CHUNK_BYTES
            pages = min((end - first) // PAGE_SIZE, READ_CHUNKS * CHUNK_PAGES)
            if pages <= 0:
                break
            buf = entries[:pages]
            pagemap.read(first, memoryview(buf).cast("B"))
            used = (buf & flags) != 0
            n = (pages + CHUNK_PAGES - 1) // CHUNK_PAGES
            padded = np.zeros(n * CHUNK_PAGES, bool)
            padded[:pages] = used
            out[c0 : c0 + n] = padded.reshape(n, CHUNK_PAGES).any(axis=1)
        return out
