"""Pre-copy: send dirty pages while the guest runs, pass after pass, until what is left
fits in the downtime limit. QEMU's migration_thread and migration_iteration_run, restated
(docs/migration.md explains each rule):

- each loop: if the dirty bytes are at most threshold = bandwidth x downtime-limit,
  sync to get the exact figure and, if still below, pre-copy is done; otherwise send
  dirty pages for up to 50 ms or until this 100 ms window's byte budget
  (max-bandwidth / 10) is spent, then sleep to the window's end;
- every >= 100 ms: bandwidth, mbps, pages-per-second, expected downtime;
- a sync >= 1 s after the period start computes dirty-pages-rate and hands the closed
  period to the convergence policies (auto-converge, the dirty limit, ...);
- after every step it sends while the guest runs, the policies' optional on_send_step
  hook (QEMU 1.6 drove its 2013 throttle from that place).

With `timeline` set (docs/timeline.md) the loop records its send windows, rate-limit
waits and syncs as spans on the migration thread's track, and remaining bytes,
bandwidth, dirty rate and throttle as counters; with `heatmap` set each sync adds a row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.dirty.heatmap import Heatmap
from pyvmm.machine.memory import PAGE_SIZE
from pyvmm.migration.clock import Clock
from pyvmm.migration.dirtypages import STEP_PAGES, DirtyPages
from pyvmm.migration.pagewriter import PageWriter
from pyvmm.migration.params import MigrationSettings
from pyvmm.migration.policy import (
    SYNC_BACKGROUND,
    SYNC_ITERATION,
    ConvergencePolicy,
    PeriodStats,
    PolicyHost,
)
from pyvmm.migration.stats import MigrationStats
from pyvmm.migration.stream import StreamWriter
from pyvmm.timeline import Timeline, monotonic_us

log = logging.getLogger(__name__)

WINDOW_MS = 100.0  # QEMU's BUFFER_DELAY
MAX_ITERATE_MS = 50.0  # QEMU's MAX_WAIT
RATE_PERIOD_MS = 1000.0
HOOKED_STEP_PAGES = 512  # pages per step when a policy watches every step (2 MiB)
MIGRATION_THREAD = "live_migration"  # the thread's name (MigrationSource starts it)
MIB = 1 << 20


class MigrationCancelled(Exception):
    pass


def migration_track(tl: Timeline) -> int:
    """The migration thread's track (the caller must be that thread)."""
    return tl.thread_track("migration thread", sort_index=100)


