"""Which pages a migration still has to send: its dirty bitmap and the walk over it.

The bitmap is the migration's own view of the dirty tracker (one uint64 word per 64
pages, per memory slot, KVM's layout). Every page starts dirty (all of RAM must go
once); each sync ORs in what the guest wrote since; the walk takes pages out a step at
a time, from a cursor that carries over between calls, so that a pass over RAM resumes
where the rate limit interrupted it. "Which pages" lives here; sending them is
PageWriter's job (pagewriter.py), in the manner of Cloud Hypervisor's MemoryRangeTable:
a take hands over a RangeTable (dirty/ranges.py) of zero runs and data runs.

One take is one Cython pass (walk_runs, docs/scan.md "The walk"): it clears the bits,
tests each page for zeros and builds the runs, after the tracker has re-armed those
pages (get, clear, copy). In the first pass over RAM, pages in 2 MiB chunks the host
kernel never populated are zero runs that nobody reads (docs/dirty-tracking.md,
"Never-populated memory").

A *background* sync (the 2024 series' periodic and background syncs) counts what the
guest dirtied for the throttle but does not queue it: the pages wait in `held` (QEMU's
iter_bmap in those patches) until the next ordinary sync queues them, so the pass in
progress is not lengthened by pages that the next pass would send again anyway.
"""

from __future__ import annotations

import numpy as np

from pyvmm.dirty.ranges import RangeTable
from pyvmm.dirty.scan import count_set, dirty_window, take_and_clear, take_new, walk_runs
from pyvmm.dirty.tracker import DirtyView
from pyvmm.machine.memory import PAGE_SIZE, GuestMemory
from pyvmm.migration.stream import MAX_RUN_PAGES

STEP_PAGES = 4096  # dirty pages per take at most (16 MiB, one RAM_RUN's worth)
WINDOW_WORDS = 16384  # bitmap words one take looks at, at most (4 GiB of pages)
# First pass: a take looks no further than the end of its aligned 1 GiB (the chunk the
# bitmap tracker re-arms at once anyway), and asks which of its chunks were populated.
WINDOW_1G_WORDS = 4096


