"""The secondary's RAM cache: its copy of the primary's RAM at the last checkpoint.

QEMU's colo_init_ram_cache / colo_flush_ram_cache: a checkpoint's pages go into the cache,
never straight into the secondary's RAM; only when the whole checkpoint has arrived are
they copied in, together with the pages the secondary dirtied itself since the last
checkpoint (its own execution diverged there; the cache holds what the primary had).
So a checkpoint cut off mid-way changes nothing the secondary runs on, and an applied
one leaves the secondary's RAM equal to the primary's at its stop, page for page.
"""

from __future__ import annotations

import numpy as np

from pyvmm.machine.memory import PAGE_SIZE, GuestMemory


def page_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of each run of True in a per-page mask."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
    return [(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def bitmap_mask(bitmap: np.ndarray, pages: int) -> np.ndarray:
    """A KVM-layout dirty bitmap (uint64 words, bit i of word w = page 64 w + i) as a
    per-page bool mask."""
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    return bits[:pages].astype(bool)


class RamCache:
    def __init__(self, memory: GuestMemory) -> None:
        """Copy the secondary's RAM now: it equals the primary's right after the
        migration (call it before the secondary's guest first runs)."""
        self.memory = memory
        self.arrays = [region.array.copy() for region in memory.regions]
        self.received = [np.zeros(region.pages, bool) for region in memory.regions]

    @property
    def size_bytes(self) -> int:
        return sum(len(a) for a in self.arrays)

    def target(self, slot: int, first: int, npages: int) -> memoryview:
        """Where a RAM_RUN's pages land (recv_into), after the range was checked."""
        self.received[slot][first : first + npages] = True
        return memoryview(self.arrays[slot])[first * PAGE_SIZE : (first + npages) * PAGE_SIZE]

    def zero(self, slot: int, first: int, npages: int) -> None:
        self.received[slot][first : first + npages] = True
        self.arrays[slot][first * PAGE_SIZE : (first + npages) * PAGE_SIZE] = 0

    def received_pages(self) -> int:
        return int(sum(int(r.sum()) for r in self.received))

    def apply(self, own_dirty: list[np.ndarray]) -> int:
        """Copy into the secondary's RAM every page the checkpoint brought and every page
        the secondary dirtied itself (own_dirty: its view's bitmaps); returns how many.
        The guest must be stopped. The writes go through the host mapping, which KVM's
        dirty log does not see: they do not count as the secondary's own next time."""
        restored = 0
        for slot, region in enumerate(self.memory.regions):
            mask = self.received[slot] | bitmap_mask(own_dirty[slot], region.pages)
            for first, n in page_runs(mask):
                a, b = first * PAGE_SIZE, (first + n) * PAGE_SIZE
                region.array[a:b] = self.arrays[slot][a:b]
                restored += n
            self.received[slot].fill(False)
        return restored

    def forget_received(self) -> None:
        """A checkpoint that did not arrive whole: its pages stay in the cache (they are
        the primary's newer contents, and a later checkpoint would send them again), but
        they are no longer owed to the secondary's RAM."""
        for received in self.received:
            received.fill(False)
