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
  (`reaper=False` holds it back, for experiments and the probe). While a dirty
  limit is in service on a reliable host it does nothing, as QEMU's (below);
- per-vCPU counts are QEMU's: the entries the rings QEMU would have held
  (ring_model.RingModel), reaped by QEMU's rules: at a ring-full (that vCPU's
  ring while a dirty limit is in service, all of them otherwise), at every sync,
  and once a second by QEMU's reaper, which skips while a limit is in service.
  The counted ring is the real one where ring-full loses nothing; where it may
  (`lossy=True`) it is a virtual ring of `counted_entries` (the dirty limit
  sets it), and a virtual ring-full is reported through `on_counted_full`;
- a harvest that finds a ring at or past its soft limit is normal (a ring-full
  harvest takes at least the soft limit). Only where the quirk says this host
  loses entries at ring-full (`lossy=True`) is the whole guest then marked
  dirty for that round, logged once per event;
- KVM_EXIT_DIRTY_RING_FULL is handled on the vCPU's thread (reap as QEMU does,
  then the dirty-limit hook); LIVELOCK_EXITS of them in a row that harvest
  nothing end the VM with an error naming the ring size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from pyvmm.dirty.ring_model import RingModel
from pyvmm.dirty.scan import block_summary_words, clear_blocks, harvest_ring, take_and_clear
from pyvmm.dirty.tracker import ALL_ONES, DirtyTracker, set_every_page
from pyvmm.kvm import abi
from pyvmm.machine.machine import Machine
from pyvmm.machine.vcpu import Vcpu

log = logging.getLogger(__name__)

