"""A deterministic migration for the convergence tests: pyvmm's real Precopy, DirtyPages,
policies and sync generations, on a VirtualClock, with a model guest and a model link.

What is modelled: the guest (FakeView: the pages it dirtied since the last sync, chosen by
the test), the wire (FakeWriter/FakePageWriter: sending N bytes moves the clock on by
N / link speed) and the vCPUs (FakeVcpu: queued work items and the sleeps they asked
for). Everything else is the code that runs in a real migration.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pyvmm.dirty.ranges import RangeTable
from pyvmm.dirty.scan import count_set
from pyvmm.migration.clock import VirtualClock
from pyvmm.migration.dirtypages import DirtyPages
from pyvmm.migration.params import MigrationSettings
from pyvmm.migration.policy import SYNC_FORCED, ConvergencePolicy
from pyvmm.migration.precopy import Precopy
from pyvmm.migration.stats import ACTIVE_STATES, MigrationStats

PAGE = 4096
MIB = 1 << 20


class FakeVcpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.queued: list[Callable[[Any], None]] = []
        self.slept_us: list[int] = []
        self.woken = 0

    def run_on_thread(self, fn: Callable[[Any], None]) -> None:
        self.queued.append(fn)

    def run_pending(self) -> None:
        """The vCPU reaches its exit path: it runs what was queued, in order."""
        while self.queued:
            self.queued.pop(0)(self)

    def sleep_us(self, microseconds: int) -> None:
        self.slept_us.append(microseconds)

    def wake(self) -> None:
        self.woken += 1


class FakeMachine:
    def __init__(self, vcpus: int) -> None:
        self.vcpus = [FakeVcpu(i) for i in range(vcpus)]


class FakeView:
    """The migration's dirty view over one slot; `guest` says which pages the guest
    dirtied since the previous sync (called at every sync)."""

    def __init__(self, pages: int, guest: Callable[[], np.ndarray]) -> None:
        words = (pages + 63) // 64
        bitmap = np.full(words, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
        if pages % 64:
            bitmap[-1] = np.uint64((1 << (pages % 64)) - 1)
        self.bitmaps = [bitmap]
        self.lock = threading.RLock()
        self.guest = guest
        self.syncs = 0

    def sync(self) -> int:
        with self.lock:
            self.syncs += 1
            bitmap = self.bitmaps[0]
            before = count_set(bitmap)
            pages = np.asarray(self.guest(), dtype=np.uint64)
            if len(pages):
                bits = np.left_shift(np.uint64(1), pages % np.uint64(64))
                np.bitwise_or.at(bitmap, (pages // np.uint64(64)).astype(np.intp), bits)
            return count_set(bitmap) - before

    def before_copy(self, slot: int, first_page: int, npages: int) -> None:
        pass


class FakeWriter:
    def __init__(self) -> None:
        self.bytes_sent = 0
        self.iterations: list[int] = []

    def iteration(self, number: int) -> None:
        self.iterations.append(number)


class FakePageWriter:
    """Sending takes time: bytes / link_bytes_per_ms on the virtual clock."""

    def __init__(self, writer: FakeWriter, clock: VirtualClock, link_bytes_per_ms: float) -> None:
        self.writer = writer
        self.clock = clock
        self.link_bytes_per_ms = link_bytes_per_ms
        self.in_downtime = False
        self.pages_sent = 0

    def send(self, table: RangeTable) -> int:
        sent = table.pages * PAGE
        self.writer.bytes_sent += sent
        self.pages_sent += table.pages
        self.clock.advance(sent / self.link_bytes_per_ms)
        return sent

    def sync_point(self) -> None:  # one connection: nothing to drain (see PageWriter)
        pass

    def finish(self) -> None:
        pass


class SimMigration:
    """A PolicyHost around a real Precopy."""

    def __init__(
        self,
        pages: int,
        guest: Callable[[], np.ndarray],
        settings: MigrationSettings | None = None,
        policies: list[ConvergencePolicy] | None = None,
        link_mib_s: float = 1024.0,
        vcpus: int = 2,
    ) -> None:
        self.clock = VirtualClock(1_000_000.0)
        self.settings = settings or MigrationSettings()
        self.stats = MigrationStats(status="setup")
        self.machine = FakeMachine(vcpus)
        self.view = FakeView(pages, guest)
        self.writer = FakeWriter()
        self.page_writer = FakePageWriter(self.writer, self.clock, link_mib_s * MIB / 1000)
        self.events: list[tuple[str, dict[str, Any] | None]] = []
        self.cancel = threading.Event()
        self.policies = policies or []
        self.precopy = Precopy(
            DirtyPages(self.view),  # type: ignore[arg-type]
            self.page_writer,  # type: ignore[arg-type]
            self.writer,  # type: ignore[arg-type]
            self.stats,
            self.settings,
            self.clock,
            self.cancel,
            self.policies,
            self,  # type: ignore[arg-type]
            lambda name, data: self.events.append((name, data)),
        )
        self.forced: list[str] = []

    # --- PolicyHost --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.stats.status in ACTIVE_STATES

    @property
    def in_downtime(self) -> bool:
        return False

    @property
    def period_start_ms(self) -> float:
        return self.precopy.period_start_ms

    def force_sync(self, kind: str = SYNC_FORCED) -> bool:
        if self.stats.status != "active":
            return False
        self.forced.append(kind)
        self.precopy.sync(kind)
        return True

    # --- driving it --------------------------------------------------------------------------

    def setup(self) -> None:
        """MigrationSource._setup's order: setup sync, HEADER, on_setup, periods, active."""
        self.precopy.sync()
        self.precopy.header_sent = True
        for policy in self.policies:
            policy.on_setup(self)  # type: ignore[arg-type]
        self.precopy.start_periods()
        self.stats.status = "active"

    def run_for(self, ms: float, on_turn: Callable[[], None] | None = None) -> None:
        """Precopy.run's loop (check, send for <= 50 ms, rate limit) for ms of virtual time,
        without switching over; on_turn runs after each turn (the vCPUs' exits)."""
        end = self.clock.now_ms() + ms
        while self.clock.now_ms() < end:
            if self.precopy.converged(self.precopy.pages.remaining_bytes()):
                self.precopy.sync()
            self.precopy.send(self.clock.now_ms() + 50.0, limited=True)
            self.precopy._rate_limit()
            if on_turn is not None:
                on_turn()

    def end(self) -> None:
        self.stats.status = "completed"
        for policy in self.policies:
            policy.on_end(self)  # type: ignore[arg-type]


def everything(pages: int) -> Callable[[], np.ndarray]:
    """A guest that rewrites all its pages between any two syncs (memstress flat out)."""
    all_pages = np.arange(pages)
    return lambda: all_pages
