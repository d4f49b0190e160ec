"""Guest RAM: private anonymous mmaps exposed as numpy arrays, one per KVM memory slot.

Layout (what QEMU's pc machine does too): RAM fills guest-physical addresses from
0 up to 3 GiB; the rest lives from 4 GiB upward, leaving the 3-4 GiB hole for the
TSS, the identity map and (one day) device MMIO. So a VM has one slot, or two.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from dataclasses import dataclass, field

import numpy as np

from pyvmm.machine.errors import GuestMemoryError

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
LOW_RAM_END = 3 << 30
HIGH_RAM_START = 4 << 30


@dataclass
class MemoryRegion:
    """One KVM memory slot backed by one mmap."""

    slot: int
    gpa: int
    size_bytes: int
    mm: mmap.mmap = field(repr=False)
    array: np.ndarray = field(repr=False)  # uint8 view of the whole region
    host_addr: int = 0

    @property
    def pages(self) -> int:
        return self.size_bytes // PAGE_SIZE

    @property
    def end(self) -> int:
        return self.gpa + self.size_bytes

    def bitmap_words(self) -> int:
        return (self.pages + 63) // 64


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
        for slot, (gpa, size) in enumerate(layout(size_bytes)):
            # Private anonymous memory, as QEMU uses: reading a page the guest never
            # touched maps the kernel's shared zero page instead of allocating (with
            # MAP_SHARED, i.e. shmem, every read allocated: scanning a mostly-zero 4 GiB
            # guest for migration took 12 s instead of a fraction of a second).
            # MAP_NORESERVE: untouched pages cost nothing. DONTFORK: a subprocess's fork
            # must not copy-on-write guest RAM. HUGEPAGE: fewer faults, as QEMU does.
            mm = mmap.mmap(
                -1,
                size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            for advice in ("MADV_DONTFORK", "MADV_HUGEPAGE"):
                if hasattr(mmap, advice):
                    mm.madvise(getattr(mmap, advice))
            array = np.frombuffer(mm, dtype=np.uint8)
            anchor = ctypes.c_char.from_buffer(mm)
            host_addr = ctypes.addressof(anchor)
            del anchor  # keep no export of the mmap beyond the numpy view, so close() can unmap
            self.regions.append(MemoryRegion(slot, gpa, size, mm, array, host_addr))
        self.vmm_dirty = [np.zeros(r.bitmap_words(), dtype=np.uint64) for r in self.regions]

    def close(self) -> None:
        """Unmap guest RAM. Only valid once KVM no longer maps it (VM fd closed)."""
        regions, self.regions = self.regions, []
        for region in regions:
            region.array = np.empty(0, dtype=np.uint8)
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
        return self.view(gpa, length).tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Write into guest RAM and mark the pages dirty for migration."""
        buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        self.view(gpa, len(buf))[:] = buf
        self.mark_dirty(gpa, len(buf))

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        self.view(gpa, length)[:] = value
        self.mark_dirty(gpa, length)

    def mark_dirty(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        region = self.region_of(gpa, length)
        first = (gpa - region.gpa) // PAGE_SIZE
        last = (gpa - region.gpa + length - 1) // PAGE_SIZE
        pages = np.arange(first, last + 1, dtype=np.uint64)
        np.bitwise_or.at(self.vmm_dirty[region.slot], pages >> 6, np.uint64(1) << (pages & 63))
