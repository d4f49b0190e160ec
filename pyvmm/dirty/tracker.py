"""One interface for both of KVM's dirty-tracking APIs, with one view per user.

A DirtyTracker belongs to one machine. Each user (a migration, a dirty-rate
measurement, the dirty limit) opens its own DirtyView: per-slot bitmaps in
KVM's layout (numpy uint64, bit i of word w is page 64*w+i of the slot) that
only it reads and clears. Any view's `sync()` harvests what KVM recorded since
the previous harvest, plus the pages pyvmm itself wrote (GuestMemory.vmm_dirty),
ORs it into its own bitmaps and holds it for every other open view, which gets it
at its own next `sync()`. Harvesting consumes KVM's record, so fanning out in one
place is what lets several users watch the same guest at once; holding it is
QEMU's order: another user's log sync (the dirty limit's, calc-dirty-rate's) fills
ram_list.dirty_memory, and a migration's bitmap takes it only at its own
migration_bitmap_sync, so a page dirtied after a migration's sync is sent in its
next pass, never in the current one. Dirty logging is on while a view is open.

With manual protection (bitmap mode), a page stays marked dirty in KVM from the
GET that reported it until a CLEAR re-arms it; a later GET reports it again.
The tracker remembers which reported pages are not re-armed yet (`stale`) and
hands a view only what it has not been told: a migration that defers its
clears never makes another view count the same page twice. Who re-arms when is
in bitmap.py; docs/dirty-tracking.md has the rules and what each view can see.

The implementations: BitmapTracker in bitmap.py, RingTracker in ring.py;
factory.make_tracker picks one for a machine.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import numpy as np

from pyvmm.dirty.scan import (
    block_summary_words,
    clear_blocks,
    count_set,
    or_into,
    or_new_into,
    take_and_clear,
)
from pyvmm.machine.machine import Machine
from pyvmm.machine.memory import MemoryRegion

log = logging.getLogger(__name__)

ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
# (mask, first chunk): one byte per 2 MiB chunk, 0 = never populated (populated_chunks)
Unpopulated = tuple[np.ndarray | None, int]


def set_every_page(bitmaps: list[np.ndarray], regions: list[MemoryRegion]) -> None:
    """Mark every page of every slot dirty, and no bit past a slot's last page."""
    for region, bitmap in zip(regions, bitmaps, strict=True):
        bitmap.fill(ALL_ONES)
        if region.pages % 64:
            bitmap[-1] = np.uint64((1 << (region.pages % 64)) - 1)


class DirtyView:
    """One user's dirty bitmaps. Create with DirtyTracker.open_view(); close when done.

    Threads: only this view's own sync() ORs into `bitmaps` (holding `lock`); other
    views' syncs go to `_held`, under the tracker's lock. The owner holds `lock` while it
    reads and clears bits, and must not call sync(), before_copy() or close() while
    holding it (its sync waits for the lock).
    """

    def __init__(
        self, tracker: DirtyTracker, name: str, defer_clear: bool, initially_dirty: bool
    ) -> None:
        self.tracker = tracker
        self.name = name
        # Effective value: deferring needs manual protection (bitmap mode) to mean anything.
        self.defer_clear = defer_clear
        self.bitmaps = tracker.new_bitmaps()
        self.lock = threading.RLock()
        self.closed = False
        self._new_pages = 0  # bits newly set in `bitmaps` since this view's last sync()
        # What other views' syncs harvested since this view's last sync (QEMU's
        # ram_list.dirty_memory for this user), with the block summary of what was held
        # (None: bits may be anywhere; scan.py's block summaries).
        self._held = tracker.new_bitmaps()
        self._held_blocks: list[np.ndarray | None] = [
            np.zeros(block_summary_words(len(b)), np.uint64) for b in self._held
        ]
        self._held_any = False
        if initially_dirty:
            set_every_page(self.bitmaps, tracker.memory.regions)

    def sync(self) -> int:
        """Harvest KVM, take what other views' syncs held for this one, and hand the harvest
        to every other open view; returns the pages newly set in this view's bitmaps by
        this sync."""
        if self.closed:
            raise RuntimeError(f"dirty view {self.name!r} is closed")
        self.tracker._sync(self)
        with self.lock:
            new, self._new_pages = self._new_pages, 0
        return new

    def before_copy(
        self, slot: int, first_page: int, npages: int, unpopulated: Unpopulated | None = None
    ) -> None:
        """Call before reading these pages' contents: get, clear, copy. Re-arms tracking
        for them if that was deferred. unpopulated: (mask, first chunk) of 2 MiB chunks of
        the range the kernel never populated (GuestMemory.populated_chunks); the bitmap
        tracker may watch those through pagemap instead of re-arming them in KVM
        (docs/dirty-tracking.md, "Never-populated memory")."""
        self.tracker._before_copy(slot, first_page, npages, unpopulated)

    def dirty_pages(self) -> int:
        """Pages currently set in this view's bitmaps."""
        with self.lock:
            return sum(count_set(b) for b in self.bitmaps)

    def close(self) -> None:
        """Detach; dirty logging stops when the last view closes. Idempotent."""
        self.tracker._close_view(self)

    def _merge(self, slot: int, new: np.ndarray, blocks: np.ndarray | None = None) -> None:
        """OR pages into this view now (the tracker holds its own lock); blocks: the
        block summary of `new` (scan.py), or None to look at all of it."""
        with self.lock:
            self._new_pages += or_new_into(self.bitmaps[slot], new, blocks)

    def _hold(self, slot: int, new: np.ndarray, blocks: np.ndarray | None) -> None:
        """Keep another view's harvest for this view's next sync (tracker lock held)."""
        held_blocks = self._held_blocks[slot]
        if blocks is None or held_blocks is None:
            self._held_blocks[slot] = None
            or_into(self._held[slot], new)
        else:
            or_new_into(self._held[slot], new, blocks)
            or_into(held_blocks, blocks)
        self._held_any = True

    def _take_held(self) -> None:
        """At this view's own sync: what other views harvested meanwhile becomes its own."""
        if not self._held_any:
            return
        for slot, held in enumerate(self._held):
            blocks = self._held_blocks[slot]
            self._merge(slot, held, blocks)
            if blocks is None:
                held.fill(0)
                self._held_blocks[slot] = np.zeros(block_summary_words(len(held)), np.uint64)
            else:
                clear_blocks(held, blocks)
                blocks.fill(0)
        self._held_any = False

    def __enter__(self) -> DirtyView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<DirtyView {self.name!r} {state} defer_clear={self.defer_clear}>"


