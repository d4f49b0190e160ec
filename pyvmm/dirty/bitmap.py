"""Bitmap mode: KVM_GET_DIRTY_LOG per slot, with manual protection when offered.

Without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG returns the bitmap
and atomically clears it and write-protects those pages again: simple, but a
sync of a large guest write-protects everything at once, and nothing can be
deferred.

With it (enabled with INITIALLY_SET, as QEMU does), GET only reads; the VMM
re-arms pages itself with KVM_CLEAR_DIRTY_LOG, in chunks, when it chooses.
The order matters: get, clear, copy. Clearing after the copy would lose a
write that lands between copy and clear. INITIALLY_SET makes a freshly logged
slot read as all dirty without write-protecting anything, so the first sync of
a migration is free.

`_stale` holds the pages a GET reported that no CLEAR has re-armed yet. KVM
keeps reporting them, and the guest writes them without faulting, until a
CLEAR. Two rules follow (QEMU's kvm_log_clear_one_slot keeps the same set,
mem->dirty_bmap, for the same reasons):
- a CLEAR only ever clears stale bits. Clearing a page no GET has reported
  would erase a write that no view has been told about;
- a view is handed only the reported bits that are not stale: the others it
  was told about already (every open view gets every report, and a view that
  opens gets the stale set at once).
When are stale pages re-armed? Right after the sync if any open view is eager
(defer_clear=False: a dirty-rate measurement wants to see the next write);
else when a deferring view (the migration) calls before_copy() for pages in
their 1 GiB chunk (QEMU's clear_bmap).
"""

from __future__ import annotations

import logging

import numpy as np

from pyvmm.dirty.scan import and_not, count_set, or_into, take_and_clear
from pyvmm.dirty.tracker import ALL_ONES, DirtyTracker, DirtyView, Unpopulated
from pyvmm.kvm import abi
from pyvmm.machine.machine import Machine

log = logging.getLogger(__name__)

CLEAR_CHUNK_PAGES = 1 << 18  # 1 GiB of 4 KiB pages per KVM_CLEAR_DIRTY_LOG (QEMU uses 1 GiB too)


