"""Ring mode: per-vCPU KVM dirty rings, harvested by a reaper thread.

Each vCPU has a ring of 16-byte entries {flags, slot, offset} shared with KVM
(mapped by the machine at creation). KVM pushes an entry when the vCPU first
writes a write-protected page; pyvmm harvests entries (acquire-load the flags,
read slot and offset, release-store RESET), then KVM_RESET_DIRTY_RINGS lets KVM
re-protect those pages and reuse the entries. Only then may the pages' contents
be read: a write after the reset faults again and is pushed again.

KVM keeps KVM_DIRTY_RING_RSVD_ENTRIES (64, plus the PML batch where there is
PML) in reserve: at the soft limit it asks the vCPU to exit with
KVM_EXIT_DIRTY_RING_FULL, and pushes made before that exit use the reserve. On
a healthy host a full ring loses nothing. Some hosts do lose entries at
ring-full: kvm_pvm emulates up to pvm_emul_batch guest instructions without
looking at the ring again, so ring-0 code that stores to many fresh pages
overruns the reserve and KVM wraps over unharvested entries; small rings can
then livelock (DIRTY_RING_FULL forever with nothing to harvest). Whether this
host does is a quirk decided per ring size at start-up (ring_quirk.py). Hence:
- a reaper thread looks at every ring every 5 ms and harvests it when it is an
  eighth full, or 100 ms after its last harvest: rings stay far from full
  (`reaper=False` holds it back, for experiments and the probe);
- per-vCPU counts are of *distinct* pages newly dirty since the last sync (a page
  rewritten many times between two syncs counts once, for the vCPU harvested
  first), because this host pushes duplicate entries (see _harvested below);
  QEMU counts entries, and its reaper runs about once a second;
- a harvest that finds a ring at or past its soft limit is normal (a ring-full
  harvest takes at least the soft limit). Only where the quirk says this host
  loses entries at ring-full (`lossy=True`) is the whole guest then marked
  dirty for that round, logged once per event;
- KVM_EXIT_DIRTY_RING_FULL is handled on the vCPU's thread (harvest its ring,
  then the dirty-limit hook); LIVELOCK_EXITS of them in a row that harvest
  nothing end the VM with an error naming the ring size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from pyvmm.dirty.scan import block_summary_words, clear_blocks, harvest_ring, take_and_clear
from pyvmm.dirty.tracker import ALL_ONES, DirtyTracker, set_every_page
from pyvmm.kvm import abi
from pyvmm.machine.machine import Machine
from pyvmm.machine.vcpu import Vcpu

log = logging.getLogger(__name__)

REAP_CHECK_INTERVAL_S = 0.005  # how often the reaper looks at each ring's fill level
REAP_MAX_AGE_S = 0.1  # harvest a ring at least this often
REAP_FILL_FRACTION = 8  # ... and at once when it is 1/8 full
LIVELOCK_EXITS = 10000


class RingTracker(DirtyTracker):
    mode = "ring"

    def __init__(self, machine: Machine, *, lossy: bool = False, reaper: bool = True) -> None:
        super().__init__(machine)
        self.lossy = lossy  # the host quirk: ring-full may have lost entries (ring_quirk.py)
        self.reaper = reaper
        self.entries = machine.ring_bytes // 16
        self.soft_limit = self.entries - abi.KVM_DIRTY_RING_RSVD_ENTRIES
        self._fetch = [0] * len(machine.vcpus)
        # Per vCPU, cumulative: distinct pages newly dirty since the last sync (what rates
        # and the dirty limit use), and raw ring entries. They differ because this host's
        # KVM sometimes pushes the same page twice without a reset in between (about 13%
        # extra entries under memstress); QEMU counts entries.
        self._harvested = [0] * len(machine.vcpus)
        self.entries_harvested = [0] * len(machine.vcpus)
        self._empty_full_exits = [0] * len(machine.vcpus)
        self._ring_locks = [threading.Lock() for _ in machine.vcpus]
        self._acc = self.new_bitmaps()  # harvested since the last sync
        # Block summaries (scan.py): where _acc and the last sync's report may hold bits,
        # so that a sync costs what was harvested, not the size of the guest.
        self._acc_blocks = self.new_block_summaries()
        self._sync_blocks = self.new_block_summaries()
        self._acc_lock = threading.Lock()
        self._fresh = np.zeros(1, np.uint64)  # harvest_ring's count of newly set bits
        self._slot_pages = np.array([r.pages for r in self.memory.regions], np.uint64)
        self._ring_full_exits = [0] * len(machine.vcpus)  # each written by its vCPU only
        self.full_harvests = 0  # harvests that found a ring at or past its soft limit
        self.resends = 0  # ... that marked the whole guest dirty (lossy hosts only)
        self.largest_harvest = 0  # entries taken by the largest single harvest
        self.on_ring_full: Callable[[Vcpu], None] | None = None  # the dirty limit's hook
        # Called after every harvest that found entries, outside the ring locks, on the
        # harvesting thread (reaper, sync or ring-full exit), with (vCPU index, that vCPU's
        # cumulative distinct-page count, as vcpu_dirty_pages()). Must be cheap: it runs in
        # the reaper's loop. The dirty limit counts virtual ring fills with it.
        self.on_harvest: Callable[[int, int], None] | None = None
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        for vcpu in machine.vcpus:
            vcpu.on_dirty_ring_full = self._ring_full_exit

    def new_block_summaries(self) -> list[np.ndarray]:
        """Zeroed per-slot block summaries (one bit per BLOCK_PAGES pages)."""
        return [
            np.zeros(block_summary_words(r.bitmap_words()), np.uint64) for r in self.memory.regions
        ]

    # --- logging on/off ----------------------------------------------------------------------

    def _start_logging(self) -> None:
        # Entries pushed before logging started (none, normally) are stale: drop them.
        self._reap_all(discard=True)
        self.machine.set_dirty_logging(True)
        self._stop.clear()
        if self.reaper:
            self._reaper = threading.Thread(target=self._reap_loop, name="dirty-ring-reaper")
            self._reaper.daemon = True
            self._reaper.start()
        log.info(
            "dirty ring logging on: %d entries per vCPU, reaper %s, ring-full %s",
            self.entries, "on" if self.reaper else "held back",
            "may lose entries (host quirk)" if self.lossy else "loses nothing",
        )  # fmt: skip

    def _stop_logging(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(2)
            self._reaper = None
        self.machine.set_dirty_logging(False)

    def close(self) -> None:
        super().close()
        for vcpu in self.machine.vcpus:
            vcpu.on_dirty_ring_full = None

    # --- harvesting --------------------------------------------------------------------------

    def _reap_loop(self) -> None:
        last = [0.0] * len(self.machine.vcpus)
        while not self._stop.wait(REAP_CHECK_INTERVAL_S):
            now = time.monotonic()
            total = 0
            for i in range(len(self.machine.vcpus)):
                if now - last[i] >= REAP_MAX_AGE_S or self._filling(i):
                    total += self._reap_one(i)
                    last[i] = now
            if total:
                self.machine.vm.reset_dirty_rings()

    def _filling(self, index: int) -> bool:
        """Is the entry an eighth of the ring past the next one already dirty? (a cheap peek)"""
        ring = self.machine.vcpus[index].fd.ring_mmap
        if ring is None:
            return False
        pos = (self._fetch[index] + self.entries // REAP_FILL_FRACTION) % self.entries * 16
        return bool(ring[pos] & abi.KVM_DIRTY_GFN_F_DIRTY)

    def _reap_one(self, index: int) -> int:
        """Harvest one vCPU's ring into the accumulator; returns entries harvested."""
        ring = self.machine.vcpus[index].fd.ring_mmap
        if ring is None:
            return 0
        with self._ring_locks[index], self._acc_lock:
            fresh = self._fresh
            fresh[0] = 0
            fetch, harvested, invalid = harvest_ring(
                ring, self.entries, self._fetch[index], self._acc, self._slot_pages, fresh,
                self._acc_blocks,
            )  # fmt: skip
            self._fetch[index] = fetch
            self._harvested[index] += int(fresh[0])
            self.entries_harvested[index] += harvested
            self.largest_harvest = max(self.largest_harvest, harvested)
            if harvested >= self.soft_limit:
                self.full_harvests += 1
                if self.lossy:
                    # This host may have wrapped over entries we never saw (the quirk).
                    # Correctness first: treat every page as dirty for this round.
                    self.resends += 1
                    set_every_page(self._acc, self.memory.regions)
                    for blocks in self._acc_blocks:
                        blocks.fill(ALL_ONES)
                    log.warning(
                        "vCPU %d: dirty ring held %d of %d entries at harvest; this host may "
                        "lose entries at ring-full (quirk), marking all pages dirty",
                        index, harvested, self.entries,
                    )  # fmt: skip
            if invalid:
                log.warning("vCPU %d: %d dirty ring entries named no known page", index, invalid)
            pages = self._harvested[index]
        hook = self.on_harvest
        if harvested and hook is not None:
            hook(index, pages)
        return harvested

    def _reap_all(self, discard: bool = False) -> int:
        total = sum(self._reap_one(i) for i in range(len(self.machine.vcpus)))
        if total:
            self.machine.vm.reset_dirty_rings()
        if discard:
            with self._acc_lock:
                for acc, blocks in zip(self._acc, self._acc_blocks, strict=True):
                    acc.fill(0)
                    blocks.fill(0)
        return total

    def _harvest(self, into: list[np.ndarray]) -> None:
        self._reap_all()
        with self._acc_lock:
            for acc, target, acc_blocks, sync_blocks in zip(
                self._acc, into, self._acc_blocks, self._sync_blocks, strict=True
            ):
                clear_blocks(target, sync_blocks)  # what the last report held, only
                np.copyto(sync_blocks, acc_blocks)
                take_and_clear(acc, target, acc_blocks)
                acc_blocks.fill(0)

    def _report_blocks(self, slot: int) -> np.ndarray:
        return self._sync_blocks[slot]

    def _ring_full_exit(self, vcpu: Vcpu) -> None:
        """KVM_EXIT_DIRTY_RING_FULL on the vCPU's own thread."""
        self._ring_full_exits[vcpu.index] += 1
        got = self._reap_one(vcpu.index)
        if got:
            self.machine.vm.reset_dirty_rings()
            self._empty_full_exits[vcpu.index] = 0
        else:
            self._empty_full_exits[vcpu.index] += 1
            if self._empty_full_exits[vcpu.index] >= LIVELOCK_EXITS:
                self.machine.fail(
                    f"dirty ring livelock on vCPU {vcpu.index}: {LIVELOCK_EXITS} ring-full exits "
                    f"in a row with nothing to harvest ({self.entries}-entry ring); use a larger "
                    "--dirty-ring or bitmap mode"
                )
                return
        if self.on_ring_full is not None:
            self.on_ring_full(vcpu)

    @property
    def ring_full_exits(self) -> int:
        """KVM_EXIT_DIRTY_RING_FULL exits so far, all vCPUs."""
        return sum(self._ring_full_exits)

    def vcpu_dirty_pages(self) -> list[int]:
        return list(self._harvested)
