"""Which pages a migration still has to send: its dirty bitmap and the walk over it.

The bitmap is the migration's own view of the dirty tracker (one uint64 word per 64
pages, per memory slot, KVM's layout). Every page starts dirty (all of RAM must go
once); each sync ORs in what the guest wrote since; the walk takes pages out a step at
a time, from a cursor that carries over between calls, so that a pass over RAM resumes
where the rate limit interrupted it. "Which pages" lives here; sending them is
PageWriter's job (pagewriter.py), in the manner of Cloud Hypervisor's MemoryRangeTable.

A *background* sync (the 2024 series' periodic and background syncs) counts what the
guest dirtied for the throttle but does not queue it: the pages wait in `held` (QEMU's
iter_bmap in those patches) until the next ordinary sync queues them, so the pass in
progress is not lengthened by pages that the next pass would send again anyway.
"""

from __future__ import annotations

import numpy as np

from pyvmm.dirty.scan import bitmap_to_pages, count_set
from pyvmm.dirty.tracker import DirtyView
from pyvmm.machine.memory import PAGE_SIZE

STEP_WORDS = 8  # bitmap words per step: 512 pages, 2 MiB
SCAN_WORDS = 4096  # words looked at per search for the next dirty word (1 GiB of pages)


class DirtyPages:
    def __init__(self, view: DirtyView) -> None:
        self.view = view
        self.bitmaps = view.bitmaps
        self._slot = 0
        self._word = 0
        self.total_words = sum(len(b) for b in self.bitmaps)
        self.laps = 0  # times the walk went past the end of guest RAM
        self.held: list[np.ndarray] | None = None  # pages background syncs found, not queued

    def sync(self, background: bool = False) -> int:
        """Sync the migration's view; returns the pages that became dirty and were not
        already waiting to be sent (QEMU's num_dirty_pages_period increment).

        An ordinary sync queues them, and the held ones with them. A background sync
        moves them into `held` instead (QEMU's RAMBLOCK_SYN_MODERN_BACKGROUND): pages
        already queued are sent later in this pass anyway, with newer contents."""
        view = self.view
        with view.lock:
            if not background:
                new = view.sync()
                if self.held is not None:
                    for bitmap, held in zip(self.bitmaps, self.held, strict=True):
                        np.bitwise_or(bitmap, held, out=bitmap)
                        held.fill(0)
                return new
            before = [b.copy() for b in self.bitmaps]
            new = view.sync()
            if self.held is None:
                self.held = [np.zeros_like(b) for b in self.bitmaps]
            for bitmap, old, held in zip(self.bitmaps, before, self.held, strict=True):
                np.bitwise_or(held, bitmap & ~old, out=held)
                bitmap[:] = old
            return new

    def count(self) -> int:
        """Pages still to send."""
        return sum(count_set(b) for b in self.bitmaps)

    def remaining_bytes(self) -> int:
        return self.count() * PAGE_SIZE

    @property
    def bulk_done(self) -> bool:
        """Has every page been taken once (the first pass, QEMU's old "bulk stage")?"""
        return self.laps > 0 or (self._slot, self._word) >= (
            len(self.bitmaps) - 1,
            len(self.bitmaps[-1]),
        )

    def take(self, max_words: int = STEP_WORDS) -> tuple[int, np.ndarray, int] | None:
        """The next dirty pages from the cursor on: (slot, page numbers, words walked).

        Clears their bits (under the view's lock: another user's sync ORs into our bitmap,
        and a bit landing between the read and the clear would be lost), re-arms tracking
        for them (get, clear, copy), and advances the cursor. None when a whole lap of the
        bitmap found nothing."""
        walked = 0
        slot, word = self._slot, self._word
        while walked < self.total_words:
            bitmap = self.bitmaps[slot]
            if word >= len(bitmap):
                if slot == len(self.bitmaps) - 1:
                    self.laps += 1
                slot, word = (slot + 1) % len(self.bitmaps), 0
                continue
            window = bitmap[word : word + SCAN_WORDS - word % SCAN_WORDS]
            nz = np.flatnonzero(window)
            if len(nz) == 0:  # skip clean words a window at a time
                walked += len(window)
                word += len(window)
                continue
            walked += int(nz[0])
            word += int(nz[0])
            with self.view.lock:
                step = bitmap[word : word + max_words]
                pages = bitmap_to_pages(step) + np.uint64(word * 64)
                step.fill(0)
            self.view.before_copy(slot, word * 64, len(step) * 64)
            word += len(step)
            walked += len(step)
            self._slot, self._word = slot, word
            return slot, pages, walked
        self._slot, self._word = slot, word
        return None
