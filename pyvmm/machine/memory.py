"""Guest RAM: private anonymous mmaps, one per KVM memory slot, seen as numpy arrays by the
code that wants them (the array is made on first use: a VM that never migrates, measures or
hashes its memory never imports numpy).

Layout (what QEMU's pc machine does too): RAM fills guest-physical addresses from
0 up to 3 GiB; the rest lives from 4 GiB upward, leaving the 3-4 GiB hole for the
TSS, the identity map and (one day) device MMIO. So a VM has one slot, or two.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import resource
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyvmm.machine.errors import GuestMemoryError

if TYPE_CHECKING:
    import numpy as np

    from pyvmm.machine.populated import PopulatedChunks

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
LOW_RAM_END = 3 << 30
HIGH_RAM_START = 4 << 30
CHUNK_PAGES = 512  # 2 MiB: the unit of populated_chunks (machine/populated.py)
# Python's mmap module has MAP_NORESERVE only from 3.13 on; the value is Linux's (x86-64).
# Without it, overcommit heuristics refuse a guest larger than RAM + swap (vm.overcommit_memory
# 0) although it will never touch most of it.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


@dataclass
class MemoryRegion:
    """One KVM memory slot backed by one mmap."""

    slot: int
    gpa: int
    size_bytes: int
    mm: mmap.mmap = field(repr=False)
    host_addr: int = 0
    _array: np.ndarray | None = field(default=None, repr=False)

    @property
    def array(self) -> np.ndarray:
        """A numpy uint8 view of the whole region, made on first use."""
        if self._array is None:
            import numpy as np

            self._array = np.frombuffer(self.mm, dtype=np.uint8)
        return self._array

    @property
    def pages(self) -> int:
        return self.size_bytes // PAGE_SIZE

    @property
    def end(self) -> int:
        return self.gpa + self.size_bytes

    def bitmap_words(self) -> int:
        return (self.pages + 63) // 64


VMM_BLOCK_SHIFT = 12  # 4096 pages per block, the dirty tracker's BLOCK_PAGES


def vmm_block_words(region: MemoryRegion) -> int:
    """Words of a block summary (one bit per 4096 pages) of a region's dirty bitmap."""
    return -(-region.pages // (64 << VMM_BLOCK_SHIFT))


def layout(size_bytes: int) -> list[tuple[int, int]]:
    """(gpa, size) of each slot for a VM with size_bytes of RAM."""
    if size_bytes <= 0 or size_bytes % PAGE_SIZE:
        raise GuestMemoryError(f"memory size {size_bytes} is not a positive multiple of 4 KiB")
    low = min(size_bytes, LOW_RAM_END)
    slots = [(0, low)]
    if size_bytes > low:
        slots.append((HIGH_RAM_START, size_bytes - low))
    return slots


class GuestMemory:
    """All of a VM's RAM, with bounds-checked guest-physical access.

    Pages that pyvmm itself writes (image loading, device emulation, restored
    state) are invisible to KVM's dirty log, so every write through this class
    also sets the page's bit in `vmm_dirty[slot]`; the dirty tracker ORs those
    bitmaps into its own (see docs/dirty-tracking.md).
    """

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.regions: list[MemoryRegion] = []
        self._populated: PopulatedChunks | None = None  # opened on the first query
        self._populated_lock = threading.Lock()
        for slot, (gpa, size) in enumerate(layout(size_bytes)):
            # Private anonymous memory, as QEMU uses: reading a page the guest never
            # touched maps the kernel's shared zero page instead of allocating (with
            # MAP_SHARED, i.e. shmem, every read allocated: scanning a mostly-zero 4 GiB
            # guest for migration took 12 s instead of a fraction of a second).
            # MAP_NORESERVE: untouched pages cost nothing. DONTFORK: a subprocess's fork
            # must not copy-on-write guest RAM. HUGEPAGE: fewer faults, as QEMU does.
            try:
                mm = mmap.mmap(
                    -1,
                    size,
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                )
            except OSError as exc:
                self.close()
                raise GuestMemoryError(map_failure(size_bytes, exc)) from None
            for advice in ("MADV_DONTFORK", "MADV_HUGEPAGE"):
                if hasattr(mmap, advice):
                    mm.madvise(getattr(mmap, advice))
            anchor = ctypes.c_char.from_buffer(mm)
            host_addr = ctypes.addressof(anchor)
            del anchor  # keep no export of the mmap, so that close() can unmap
            self.regions.append(MemoryRegion(slot, gpa, size, mm, host_addr))
        # pyvmm's own writes, one bitmap per slot in KVM's layout, as bytes until a numpy
        # user (the dirty tracker) asks for vmm_dirty; mark_dirty writes 64-bit words.
        self._vmm_raw = [bytearray(r.bitmap_words() * 8) for r in self.regions]
        self._vmm_words = [memoryview(raw).cast("Q") for raw in self._vmm_raw]
        self._vmm_dirty: list[np.ndarray] | None = None
        # Which blocks of 4096 pages vmm_dirty may hold bits in (the dirty tracker's block
        # summaries, dirty/scan.py): a sync then looks at those only.
        self._vmm_blocks = [memoryview(bytearray(vmm_block_words(r) * 8)).cast("Q")
                            for r in self.regions]  # fmt: skip
        self._vmm_blocks_taken = [memoryview(bytearray(len(b) * 8)).cast("Q")
                                  for b in self._vmm_blocks]  # fmt: skip

    @property
    def vmm_dirty(self) -> list[np.ndarray]:
        """Per slot, the pages pyvmm itself wrote, as numpy uint64 bitmaps (KVM's layout)
        sharing memory with what mark_dirty writes."""
        if self._vmm_dirty is None:
            import numpy as np

            self._vmm_dirty = [np.frombuffer(raw, dtype=np.uint64) for raw in self._vmm_raw]
        return self._vmm_dirty

    def populated_chunks(
        self, slot: int, first_page: int, npages: int
    ) -> tuple[np.ndarray | None, int]:
        """Which 2 MiB chunks (CHUNK_PAGES pages, counted from the slot's start) covering
        pages [first_page, first_page + npages) of a slot the host kernel ever populated:
        (mask, first chunk), one byte per chunk, 0 = never populated, so all zero and not
        worth reading. The mask is None when the kernel cannot tell (docs/dirty-tracking.md,
        "Never-populated memory": what this guarantees)."""
        region = self.regions[slot]
        first_chunk = first_page // CHUNK_PAGES
        end_chunk = -(-min(first_page + npages, region.pages) // CHUNK_PAGES)
        populated = self._populated
        if populated is None:
            from pyvmm.machine.populated import PopulatedChunks  # numpy, for migrations only

            with self._populated_lock:
                if self._populated is None:
                    self._populated = PopulatedChunks()
                populated = self._populated
        mask = populated.chunks(
            region.host_addr + first_chunk * CHUNK_PAGES * PAGE_SIZE,
            max(end_chunk - first_chunk, 0),
            region.host_addr + region.size_bytes,
        )
        return mask, first_chunk

    def close(self) -> None:
        """Unmap guest RAM. Only valid once KVM no longer maps it (VM fd closed)."""
        if self._populated is not None:
            self._populated.close()
            self._populated = None
        regions, self.regions = self.regions, []
        for region in regions:
            region._array = None
            try:
                region.mm.close()
            except BufferError:  # someone still holds a view; the GC unmaps it later
                log.debug("slot %d still has views; unmapped later", region.slot)

    def region_of(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The region holding [gpa, gpa+length), which must not cross a region's end."""
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region
        raise GuestMemoryError(
            f"guest-physical range 0x{gpa:x}+0x{length:x} is outside guest RAM ({self.describe()})"
        )

    def describe(self) -> str:
        return ", ".join(f"0x{r.gpa:x}-0x{r.end:x}" for r in self.regions)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self.region_of(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> np.ndarray:
        """A writable uint8 view of guest RAM (writes through it are NOT marked dirty)."""
        region = self.region_of(gpa, length)
        start = gpa - region.gpa
        return region.array[start : start + length]

    def read(self, gpa: int, length: int) -> bytes:
        region = self.region_of(gpa, length)
        start = gpa - region.gpa
        return region.mm[start : start + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Write into guest RAM and mark the pages dirty for migration."""
        buf = memoryview(data).cast("B")
        region = self.region_of(gpa, len(buf))
        start = gpa - region.gpa
        region.mm[start : start + len(buf)] = buf
        self.mark_dirty(gpa, len(buf))

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        region = self.region_of(gpa, length)
        ctypes.memset(region.host_addr + gpa - region.gpa, value, length)
        self.mark_dirty(gpa, length)

    def mark_dirty(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        region = self.region_of(gpa, length)
        first = (gpa - region.gpa) // PAGE_SIZE
        last = (gpa - region.gpa + length - 1) // PAGE_SIZE
        words = self._vmm_words[region.slot]
        for w in range(first >> 6, (last >> 6) + 1):  # whole words at a time
            lo = max(first, w << 6) & 63
            hi = min(last, (w << 6) + 63) & 63
            words[w] |= ((1 << (hi - lo + 1)) - 1) << lo
        # The bits first, then their blocks: take_vmm_blocks runs on another thread.
        blocks = self._vmm_blocks[region.slot]
        for b in range(first >> VMM_BLOCK_SHIFT, (last >> VMM_BLOCK_SHIFT) + 1):
            blocks[b >> 6] |= 1 << (b & 63)

    def take_vmm_blocks(self, slot: int) -> memoryview:
        """The blocks of vmm_dirty[slot] marked since the last call (a summary the caller
        may read until its next call); the marks are cleared first, so a write that lands
        meanwhile is marked again and found next time."""
        taken, marks = self._vmm_blocks_taken[slot], self._vmm_blocks[slot]
        taken[:] = marks
        marks.cast("B")[:] = bytes(len(marks) * 8)
        return taken


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _size(n: int) -> str:
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


OVERCOMMIT = {
    0: "0 (heuristic: MAP_NORESERVE memory is not counted)",
    1: "1 (always overcommit)",
    2: "2 (never overcommit: MAP_NORESERVE is ignored and all of guest RAM counts against "
    "CommitLimit)",
}


def map_failure(size_bytes: int, exc: OSError) -> str:
    """One line for a failed mmap of guest RAM: the size asked, the host's memory, the
    overcommit setting, and the address-space limit when one is set."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            overcommit = int(f.read())
    except (OSError, ValueError):
        overcommit = -1
    parts = [
        f"host RAM {_gib(info.get('MemTotal', 0))} ({_gib(info.get('MemAvailable', 0))} "
        f"available), swap {_gib(info.get('SwapTotal', 0))}",
        f"vm.overcommit_memory={OVERCOMMIT.get(overcommit, overcommit)}",
    ]
    if overcommit == 2:
        parts.append(
            f"CommitLimit {_gib(info.get('CommitLimit', 0))}, "
            f"{_gib(info.get('Committed_AS', 0))} committed"
        )
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        parts.append(f"address-space limit (ulimit -v) {_gib(limit)}")
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    return f"cannot map {_size(size_bytes)} of guest RAM: {reason}; " + "; ".join(parts)