class Precopy:
    def __init__(
        self,
        pages: DirtyPages,
        page_writer: PageWriter,
        writer: StreamWriter,
        stats: MigrationStats,
        settings: MigrationSettings,
        clock: Clock,
        cancel: threading.Event,
        policies: list[ConvergencePolicy],
        host: PolicyHost,
        emit_event: Callable[[str, dict[str, Any] | None], None],
    ) -> None:
        self.pages = pages
        self.page_writer = page_writer
        self.writer = writer
        self.stats = stats
        self.settings = settings
        self.clock = clock
        self.cancel = cancel
        self.policies = policies
        self._step_hooks: list[Callable[[float], None]] = [
            hook for p in policies if (hook := getattr(p, "on_send_step", None)) is not None
        ]
        self.host = host
        self._emit = emit_event
        # The bitmap: the send loop vs. syncs forced from other threads (policies).
        self.lock = threading.RLock()
        self.header_sent = False  # ITERATION records go out only once HEADER has
        self.bandwidth_bytes_per_ms = 0.0
        now = clock.now_ms()
        self._window_start_ms = now
        self._window_start_bytes = 0
        self._window_start_pages = 0
        self._window_budget_used = 0.0
        self._period_start_ms = now
        self._period_dirty_pages = 0
        self._period_start_bytes = 0
        self.remaining_at_sync_bytes = 0
        self.timeline: Timeline | None = None  # recording on: spans and counters
        self.heatmap: Heatmap | None = None  # recording heatmaps: one row per sync

    def start_periods(self) -> None:
        """The first period and window start when the stream is set up."""
        now = self.clock.now_ms()
        self._window_start_ms = self._period_start_ms = now

    @property
    def period_start_ms(self) -> float:
        """When the current dirty-rate period began (QEMU's rs->time_last_bitmap_sync)."""
        return self._period_start_ms

    # --- syncs --------------------------------------------------------------------------------

    def sync(self, kind: str = SYNC_ITERATION) -> None:
        """One dirty-log sync: QEMU's migration_bitmap_sync.

        As in QEMU, the period counts pages that became dirty in the migration bitmap (a
        page still waiting to be sent counts once), so the all-dirty setup sync adds 0.
        Every sync counts in dirty-sync-count; only the loop's own (SYNC_ITERATION) in
        iteration-count. A background sync (SYNC_BACKGROUND, the 2024 RFC and v1) does not
        queue what it finds (DirtyPages.sync), sends no ITERATION record and emits no
        MIGRATION_PASS, as in those patches."""
        tl = self.timeline
        t0_us = tl.now_us() if tl is not None else 0.0
        with self.lock:
            background = kind == SYNC_BACKGROUND
            newly_dirty = self.pages.sync(background)
            heatmap = self.heatmap
            if heatmap is not None:
                heatmap.record(self.pages.bitmaps, self.stats.ram.dirty_sync_count + 1,
                               monotonic_us(), newly_dirty)  # fmt: skip
            ram = self.stats.ram
            ram.dirty_sync_count += 1
            if kind == SYNC_ITERATION:
                ram.iteration_count += 1
            self._period_dirty_pages += newly_dirty
            self.remaining_at_sync_bytes = self.pages.remaining_bytes()
            now = self.clock.now_ms()
            period = None
            elapsed = now - self._period_start_ms
            if ram.dirty_sync_count > 1 and elapsed > RATE_PERIOD_MS:
                transferred = self.writer.bytes_sent
                period = PeriodStats(
                    elapsed, self._period_dirty_pages, transferred - self._period_start_bytes,
                    ram.dirty_sync_count, ram.dirty_pages_rate, kind,
                )  # fmt: skip
                ram.dirty_pages_rate = int(self._period_dirty_pages * 1000 / elapsed)
                self._period_start_ms = now
                self._period_dirty_pages = 0
                self._period_start_bytes = transferred
            for policy in self.policies:
                policy.on_sync(self.host, period)
            if background:
                return
            if self.header_sent:
                self.writer.iteration(ram.dirty_sync_count)  # the destination counts passes
                self.page_writer.sync_point()  # multifd: a sync point on every channel
            if self.settings.caps.get("events"):
                # With background syncs the patches number passes by iteration-count.
                held = self.pages.held is not None
                number = ram.iteration_count if held else ram.dirty_sync_count
                self._emit("MIGRATION_PASS", {"pass": number})
            if tl is not None:
                self._record_sync(tl, t0_us, newly_dirty, period)

    def _record_sync(
        self, tl: Timeline, t0_us: float, newly_dirty: int, period: PeriodStats | None
    ) -> None:
        ram = self.stats.ram
        now = tl.now_us()
        args = {"sync": ram.dirty_sync_count, "new_pages": newly_dirty,
                "remaining_bytes": self.remaining_at_sync_bytes}  # fmt: skip
        if period is not None:
            args.update(period_ms=round(period.elapsed_ms), period_dirty_pages=period.dirty_pages,
                        period_sent_bytes=period.bytes_transferred)  # fmt: skip
        track = migration_track(tl) if self._on_migration_thread() else tl.thread_track()
        tl.complete("dirty sync", t0_us, now - t0_us, track, cat="migration", args=args)
        tl.counter("remaining (MiB)", {"remaining": self.remaining_at_sync_bytes / MIB}, now)
        if period is not None:
            rate = ram.dirty_pages_rate
            tl.counter("dirty rate (MiB/s)", {"dirty rate": rate * PAGE_SIZE / MIB}, now)
        pct = self.stats.extra.get("cpu-throttle-percentage", 0)
        tl.counter("throttle (%)", {"throttle": pct if isinstance(pct, int) else 0}, now)

    def _on_migration_thread(self) -> bool:
        return threading.current_thread().name == MIGRATION_THREAD

    # --- the loop -----------------------------------------------------------------------------

    def threshold_bytes(self) -> float:
        """What may be left for the switchover: bandwidth x downtime-limit."""
        avail = self.settings["avail-switchover-bandwidth"]
        bw = avail / 1000 if avail else self.bandwidth_bytes_per_ms
        return bw * self.settings["downtime-limit"]

    def converged(self, pending_bytes: int) -> bool:
        """QEMU's switchover rule (up to 10.0): nothing pending, or strictly below.

        pyvmm adds one condition, which x-switchover-during-bulk turns off: not before
        every page has been sent once. Pages still in their first pass land on the
        destination in memory it has never touched, whose first write may cost far more
        than the rate measured so far (docs/migration.md, "Downtime against its limit")."""
        if pending_bytes == 0:
            return True
        if not self._bulk_rule_met():
            return False
        return pending_bytes < self.threshold_bytes()

    def _bulk_rule_met(self) -> bool:
        """pyvmm's extra condition: every page sent once, or x-switchover-during-bulk."""
        return self.pages.bulk_done or bool(self.settings["x-switchover-during-bulk"])

    def _may_switch_over(self) -> bool:
        """converged(remaining), without counting a bitmap that cannot pass: before every
        page has been sent once only an empty one can, which none_left finds at the cost
        of one word in the first pass (the loop turns every 50 ms at most, and a 1 TiB
        simulation spent half its time counting)."""
        if self._bulk_rule_met():
            return self.converged(self.pages.remaining_bytes())
        return self.pages.none_left()

    def run(self) -> None:
        """Iterate until the dirty bytes left fit in the downtime limit."""
        while True:
            self.check_cancel()
            if self._may_switch_over():
                self.sync()  # the exact figure
                if self.converged(self.pages.remaining_bytes()):
                    return
            tl = self.timeline
            if tl is None:
                self.send(self.clock.now_ms() + MAX_ITERATE_MS, limited=True)
            else:
                t0_us, sent0 = tl.now_us(), self.writer.bytes_sent
                self.send(self.clock.now_ms() + MAX_ITERATE_MS, limited=True)
                tl.complete("send window", t0_us, tl.now_us() - t0_us,
                            migration_track(tl), cat="migration",
                            args={"bytes": self.writer.bytes_sent - sent0})  # fmt: skip
            self._rate_limit()

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MigrationCancelled

    def send(self, deadline_ms: float, limited: bool) -> bool:
        """Send dirty pages from the cursor on; True when a whole lap found nothing left."""
        budget = self.settings["max-bandwidth"] / 10 if limited else 0
        hooks = self._step_hooks if limited else ()  # the live phase only, not the downtime
        # A per-step hook (the 2013 throttle's clock) wants small steps: QEMU 1.6 looked at
        # its clock after every page; 2 MiB is a few ms on any link.
        largest = HOOKED_STEP_PAGES if hooks else STEP_PAGES
        walked = 0
        while walked < self.pages.total_words:
            step_pages = largest
            if budget:  # never overshoot a small budget by a whole step
                left = budget - self._window_budget_used
                step_pages = max(1, min(largest, int(left // PAGE_SIZE)))
            with self.lock:
                taken = self.pages.take(step_pages)
                if taken is None:
                    return True
                sent = self.page_writer.send(taken)
            walked += taken.words
            self.check_cancel()
            now = self.clock.now_ms()
            for hook in hooks:
                hook(now)
            if budget:
                self._window_budget_used += sent
                if self._window_budget_used >= budget:
                    return False
            if now >= deadline_ms:
                return False
        return True

    def _rate_limit(self) -> None:
        """Close the 100 ms window: update the counters, sleep out an exhausted budget."""
        now = self.clock.now_ms()
        budget = self.settings["max-bandwidth"] / 10
        if budget and self._window_budget_used >= budget:
            remaining_ms = self._window_start_ms + WINDOW_MS - now
            if remaining_ms > 0:
                tl = self.timeline
                t0_us = tl.now_us() if tl is not None else 0.0
                if self.clock.wait(self.cancel, remaining_ms / 1000):
                    raise MigrationCancelled
                if tl is not None:
                    tl.complete("rate-limit wait", t0_us, tl.now_us() - t0_us,
                                migration_track(tl), cat="migration")  # fmt: skip
            now = self.clock.now_ms()
        if now - self._window_start_ms >= WINDOW_MS:
            self._update_counters(now)

    def _update_counters(self, now: float) -> None:
        """QEMU's migration_update_counters, once per >= 100 ms window."""
        elapsed = now - self._window_start_ms
        transferred = self.writer.bytes_sent - self._window_start_bytes
        ram = self.stats.ram
        self.bandwidth_bytes_per_ms = transferred / elapsed if elapsed > 0 else 0.0
        ram.mbps = transferred * 8 / (elapsed / 1000) / 1e6 if elapsed > 0 else 0.0
        sent_pages = ram.normal + ram.duplicate
        ram.pages_per_second = int((sent_pages - self._window_start_pages) * 1000 / elapsed)
        expected_bw = self.threshold_bytes() / max(self.settings["downtime-limit"], 1)
        if ram.dirty_pages_rate and transferred > 10000 and expected_bw > 0:
            self.stats.expected_downtime_ms = self.remaining_at_sync_bytes / expected_bw
        tl = self.timeline
        if tl is not None:
            t_us = tl.now_us()
            tl.counter("bandwidth (Mbit/s)", {"bandwidth": ram.mbps}, t_us)
            tl.counter("remaining (MiB)", {"remaining": self.pages.remaining_bytes() / MIB}, t_us)
        self._window_start_ms = now
        self._window_start_bytes = self.writer.bytes_sent
        self._window_start_pages = sent_pages
        # A window may end a little over budget (whole 64-page words are sent): carry it.
        budget = self.settings["max-bandwidth"] / 10
        self._window_budget_used = max(0.0, self._window_budget_used - budget) if budget else 0