class BitmapTracker(DirtyTracker):
    mode = "bitmap"

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        caps = machine.kvm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        wanted = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | abi.KVM_DIRTY_LOG_INITIALLY_SET
        self.manual_protect = caps & wanted == wanted
        # Reported by a GET, not re-armed by a CLEAR yet (manual protect only).
        self._stale = self.new_bitmaps()
        self._fresh = self.new_bitmaps()  # per sync: the reported bits that are not stale
        # Reported and never re-armed either, because they were never populated when a
        # deferring view's before_copy came: KVM keeps reporting them (their bits stay
        # set), so instead each sync asks pagemap which of them got populated since, and
        # those wake up as newly dirty (docs/dirty-tracking.md, "Never-populated memory").
        self._parked = self.new_bitmaps()
        self._parked_any = [False] * len(self._parked)
        self._scratch = self.new_bitmaps()
        self._clear_scratch = np.zeros(CLEAR_CHUNK_PAGES // 64, np.uint64)
        self._manual_enabled = False
        self.clears = 0  # KVM_CLEAR_DIRTY_LOG calls

    @property
    def can_defer_clear(self) -> bool:
        return self.manual_protect

    def stale_pages(self) -> int:
        """Pages KVM reported that are not re-armed yet (a deferring view holds them)."""
        with self._lock:
            return sum(count_set(b) for b in self._stale)

    def _start_logging(self) -> None:
        if self.manual_protect and not self._manual_enabled:
            wanted = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | abi.KVM_DIRTY_LOG_INITIALLY_SET
            self.machine.vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, wanted)
            self._manual_enabled = True
        for bitmap in (*self._stale, *self._parked):
            bitmap.fill(0)
        self._parked_any = [False] * len(self._parked)
        self.machine.set_dirty_logging(True)
        log.info(
            "bitmap dirty logging on (manual protect %s)", "on" if self.manual_protect else "off"
        )

    def _stop_logging(self) -> None:
        self.machine.set_dirty_logging(False)

    def _harvest(self, into: list[np.ndarray]) -> None:
        vm = self.machine.vm
        for region, target in zip(self.memory.regions, into, strict=True):
            vm.get_dirty_log(region.slot, target.ctypes.data)  # KVM writes every word

    def _new_to_views(self, slot: int, reported: np.ndarray) -> np.ndarray:
        if not self.manual_protect:
            return reported  # the GET re-armed everything it reported
        stale, fresh = self._stale[slot], self._fresh[slot]
        if not self._parked_any[slot]:
            and_not(fresh, reported, stale)
            or_into(stale, reported)
            return fresh
        parked, scratch = self._parked[slot], self._scratch[slot]
        self._wake_parked(slot)  # populated since they were parked: now ordinary reports
        np.copyto(scratch, stale)
        or_into(scratch, parked)
        and_not(fresh, reported, scratch)  # not stale, not (still) parked
        and_not(scratch, reported, parked)
        or_into(stale, scratch)
        return fresh

    def _wake_parked(self, slot: int) -> None:
        """Take out of the parked set every page whose 2 MiB chunk is populated now."""
        parked = self._parked[slot]
        mask, _ = self.memory.populated_chunks(slot, 0, self.memory.regions[slot].pages)
        if mask is None:  # the kernel cannot tell any more: wake them all
            parked.fill(0)
            self._parked_any[slot] = False
            return
        unpopulated = self._scratch[slot]  # the words of chunks still never populated
        unpopulated.fill(0)
        unpopulated[np.repeat(mask == 0, 8)[: len(parked)]] = ALL_ONES
        woken = self._fresh[slot]  # (scratch here; _new_to_views rewrites it next)
        and_not(woken, parked, unpopulated)  # parked pages whose chunk is populated now
        and_not(parked, parked, woken)
        self._parked_any[slot] = bool(count_set(parked))

    def _join(self, view: DirtyView) -> None:
        # The guest writes stale pages without faulting: the new view must count them as
        # dirty now, or a write after its opening could be re-armed away unseen.
        for slot, stale in enumerate(self._stale):
            view._merge(slot, stale)

    def _after_fan_out(self) -> None:
        if self.manual_protect and any(not v.defer_clear for v in self._views):
            for region in self.memory.regions:
                self._clear(region.slot, 0, region.pages)

    def _before_copy(
        self, slot: int, first_page: int, npages: int, unpopulated: Unpopulated | None = None
    ) -> None:
        if self.manual_protect:
            with self._lock:
                stale = self._stale[slot]
                words = stale[first_page // 64 : (first_page + npages + 63) // 64]
                if not count_set(words):
                    return  # these pages are armed already (their chunk was cleared)
                if unpopulated is not None and unpopulated[0] is not None:
                    self._park(slot, first_page, words, *unpopulated)
                start = first_page - first_page % CLEAR_CHUNK_PAGES
                self._clear(slot, start, first_page + npages - start)

    def _park(
        self, slot: int, first_page: int, words: np.ndarray, mask: np.ndarray, first_chunk: int
    ) -> None:
        """Move the stale bits of never-populated chunks among `words` (stale bits from
        first_page on) to the parked set: re-arming them in KVM costs about 10 ns per page
        on this host (180 ms for 64 GiB), watching them through pagemap next to nothing.
        Safe because every way a page gets data populates it (dirty-tracking.md)."""
        word0 = first_page // 64
        flags = mask[np.arange(word0, word0 + len(words)) // 8 - first_chunk] == 0
        if not flags.any():
            return
        parked = self._parked[slot][word0 : word0 + len(words)]
        moving = self._scratch[slot][: len(words)]
        moving.fill(0)
        moving[flags] = words[flags]
        or_into(parked, moving)
        and_not(words, words, moving)
        self._parked_any[slot] = True

    def _clear(self, slot: int, first_page: int, npages: int) -> None:
        """KVM_CLEAR_DIRTY_LOG the stale bits of the chunks in [first_page, +npages)."""
        stale = self._stale[slot]
        total = self.memory.regions[slot].pages
        page = first_page
        end = min(first_page + npages, total)
        while page < end:
            n = min(CLEAR_CHUNK_PAGES, total - page)  # a chunk may end only at the slot's end
            words = stale[page // 64 : (page + n + 63) // 64]
            if count_set(words):
                chunk = self._clear_scratch[: len(words)]
                chunk.fill(0)
                take_and_clear(words, chunk)  # the chunk's stale bits, moved out in one pass
                self.machine.vm.clear_dirty_log(slot, page, n, chunk.ctypes.data)
                self.clears += 1
            page += n
