"""The modelled guest: vCPUs that rewrite their working sets, and the dirty log they feed.

Each vCPU does what memstress and guestperf's stress.c do: it walks its own working set
(vCPU i owns pages [i x ws, (i + 1) x ws)) from a cursor, page after page, wrapping
around, at `rate` pages per ms of the time it runs. Throttle sleeps take time away from
it exactly as the real ones do: a sleep queued on a vCPU (Vcpu.run_on_thread + sleep_us,
what CpuThrottle and LegacyThrottle call) starts when the vCPU is kicked (at once) or when
its previous sleep ends, and the vCPU writes nothing while it lasts, nor for its wake lag
after it (`lag_ms(sleep)`, measured by `pyvmm sim calibrate`: on this host a vCPU back
from a long sleep takes a few milliseconds to get going; docs/sim.md).

Writes are accounted lazily and as ranges: `advance_to(t)` turns each vCPU's running time
since the previous call into one or two page ranges (at most its whole working set) and
sets them in the dirty log, a numpy bitmap of one bit per page. So the cost of a second of
guest time does not depend on how many pages it wrote, and 1 TiB is 32 MiB of log.

The log behaves as KVM's dirty bitmap with manual protection, the way QEMU uses it: a sync
(SimDirtyView.sync) hands what was logged to the migration's bitmap and empties the log;
a chunk of 2^18 pages (1 GiB, QEMU's clear-bitmap-shift 18) has its log bits cleared the
first time the migration copies pages from it after a sync (before_copy, QEMU's
migration_clear_memory_region_dirty_bitmap), so a page written between the sync and its
copy is sent once, not twice. That is the only place the order of writes and copies
within a sync period matters, so the guest is brought up to date there and at syncs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pyvmm.dirty.scan import or_new_into
from pyvmm.machine.vcpu import VcpuRunState
from pyvmm.migration.clock import VirtualClock

PAGE_SIZE = 4096
CLEAR_CHUNK_SHIFT = 18  # pages per log clear: QEMU's clear_bitmap_shift default (1 GiB)
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def words_for(pages: int) -> int:
    return (pages + 63) // 64


def set_range(bitmap: np.ndarray, first: int, end: int) -> None:
    """Set the bits of pages [first, end) in a uint64 bitmap (whole words by slicing)."""
    if first >= end:
        return
    w0, w1 = first >> 6, (end - 1) >> 6
    lo = (0xFFFFFFFFFFFFFFFF << (first & 63)) & 0xFFFFFFFFFFFFFFFF
    hi = 0xFFFFFFFFFFFFFFFF >> (63 - ((end - 1) & 63))
    if w0 == w1:
        bitmap[w0] |= np.uint64(lo & hi)
        return
    bitmap[w0] |= np.uint64(lo)
    bitmap[w0 + 1 : w1] = ALL_ONES
    bitmap[w1] |= np.uint64(hi)


def all_set(pages: int) -> np.ndarray:
    bitmap = np.zeros(words_for(pages), np.uint64)
    set_range(bitmap, 0, pages)
    return bitmap


class SimVcpu:
    """What the policies reach of a vCPU (pyvmm.machine.vcpu.Vcpu's surface they use)."""

    state = VcpuRunState.RUNNING

    def __init__(self, guest: GuestModel, index: int) -> None:
        self.guest = guest
        self.index = index

    def run_on_thread(self, fn: Callable[[Any], None]) -> None:
        """Kicked out of the guest at once; fn runs on "its thread" now."""
        fn(self)

    def sleep_us(self, microseconds: int) -> int:
        """Queue the sleep; returns it (the dirty limit counts what was slept)."""
        self.guest.sleep(self.index, microseconds / 1000)
        return microseconds

    def wake(self) -> None:
        self.guest.wake(self.index)

    def kick(self) -> None:
        self.guest.wake(self.index)


class SimMachine:
    def __init__(self, guest: GuestModel) -> None:
        self.vcpus = [SimVcpu(guest, i) for i in range(guest.cpus)]


class GuestModel:
    def __init__(
        self,
        clock: VirtualClock,
        total_pages: int,
        cpus: int,
        ws_pages: int,
        rates_pages_per_ms: np.ndarray,
        start_offsets: np.ndarray,
        lag_ms: Callable[[float], float] = lambda _sleep_ms: 0.0,
    ) -> None:
        if cpus * ws_pages > total_pages:
            raise ValueError("the working sets do not fit in guest RAM")
        self.clock = clock
        self.total_pages = total_pages
        self.cpus = cpus
        self.ws_pages = ws_pages
        self.rate = np.asarray(rates_pages_per_ms, np.float64)
        self.lag_ms = lag_ms
        self.start = np.asarray(start_offsets, np.float64).copy()  # each cursor's phase
        self.written = self.start.copy()  # the cursors: pages written, cumulative
        self.slept_ms = np.zeros(cpus)  # every sleep queued so far, in total
        self.sleep_end_ms = np.full(cpus, clock.now_ms())
        self._slept_at_last = np.zeros(cpus)  # slept time up to last_ms
        self.last_ms = clock.now_ms()
        self.log = np.zeros(words_for(total_pages), np.uint64)  # the "KVM" dirty log
        self.stopped = False
        self.stopped_at_ms = 0.0
        self.sleeps = 0
        # Dirty rings (rings.py): entries per vCPU since its ring was last reset, and in
        # all; `ring_full` is called at the instant a ring fills while it is set.
        self.ring_entries = 0
        self.entries = np.zeros(cpus)
        self.entries_total = np.zeros(cpus)
        self.ring_full: Callable[[int], None] | None = None
        self._at: float | None = None  # "now" for sleeps queued by a ring-full

    @property
    def nonzero_pages(self) -> int:
        """Pages [0, this) hold data (the working sets); the rest were never written."""
        return self.cpus * self.ws_pages

    # --- vCPU time --------------------------------------------------------------------------

    def sleep(self, index: int, ms: float) -> None:
        """A sleep queued on vCPU `index` now: it starts now or when its last one ends, and
        the vCPU writes again its wake lag after it ends."""
        now = self.clock.now_ms() if self._at is None else self._at
        start = max(now, float(self.sleep_end_ms[index]))
        ms += self.lag_ms(ms)
        self.sleep_end_ms[index] = start + ms
        self.slept_ms[index] += ms
        self.sleeps += 1

    def wake(self, index: int) -> None:
        """A kick ends the sleep in progress (and those queued after it)."""
        now = self.clock.now_ms()
        over = float(self.sleep_end_ms[index]) - now
        if over > 0:
            self.slept_ms[index] -= over
            self.sleep_end_ms[index] = now

    def stop(self) -> None:
        """The switchover's stop: what was written until now is logged, then nothing."""
        self.advance_to(self.clock.now_ms())
        self.stopped = True
        self.stopped_at_ms = self.clock.now_ms()

    def running_ms(self) -> list[float]:
        """Each vCPU's time in the guest so far (its CPU time: sleeps excluded)."""
        now = self.stopped_at_ms if self.stopped else self.clock.now_ms()
        slept = self.slept_ms - np.maximum(self.sleep_end_ms - now, 0.0)
        return [max(0.0, now - float(x)) for x in slept]

    def written_mib(self) -> list[float]:
        """MiB each vCPU has written since the model started (memstress's progress)."""
        self.advance_to(self.clock.now_ms())
        return [float(w) * PAGE_SIZE / (1 << 20) for w in self.written - self.start]

    # --- writes -----------------------------------------------------------------------------

    def reset_rings(self) -> None:
        """A harvest of every ring (any sync in ring mode): each starts empty again."""
        self.entries.fill(0)

    def advance_to(self, t: float) -> None:
        """Log every page the vCPUs wrote from last_ms to t; with a ring-full hook set, stop
        at each instant a vCPU's ring fills, reset that ring and call the hook there (the
        KVM_EXIT_DIRTY_RING_FULL exit), so that a penalty it queues starts at that instant.
        Every write is a new ring entry: the working sets are larger than the rings."""
        if t <= self.last_ms:
            return
        if self.stopped:
            self.last_ms = t
            return
        hook, n = self.ring_full, self.ring_entries
        while hook is not None and n:
            start = np.maximum(self.sleep_end_ms, self.last_ms)
            with np.errstate(divide="ignore"):
                fill = start + (n - self.entries) / self.rate
            index = int(np.argmin(fill))
            at = float(fill[index])
            if at > t:
                break
            self._advance(max(at, self.last_ms))
            for full in np.flatnonzero(self.entries >= n - 1e-6):
                self.entries[full] = 0  # the exit reaps this vCPU's ring
                self._at = at
                try:
                    hook(int(full))
                finally:
                    self._at = None
            hook = self.ring_full
        self._advance(t)

    def _advance(self, t: float) -> None:
        if t <= self.last_ms:
            return
        slept_now = self.slept_ms - np.maximum(self.sleep_end_ms - t, 0.0)
        ran = np.maximum((t - self.last_ms) - (slept_now - self._slept_at_last), 0.0)
        before = np.floor(self.written).astype(np.int64)
        pages = ran * self.rate
        self.written += pages
        self.entries += pages
        self.entries_total += pages
        after = np.floor(self.written).astype(np.int64)
        self._slept_at_last = slept_now
        self.last_ms = t
        ws = self.ws_pages
        for index in np.flatnonzero(after > before):
            base = int(index) * ws
            n = int(after[index] - before[index])
            if n >= ws:
                set_range(self.log, base, base + ws)
                continue
            start = int(before[index]) % ws
            end = start + n
            if end <= ws:
                set_range(self.log, base + start, base + end)
            else:
                set_range(self.log, base + start, base + ws)
                set_range(self.log, base, base + end - ws)


class SimDirtyView:
    """The migration's dirty view (DirtyPages's `view`) over the modelled guest: one slot,
    every page dirty at the start."""

    def __init__(self, guest: GuestModel) -> None:
        self.guest = guest
        self.bitmaps = [all_set(guest.total_pages)]
        self.lock = threading.RLock()
        self.syncs = 0
        self._cleared: set[int] = set()
        self.on_sync: Callable[[], None] | None = None  # the engine charges a sync's cost

    def sync(self) -> int:
        guest = self.guest
        guest.advance_to(guest.clock.now_ms())
        with self.lock:
            self.syncs += 1
            new = or_new_into(self.bitmaps[0], guest.log)
            guest.log.fill(0)
            guest.reset_rings()
            self._cleared.clear()
            if self.on_sync is not None:
                self.on_sync()
            return new

    def before_copy(self, slot: int, first_page: int, npages: int) -> None:
        """Clear the log of each 1 GiB chunk on its first copy after a sync."""
        first = first_page >> CLEAR_CHUNK_SHIFT
        last = (first_page + npages - 1) >> CLEAR_CHUNK_SHIFT
        for chunk in range(first, last + 1):
            if chunk in self._cleared:
                continue
            self._cleared.add(chunk)
            guest = self.guest
            guest.advance_to(guest.clock.now_ms())
            words = 1 << (CLEAR_CHUNK_SHIFT - 6)
            guest.log[chunk * words : (chunk + 1) * words] = 0
