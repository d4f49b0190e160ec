"""The dirty rings a QEMU with `dirty-ring-size = entries` would have: what they hold, when
they are reaped, and so what QEMU counts per vCPU.

QEMU's per-vCPU dirty rate is the number of ring entries a vCPU produced: kvm_dirty_ring_
reap_one (accel/kvm/kvm-all.c) adds every entry it reaps to `cpu->dirty_pages`, and
vcpu_calculate_dirtyrate (migration/dirtyrate.c) takes the difference of that counter over
a period. KVM pushes an entry when a vCPU first writes a write-protected page, and a reap
(harvest + KVM_RESET_DIRTY_RINGS) write-protects those pages again. So a page rewritten
after a reap is a new entry, and the count depends on when rings are reaped:

- at a ring-full exit (KVM_EXIT_DIRTY_RING_FULL at `entries - 64`): that vCPU's ring only
  while a dirty limit is in service, every ring otherwise (kvm_cpu_exec);
- at every dirty-log sync (kvm_dirty_ring_flush): every ring;
- by the reaper thread, once a second, except while a dirty limit is in service
  (kvm_dirty_ring_reaper_thread: `sleep(1); if (dirtylimit_in_service()) continue;`).

pyvmm's real rings are harvested more often than that (ring.py says why), and each real
harvest re-protects pages, so its raw entries would count a rewritten page too often. The
model takes every real entry in order and keeps only those a QEMU ring would have held: an
entry for a page that is not armed (written, by any vCPU, since its last modelled reap). Its
own reaps follow QEMU's rules above; RingTracker tells it when. Its `dirty_pages` is QEMU's
`cpu->dirty_pages`: entries counted when their ring is reaped.

The model is exact as long as a real reap of a page's ring happens at or before each of its
modelled reaps, which RingTracker guarantees (a modelled reap always follows a real harvest
of the rings it covers). docs/dirty-tracking.md has the reasoning and the tests.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from pyvmm.dirty.scan import ring_entry_pages, ring_model_push, ring_model_reap
from pyvmm.kvm import abi

MIN_ENTRIES = 256  # KVM: a ring is at least a page (kvm_vm_ioctl_enable_dirty_log_ring)
MAX_ENTRIES = 65536  # KVM_DIRTY_RING_MAX_ENTRIES


def validate_entries(entries: int) -> None:
    if not MIN_ENTRIES <= entries <= MAX_ENTRIES or entries & (entries - 1):
        raise ValueError(
            f"a dirty ring of {entries} entries: must be a power of two from "
            f"{MIN_ENTRIES} to {MAX_ENTRIES}"
        )


class RingModel:
    """Per-vCPU rings of `entries` entries over the pages of `slot_pages` (flat numbering:
    slot 0's pages first). Thread-safe: every method takes the model's lock."""

    def __init__(self, nvcpus: int, slot_pages: Sequence[int], entries: int) -> None:
        validate_entries(entries)
        self.nvcpus = nvcpus
        self.slot_pages = np.array(slot_pages, np.uint64)
        self.slot_first_page = np.concatenate(([0], np.cumsum(self.slot_pages)[:-1])).astype(
            np.uint64
        )
        total_pages = int(self.slot_pages.sum())
        self.lock = threading.Lock()
        self.armed = np.zeros(max(1, -(-total_pages // 64)), np.uint64)
        self.reaped = np.zeros(nvcpus, np.uint64)  # QEMU's cpu->dirty_pages
        self.fulls = [0] * nvcpus  # ring-full events per vCPU
        self.reaps = 0  # reap calls (one ring or all), ring-full ones not included
        self._alloc(entries)

    def _alloc(self, entries: int) -> None:
        self.entries = entries
        self.soft_limit = entries - abi.KVM_DIRTY_RING_RSVD_ENTRIES
        self.rings = np.zeros((self.nvcpus, entries), np.uint64)
        self.fill = np.zeros(self.nvcpus, np.int64)

    def push(self, vcpu: int, pages: np.ndarray, *, reap_all_on_full: bool) -> int:
        """vCPU `vcpu` wrote these flat page numbers, in order; returns its ring-full count."""
        with self.lock:
            fulls = ring_model_push(
                pages, self.armed, self.rings, self.fill, self.reaped, vcpu, self.soft_limit,
                reap_all_on_full,
            )  # fmt: skip
            self.fulls[vcpu] += fulls
        return fulls

    def push_ring(
        self, vcpu: int, ring: object, nentries: int, first_fetch: int, count: int,
        *, reap_all_on_full: bool,
    ) -> int:  # fmt: skip
        """The same, for entries [first_fetch, first_fetch + count) just harvested from a real
        KVM ring of nentries entries (still unreset, so their slot and offset are valid)."""
        if count <= 0:
            return 0
        pages = np.empty(count, np.uint64)
        got = ring_entry_pages(
            ring, nentries, first_fetch, count, self.slot_first_page, self.slot_pages, pages
        )
        return self.push(vcpu, pages[:got], reap_all_on_full=reap_all_on_full)

    def reap(self, vcpu: int | None = None) -> int:
        """Reap one vCPU's ring (None: all): its entries count, its pages are re-protected."""
        with self.lock:
            self.reaps += 1
            return int(
                ring_model_reap(
                    self.armed, self.rings, self.fill, self.reaped, -1 if vcpu is None else vcpu
                )
            )

    def clear(self) -> None:
        """Dirty logging (re)starts: every page is write-protected, the rings are empty, and
        what they held is not counted (no reap happened)."""
        with self.lock:
            self.armed.fill(0)
            self.fill.fill(0)

    def resize(self, entries: int) -> None:
        """Rings of another size from now on; what the old ones held is reaped first."""
        validate_entries(entries)
        with self.lock:
            if entries == self.entries:
                return
            ring_model_reap(self.armed, self.rings, self.fill, self.reaped, -1)
            self._alloc(entries)

    def dirty_pages(self) -> list[int]:
        """Per vCPU, cumulative: entries reaped (QEMU's cpu->dirty_pages)."""
        with self.lock:
            return [int(x) for x in self.reaped]

    def remaining(self, vcpu: int) -> int:
        """Entries vCPU `vcpu` can still push before its ring is full (no lock: a hint)."""
        return max(0, self.soft_limit - int(self.fill[vcpu]))