REAP_CHECK_INTERVAL_S = 0.005  # how often the reaper looks at each ring's fill level
REAP_MAX_AGE_S = 0.1  # harvest a ring at least this often
REAP_FILL_FRACTION = 8  # ... and at once when it is 1/8 full
QEMU_REAPER_INTERVAL_S = 1.0  # kvm_dirty_ring_reaper_thread: sleep(1), then reap every ring
VIRTUAL_RING_ENTRIES = 4096  # the counted ring where real ring-full is unsafe, until set
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
        # Raw ring entries taken, per vCPU. They are not QEMU's count: pyvmm harvests (and so
        # re-protects) more often than QEMU reaps, and this host's KVM sometimes pushes the
        # same page twice without a reset in between. The counts are the model's.
        self.entries_harvested = [0] * len(machine.vcpus)
        # The rings QEMU would have: the real ones, or virtual ones where ring-full is unsafe.
        self.model = RingModel(
            len(machine.vcpus),
            [r.pages for r in self.memory.regions],
            VIRTUAL_RING_ENTRIES if lossy else self.entries,
        )
        # QEMU's dirtylimit_in_service(), set by the dirty limit: QEMU's reaper then idles and
        # a ring-full reaps only the ring that filled.
        self.limit_in_service = False
        self._empty_full_exits = [0] * len(machine.vcpus)
        self._ring_locks = [threading.Lock() for _ in machine.vcpus]
        self._acc = self.new_bitmaps()  # harvested since the last sync
        # Block summaries (scan.py): where _acc and the last sync's report may hold bits,
        # so that a sync costs what was harvested, not the size of the guest.
        self._acc_blocks = self.new_block_summaries()
        self._sync_blocks = self.new_block_summaries()
        self._acc_lock = threading.Lock()
        self._slot_pages = np.array([r.pages for r in self.memory.regions], np.uint64)
        self._ring_full_exits = [0] * len(machine.vcpus)  # each written by its vCPU only
        self.full_harvests = 0  # harvests that found a ring at or past its soft limit
        self.resends = 0  # ... that marked the whole guest dirty (lossy hosts only)
        self.largest_harvest = 0  # entries taken by the largest single harvest
        self.reaper_reaps = 0  # QEMU's once-a-second reap of every ring, done
        self.reaper_skips = 0  # ... skipped because a dirty limit was in service
        self.reaper_harvests = 0  # pyvmm's own harvests from the reaper (keeping rings unfull)
        self.on_ring_full: Callable[[Vcpu], None] | None = None  # the dirty limit's hook
        # Virtual counted rings only: called with (vCPU index, times its ring filled) after a
        # harvest filled that vCPU's virtual ring, outside the ring locks, on the harvesting
        # thread (reaper, sync or ring-full exit). Must be cheap: it runs in the reaper's loop.
        self.on_counted_full: Callable[[int, int], None] | None = None
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._next_qemu_reap = 0.0
        self._last_harvest = [0.0] * len(machine.vcpus)
        for vcpu in machine.vcpus:
            vcpu.on_dirty_ring_full = self._ring_full_exit

    def new_block_summaries(self) -> list[np.ndarray]:
        """Zeroed per-slot block summaries (one bit per BLOCK_PAGES pages)."""
        return [
            np.zeros(block_summary_words(r.bitmap_words()), np.uint64) for r in self.memory.regions
        ]

    # --- the counted rings -------------------------------------------------------------------

    @property
    def virtual(self) -> bool:
        """Whether the counted rings are virtual (this host may lose entries at ring-full)."""
        return self.lossy

    @property
    def counted_entries(self) -> int:
        """The size of the rings QEMU would have: what the counts and penalties are per."""
        return self.model.entries

    def use_virtual_ring(self, entries: int) -> None:
        """Size the virtual counted rings (lossy hosts only; a real ring's size is fixed)."""
        if self.virtual and entries != self.model.entries:
            log.info("dirty ring: virtual counted rings of %d entries", entries)
            self.model.resize(entries)

    # --- logging on/off ----------------------------------------------------------------------

    def _start_logging(self) -> None:
        # Entries pushed before logging started (none, normally) are stale: drop them.
        self._reap_all(discard=True)
        self.model.clear()  # logging write-protects every page
        self.machine.set_dirty_logging(True)
        self._stop.clear()
        if self.reaper:
            self._next_qemu_reap = time.monotonic() + QEMU_REAPER_INTERVAL_S
            self._reaper = threading.Thread(target=self._reap_loop, name="dirty-ring-reaper")
            self._reaper.daemon = True
            self._reaper.start()
        log.info(
            "dirty ring logging on: %d entries per vCPU, reaper %s, ring-full %s, counted "
            "rings %s of %d entries",
            self.entries, "on" if self.reaper else "held back",
            "may lose entries (host quirk)" if self.lossy else "loses nothing",
            "virtual" if self.virtual else "real", self.model.entries,
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
        while not self._stop.wait(self.reaper_interval_s):
            self.reaper_tick(time.monotonic())

    @property
    def reaper_interval_s(self) -> float:
        """The reaper's sleep between wake-ups: on a real ring under a dirty limit only QEMU's
        reaper is left, which sleeps a second at a time."""
        if self.limit_in_service and not self.virtual:
            return QEMU_REAPER_INTERVAL_S
        return REAP_CHECK_INTERVAL_S

    def reaper_tick(self, now: float) -> None:
        """One wake-up of the reaper thread at monotonic time `now` (tests call it directly).

        First QEMU's reaper (kvm_dirty_ring_reaper_thread): once a second, reap every ring,
        unless a dirty limit is in service. Then pyvmm's own harvests, which keep the real
        rings far from full (and, with virtual counted rings, see a virtual ring-full
        promptly); on a real ring they too stop while a limit is in service, so that only
        ring-full exits and syncs reap it, as in QEMU."""
        if now >= self._next_qemu_reap:
            self._next_qemu_reap = now + QEMU_REAPER_INTERVAL_S
            if self.limit_in_service:
                self.reaper_skips += 1  # "keep sleeping so that dirtylimit not be interfered"
            else:
                self._reap_all()
                self.model.reap(None)
                self.reaper_reaps += 1
        if self.limit_in_service and not self.virtual:
            return
        total = 0
        for i in range(len(self.machine.vcpus)):
            if now - self._last_harvest[i] >= REAP_MAX_AGE_S or self._filling(i):
                total += self._reap_one(i)
                self._last_harvest[i] = now
                self.reaper_harvests += 1
        if total:
            self.machine.vm.reset_dirty_rings()

    def _filling(self, index: int) -> bool:
        """Are enough entries waiting to fill an eighth of the real ring, or the rest of the
        virtual counted ring? (a cheap peek at one entry's flags)"""
        ring = self.machine.vcpus[index].fd.ring_mmap
        if ring is None:
            return False
        ahead = self.entries // REAP_FILL_FRACTION
        if self.virtual:
            ahead = min(ahead, self.model.remaining(index))
        pos = (self._fetch[index] + max(ahead - 1, 0)) % self.entries * 16
        return bool(ring[pos] & abi.KVM_DIRTY_GFN_F_DIRTY)

    def _reap_one(self, index: int, *, count: bool = True) -> int:
        """Harvest one vCPU's ring into the accumulator and the counted rings; returns entries
        harvested. The caller issues KVM_RESET_DIRTY_RINGS afterwards."""
        ring = self.machine.vcpus[index].fd.ring_mmap
        if ring is None:
            return 0
        fulls = 0
        with self._ring_locks[index], self._acc_lock:
            first = self._fetch[index]
            fetch, harvested, invalid = harvest_ring(
                ring, self.entries, first, self._acc, self._slot_pages, None, self._acc_blocks
            )
            self._fetch[index] = fetch
            self.entries_harvested[index] += harvested
            self.largest_harvest = max(self.largest_harvest, harvested)
            if count and harvested:
                # Slot and offset stay valid until the reset: what QEMU's rings would hold.
                fulls = self.model.push_ring(
                    index, ring, self.entries, first, harvested,
                    reap_all_on_full=not self.limit_in_service,
                )  # fmt: skip
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
        hook = self.on_counted_full
        if fulls and self.virtual and hook is not None:
            hook(index, fulls)
        return harvested

    def _reap_all(self, discard: bool = False) -> int:
        total = sum(self._reap_one(i, count=not discard) for i in range(len(self.machine.vcpus)))
        if total:
            self.machine.vm.reset_dirty_rings()
        if discard:
            with self._acc_lock:
                for acc, blocks in zip(self._acc, self._acc_blocks, strict=True):
                    acc.fill(0)
                    blocks.fill(0)
        return total

    def _harvest(self, into: list[np.ndarray]) -> None:
        # A sync: QEMU's kvm_dirty_ring_flush reaps every ring.
        self._reap_all()
        self.model.reap(None)
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
        """KVM_EXIT_DIRTY_RING_FULL on the vCPU's own thread.

        A real counted ring: QEMU's kvm_cpu_exec, reap this vCPU's ring while a dirty limit
        is in service (so that other vCPUs cannot dodge their sleep), every ring otherwise;
        then the hook (dirtylimit_vcpu_execute). A virtual one: harvest this ring, which
        counts any virtual ring-full it completes, then the hook."""
        self._ring_full_exits[vcpu.index] += 1
        if self.virtual or self.limit_in_service:
            got = self._reap_one(vcpu.index)
            if got:
                self.machine.vm.reset_dirty_rings()
            if not self.virtual:
                self.model.reap(vcpu.index)
        else:
            got = self._reap_all()
            self.model.reap(None)
        if got:
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
        """Per vCPU, cumulative: the entries QEMU's rings would have held, counted when
        reaped (QEMU's cpu->dirty_pages)."""
        return self.model.dirty_pages()
