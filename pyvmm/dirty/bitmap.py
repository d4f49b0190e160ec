"""Bitmap mode: KVM_GET_DIRTY_LOG per slot, with manual protection when offered.

Without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG returns the bitmap
and atomically clears it and write-protects those pages again: simple, but a
sync of a large guest write-protects everything at once.

With it (enabled with INITIALLY_SET, as QEMU does), GET only reads; the VMM
re-protects pages itself with KVM_CLEAR_DIRTY_LOG, in chunks, and only once it
is about to copy them. The order matters: get, clear, copy. Clearing after the
copy would lose a write that lands between copy and clear. INITIALLY_SET makes
a freshly logged slot read as all dirty without write-protecting anything, so
the first sync of a migration is free.

`defer_clear=False` (default) clears everything a sync reports right away, in
chunks; a migration sets it True and calls before_copy(slot, first, n) so only
the chunks it is about to send are re-armed (QEMU's clear_bmap idea).
"""

from __future__ import annotations

import logging

import numpy as np

from pyvmm.dirty.tracker import DirtyTracker
from pyvmm.kvm import abi
from pyvmm.machine.machine import Machine

log = logging.getLogger(__name__)

CLEAR_CHUNK_PAGES = 1 << 18  # 1 GiB of 4 KiB pages per KVM_CLEAR_DIRTY_LOG (QEMU uses 1 GiB too)


class BitmapTracker(DirtyTracker):
    mode = "bitmap"

    def __init__(self, machine: Machine, defer_clear: bool = False) -> None:
        super().__init__(machine)
        caps = machine.kvm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        wanted = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | abi.KVM_DIRTY_LOG_INITIALLY_SET
        self.manual_protect = caps & wanted == wanted
        self.defer_clear = defer_clear and self.manual_protect
        self._kvm_bitmaps = self.new_bitmaps()
        # Reported by GET but not yet re-protected (manual protect only).
        self._to_clear = self.new_bitmaps()
        self._clear_scratch = np.zeros(CLEAR_CHUNK_PAGES // 64, np.uint64)
        self._manual_enabled = False

    def _start_logging(self) -> None:
        if self.manual_protect and not self._manual_enabled:
            wanted = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | abi.KVM_DIRTY_LOG_INITIALLY_SET
            self.machine.vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, wanted)
            self._manual_enabled = True
        for bitmap in self._to_clear:
            bitmap.fill(0)
        self.machine.set_dirty_logging(True)
        log.info(
            "bitmap dirty logging on (manual protect %s)", "on" if self.manual_protect else "off"
        )

    def _stop_logging(self) -> None:
        self.machine.set_dirty_logging(False)

    def _harvest(self, into: list[np.ndarray]) -> None:
        vm = self.machine.vm
        for region, kvm_bits, target in zip(
            self.memory.regions, self._kvm_bitmaps, into, strict=True
        ):
            vm.get_dirty_log(region.slot, kvm_bits.ctypes.data)
            np.bitwise_or(target, kvm_bits, out=target)
            if self.manual_protect:
                np.bitwise_or(
                    self._to_clear[region.slot], kvm_bits, out=self._to_clear[region.slot]
                )
                if not self.defer_clear:
                    self._clear(region.slot, 0, region.pages)

    def before_copy(self, slot: int, first_page: int, npages: int) -> None:
        if self.defer_clear:
            with self._lock:
                start = first_page - first_page % CLEAR_CHUNK_PAGES
                self._clear(slot, start, first_page + npages - start)

    def _clear(self, slot: int, first_page: int, npages: int) -> None:
        """KVM_CLEAR_DIRTY_LOG the pending bits of [first_page, first_page+npages), by chunk."""
        pending = self._to_clear[slot]
        total = self.memory.regions[slot].pages
        page = first_page
        end = min(first_page + npages, total)
        while page < end:
            n = min(CLEAR_CHUNK_PAGES, total - page)  # a chunk may end only at the slot's end
            words = pending[page // 64 : (page + n + 63) // 64]
            if words.any():
                chunk = self._clear_scratch[: len(words)]
                chunk[:] = words
                self.machine.vm.clear_dirty_log(slot, page, n, chunk.ctypes.data)
                words.fill(0)
            page += n