class DirtyPages:
    def __init__(self, view: DirtyView, memory: GuestMemory | None = None) -> None:
        """memory: guest RAM, for the zero test and the populated chunks; None walks the
        bitmap alone and calls every page data (simulations)."""
        self.view = view
        self.memory = memory
        self.bitmaps = view.bitmaps
        self._slot = 0
        self._word = 0
        self.total_words = sum(len(b) for b in self.bitmaps)
        self.laps = 0  # times the walk went past the end of guest RAM
        self.held: list[np.ndarray] | None = None  # pages background syncs found, not queued
        self._before: list[np.ndarray] | None = None  # a background sync's copy of the bitmap
        self._hint: tuple[int, int, int, tuple[np.ndarray | None, int]] | None = None

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
                        take_and_clear(held, bitmap)
                return new
            if self.held is None:
                self.held = [np.zeros_like(b) for b in self.bitmaps]
                self._before = [np.empty_like(b) for b in self.bitmaps]
            assert self._before is not None
            for bitmap, old in zip(self.bitmaps, self._before, strict=True):
                np.copyto(old, bitmap)
            new = view.sync()
            for bitmap, old, held in zip(self.bitmaps, self._before, self.held, strict=True):
                take_new(bitmap, old, held)
            return new

    def count(self) -> int:
        """Pages still to send."""
        return sum(count_set(b) for b in self.bitmaps)

    def remaining_bytes(self) -> int:
        return self.count() * PAGE_SIZE

    def none_left(self) -> bool:
        """count() == 0, found by a scan that stops at the first set bit from the cursor
        on. In the first pass that bit is the next page to send, so the answer costs
        nothing, where count() reads the whole bitmap (about 1 ms per TiB of RAM)."""
        bitmap = self.bitmaps[self._slot]
        word = min(self._word, len(bitmap))
        if dirty_window(bitmap, word, len(bitmap), 1)[0] < len(bitmap):
            return False
        return all(dirty_window(b, 0, len(b), 1)[0] == len(b) for b in self.bitmaps)

    @property
    def bulk_done(self) -> bool:
        """Has every page been taken once (the first pass, QEMU's old "bulk stage")?"""
        return self.laps > 0 or (self._slot, self._word) >= (
            len(self.bitmaps) - 1,
            len(self.bitmaps[-1]),
        )

    def take(self, max_pages: int = STEP_PAGES) -> RangeTable | None:
        """The next dirty pages from the cursor on, about max_pages of them (the walk stops
        at the first whole word past it; never-populated pages do not count), as a
        RangeTable of one slot.

        In order: find the window, re-arm tracking for it (view.before_copy: get, clear,
        copy), then under the view's lock ask which of its chunks were ever populated
        (first pass only) and take the bits and test the pages in one pass. The lock keeps
        another user's sync from ORing a bit into our bitmap between the read and the
        clear, and from merging a write that a populated answer did not see into a bit
        the walk is about to take. None when a whole lap of the bitmap found nothing."""
        max_pages = max(1, max_pages)
        walked = 0
        slot, word = self._slot, self._word
        while walked < self.total_words:
            bitmap = self.bitmaps[slot]
            if word >= len(bitmap):
                if slot == len(self.bitmaps) - 1:
                    self.laps += 1
                slot, word = (slot + 1) % len(self.bitmaps), 0
                continue
            ask = self.memory is not None and self.laps == 0
            hint = None
            if ask:  # up to the end of its aligned 1 GiB, the bitmap tracker's CLEAR chunk
                limit = min(len(bitmap), (word // WINDOW_1G_WORDS + 1) * WINDOW_1G_WORDS)
                start, _, _ = dirty_window(bitmap, word, limit, 0)
                if start < limit:
                    # Which chunks look never populated: only a hint (how far to go, what
                    # the tracker may watch instead of re-arm), asked once per 1 GiB. The
                    # answer the walk relies on is asked again, under the lock, below.
                    hint = self._populated_hint(slot, start, limit)
                    start, stop, _ = dirty_window(bitmap, start, limit, max_pages, *hint)
            else:
                limit = min(len(bitmap), word + WINDOW_WORDS)
                start, stop, _ = dirty_window(bitmap, word, limit, max_pages)
            walked += start - word
            word = start
            if start == limit:
                continue
            table = self._walk(slot, bitmap, start, stop, max_pages, hint)
            walked += table.words
            word += table.words
            if table.count == 0:
                continue
            table.words = walked  # the clean words skipped to get here count too
            self._slot, self._word = slot, word
            return table
        self._slot, self._word = slot, word
        return None

    def _populated_hint(self, slot: int, start: int, limit: int) -> tuple[np.ndarray | None, int]:
        """The populated chunks of the 1 GiB window [start, limit) (words), cached for the
        takes that follow in the same window. Stale answers are safe here: a chunk
        populated after the question is re-armed or woken up by the tracker, and the walk
        asks again for what it reads."""
        cached = self._hint
        if cached is not None and cached[0] == slot and cached[1] <= start and limit <= cached[2]:
            return cached[3]
        assert self.memory is not None
        answer = self.memory.populated_chunks(slot, start * 64, (limit - start) * 64)
        self._hint = (slot, start, limit, answer)
        return answer

    def _walk(
        self, slot: int, bitmap: np.ndarray, start: int, stop: int, max_pages: int,
        hint: tuple[np.ndarray | None, int] | None,
    ) -> RangeTable:  # fmt: skip
        """One take over words [start, stop) of a slot's bitmap."""
        memory = self.memory
        if hint is None or hint[0] is None:
            self.view.before_copy(slot, start * 64, (stop - start) * 64)
        else:  # the tracker may watch never-populated chunks rather than re-arm them
            self.view.before_copy(slot, start * 64, (stop - start) * 64, hint)
        mem = memory.regions[slot].mm if memory is not None else None
        populated = None
        first_chunk = 0
        table = RangeTable.empty(slot, max_pages + 64)
        with self.view.lock:
            if hint is not None:
                assert memory is not None
                populated, first_chunk = memory.populated_chunks(
                    slot, start * 64, (stop - start) * 64
                )
            count, next_word, pages, zeros, reads = walk_runs(
                bitmap, start, stop, mem, populated, first_chunk, max_pages, MAX_RUN_PAGES,
                table.first, table.npages, table.zero,
            )  # fmt: skip
        table.count = count
        table.pages = pages
        table.zero_pages = zeros
        table.read_pages = reads
        table.unpopulated_pages = pages - reads if mem is not None else 0
        table.words = next_word - start
        return table
