"""One interface for both of KVM's dirty-tracking APIs.

A DirtyTracker belongs to one machine. Users (a migration, a dirty-rate
measurement, the dirty limit) `attach` their own per-slot bitmaps (numpy
uint64, KVM's layout: bit i of word w is page 64*w+i of the slot); every
`sync` harvests what KVM recorded since the previous sync, plus the pages
pyvmm itself wrote (GuestMemory.vmm_dirty), and ORs it into every attached
bitmap. Harvesting consumes KVM's record, so fanning out in one place is what
lets several users watch the same guest at once. Dirty logging is on while at
least one user is attached.

The two implementations: BitmapTracker (KVM_GET_DIRTY_LOG, optionally with
manual protection) in bitmap.py, RingTracker (per-vCPU dirty rings with a
reaper thread) in ring.py; factory.make_tracker picks one for a machine. See
docs/dirty-tracking.md.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager

import numpy as np

from pyvmm.dirty.scan import count_set, or_into, take_and_clear
from pyvmm.machine.machine import Machine

log = logging.getLogger(__name__)


class DirtyTracker:
    mode = "none"

    def __init__(self, machine: Machine) -> None:
        assert machine.memory is not None
        self.machine = machine
        self.memory = machine.memory
        self._clients: list[list[np.ndarray]] = []
        self._lock = threading.RLock()  # one sync at a time; attach/detach vs sync
        # Scratch bitmaps, one per slot, that each sync fills before fanning out.
        self._scratch = [np.zeros(r.bitmap_words(), np.uint64) for r in self.memory.regions]

    def new_bitmaps(self) -> list[np.ndarray]:
        """Zeroed per-slot bitmaps in KVM's layout, for a caller to attach."""
        return [np.zeros(r.bitmap_words(), np.uint64) for r in self.memory.regions]

    def attach(self, bitmaps: list[np.ndarray]) -> None:
        with self._lock:
            if len(bitmaps) != len(self._scratch) or any(
                b.dtype != np.uint64 or b.shape != s.shape
                for b, s in zip(bitmaps, self._scratch, strict=True)
            ):
                raise ValueError("attach() needs one uint64 bitmap per slot, from new_bitmaps()")
            first = not self._clients
            self._clients.append(bitmaps)
            if first:
                self._start_logging()

    def detach(self, bitmaps: list[np.ndarray]) -> None:
        with self._lock:
            self._clients = [c for c in self._clients if c is not bitmaps]
            if not self._clients:
                self._stop_logging()

    @property
    def bitmap_lock(self) -> AbstractContextManager[bool]:
        """Held by every sync while it ORs into the attached bitmaps. A user that reads and
        clears bits in its own bitmap while others may sync takes it around that step."""
        return self._lock

    @property
    def active(self) -> bool:
        return bool(self._clients)

    def sync(self) -> int:
        """Harvest KVM's dirty record and pyvmm's own writes into every attached bitmap.

        Returns the number of newly dirty pages seen (summed over slots)."""
        with self._lock:
            for scratch in self._scratch:
                scratch.fill(0)
            self._harvest(self._scratch)
            new = 0
            for slot, scratch in enumerate(self._scratch):
                take_and_clear(self.memory.vmm_dirty[slot], scratch)
                new += count_set(scratch)
                for client in self._clients:
                    or_into(client[slot], scratch)
            return new

    def before_copy(self, slot: int, first_page: int, npages: int) -> None:
        """Call before copying pages a sync reported: re-arms tracking for them if deferred."""

    def vcpu_dirty_pages(self) -> list[int] | None:
        """Cumulative pages harvested per vCPU (ring mode), else None."""
        return None

    def close(self) -> None:
        with self._lock:
            if self._clients:
                self._clients = []
                self._stop_logging()

    # --- implemented by each mode ------------------------------------------------------------

    def _start_logging(self) -> None:
        raise NotImplementedError

    def _stop_logging(self) -> None:
        raise NotImplementedError

    def _harvest(self, into: list[np.ndarray]) -> None:
        raise NotImplementedError