class DirtyTracker:
    mode = "none"

    def __init__(self, machine: Machine) -> None:
        assert machine.memory is not None
        self.machine = machine
        self.memory = machine.memory
        self._views: list[DirtyView] = []
        self._lock = threading.RLock()  # one sync at a time; open/close vs sync
        # What KVM reported in the current sync, one bitmap per slot.
        self._report = self.new_bitmaps()
        self.syncs = 0  # harvests done, by any view

    # --- views -------------------------------------------------------------------------------

    def new_bitmaps(self) -> list[np.ndarray]:
        """Zeroed per-slot bitmaps in KVM's layout."""
        return [np.zeros(r.bitmap_words(), np.uint64) for r in self.memory.regions]

    @property
    def can_defer_clear(self) -> bool:
        """Whether a view's defer_clear changes anything (manual protection is on)."""
        return False

    def open_view(
        self, name: str, *, defer_clear: bool = False, initially_dirty: bool = False
    ) -> DirtyView:
        """A new user's view. initially_dirty: every page set (a migration's first pass).
        defer_clear: pages this view is told about are re-armed in KVM only when it calls
        before_copy() for them, unless an eager view is open (docs/dirty-tracking.md)."""
        with self._lock:
            view = DirtyView(self, name, defer_clear and self.can_defer_clear, initially_dirty)
            if not self._views:
                self._start_logging()
            else:
                self._join(view)
            self._views.append(view)
        log.debug("dirty view %r opened (defer_clear=%s)", name, view.defer_clear)
        return view

    @property
    def views(self) -> list[DirtyView]:
        with self._lock:
            return list(self._views)

    @property
    def active(self) -> bool:
        return bool(self._views)

    def close(self) -> None:
        with self._lock:
            views, self._views = self._views, []
            for view in views:
                view.closed = True
            if views:
                self._stop_logging()

    def vcpu_dirty_pages(self) -> list[int] | None:
        """Ring mode: per vCPU, cumulative, the dirty-ring entries QEMU would have counted
        (cpu->dirty_pages; ring.py, ring_model.py). Bitmap mode: None."""
        return None

    # --- what DirtyView calls ----------------------------------------------------------------

    def _sync(self, syncing: DirtyView) -> None:
        with self._lock:
            if not self._views:
                return
            report = self._report
            self._harvest(report)
            self.syncs += 1
            syncing._take_held()
            for slot, reported in enumerate(report):
                new = self._new_to_views(slot, reported)
                blocks = self._report_blocks(slot)  # None: bits may be anywhere
                vmm_blocks = self.memory.take_vmm_blocks(slot)
                take_and_clear(self.memory.vmm_dirty[slot], new, vmm_blocks)  # pyvmm's writes
                if blocks is not None:
                    or_into(blocks, vmm_blocks)
                for view in self._views:
                    if view is syncing:
                        view._merge(slot, new, blocks)
                    else:
                        view._hold(slot, new, blocks)
            self._after_fan_out()

    def _close_view(self, view: DirtyView) -> None:
        with self._lock:
            if view.closed:
                return
            view.closed = True
            self._views = [v for v in self._views if v is not view]
            if not self._views:
                self._stop_logging()
        log.debug("dirty view %r closed", view.name)

    # --- implemented by each mode ------------------------------------------------------------

    def _start_logging(self) -> None:
        raise NotImplementedError

    def _stop_logging(self) -> None:
        raise NotImplementedError

    def _harvest(self, into: list[np.ndarray]) -> None:
        """Overwrite `into` with what KVM reports now (a set bit per dirty page)."""
        raise NotImplementedError

    def _new_to_views(self, slot: int, reported: np.ndarray) -> np.ndarray:
        """Of a slot's report, the bits to hand to every view (may be `reported` itself)."""
        return reported

    def _report_blocks(self, slot: int) -> np.ndarray | None:
        """The block summary of what _new_to_views returned for the slot, if the mode keeps
        one (ring mode: a sync then costs what was dirtied, not what the guest has); the
        tracker ORs into it the blocks of pyvmm's own writes that it adds."""
        return None

    def _join(self, view: DirtyView) -> None:
        """A view opens while others are open: give it what it must not miss."""

    def _after_fan_out(self) -> None:
        """After every view got this sync's pages (bitmap mode: eager re-arming)."""

    def _before_copy(
        self, slot: int, first_page: int, npages: int, unpopulated: Unpopulated | None = None
    ) -> None:
        """Re-arm tracking for pages about to be copied, if that was deferred."""
