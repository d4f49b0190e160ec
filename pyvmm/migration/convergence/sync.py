"""Extra dirty syncs for auto-converge: every generation of "sync more often than once per
pass", each as its own patches wrote it. Without them a sync, and so a throttle decision,
comes only when a pass over RAM ends, and on a large guest a pass takes minutes.

- DirtySyncTimer: QEMU 9.2, migration/cpu-throttle.c cpu_throttle_dirty_sync_timer_tick
  ("migration: Support periodic RAMBlock dirty bitmap sync", merged for 9.2). Every 5 s;
  if the sync count is above 1 and has not moved since the previous tick, an ordinary
  sync (its pages are queued). `x-auto-converge-sync=timer`, the default.
- BackgroundSyncWatcher: the 2024 series' v1 ("migration: Implment background sync
  watcher", v1 4/7, 16 Sep 2024). Polls every second; once iteration-count is above 1 and
  has not moved since the previous poll, and more than 5 s have passed since the last
  period began (rs->time_last_bitmap_sync), a background sync. It ends when the throttle
  reaches max-cpu-throttle. `x-auto-converge-sync=background`.
- PeriodicThrottle: the 2024 series' RFC ("migration: Introduce util functions for
  periodic CPU throttle", RFC 5/10, 9 Sep 2024), `cpu-periodic-throttle`. Waits while
  iteration-count is at most 1, sleeps cpu-periodic-throttle-interval seconds, then a
  background sync if more than 1000 ms have passed since the last period began;
  otherwise it checks again without sleeping.

A background sync (SYNC_BACKGROUND) counts what the guest dirtied for the throttle but
queues it only at the next iteration, and does not count as an iteration (precopy.py).
Each runs on a timer of the migration's Clock; `tick()` is the body QEMU runs when its
timer or sleep ends, so tests drive them on a VirtualClock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyvmm.migration.policy import SYNC_BACKGROUND, SYNC_FORCED, PolicyHost

log = logging.getLogger("pyvmm.convergence")


class DirtySyncTimer:
    INTERVAL_MS = 5000  # CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_MS

    def __init__(self, host: PolicyHost) -> None:
        self.host = host
        self.prev_count = 0  # throttle_dirty_sync_count_prev
        self.syncs = 0
        self._timer = host.clock.timer(self.tick, "throttle-dirty-sync")

    def start(self) -> None:
        """cpu_throttle_dirty_sync_timer(true): the previous count is reset, in case a
        migration was cancelled once."""
        self.prev_count = 0
        self._timer.mod(self.host.clock.now_ms() + self.INTERVAL_MS)

    def stop(self) -> None:
        self._timer.close()

    def tick(self) -> None:
        ram = self.host.stats.ram
        count = ram.dirty_sync_count
        if count > 1 and count == self.prev_count:
            log.info("sync policy=auto-converge generation=9.2-timer sync_count=%d", count)
            if self.host.force_sync(SYNC_FORCED):
                self.syncs += 1
        self.prev_count = ram.dirty_sync_count
        self._timer.mod(self.host.clock.now_ms() + self.INTERVAL_MS)


class BackgroundSyncWatcher:
    POLL_MS = 1000  # qemu_sem_timedwait(&rs->quit_sem, 1000)
    MAX_ITERATION_MS = 5000  # MIGRATION_MAX_ITERATION_DURATION (5) x 1000

    def __init__(self, host: PolicyHost, max_pct: int, throttle_pct: Callable[[], int]) -> None:
        self.host = host
        self.max_pct = max_pct  # migrate_max_cpu_throttle(), read once at start
        self.throttle_pct = throttle_pct
        self.prev_iterations = 2  # v1 starts prev_iter_cnt at 2
        self.running = False
        self.syncs = 0
        self._timer = host.clock.timer(self.tick, "background-sync")

    def start(self) -> None:
        self.running = True
        self.prev_iterations = 2
        self._poll()

    def stop(self) -> None:
        self.running = False
        self._timer.close()

    def _poll(self) -> None:
        """The loop's head: end at max throttle or when the migration has ended, else wait."""
        if self.throttle_pct() == self.max_pct or not self.host.active:
            self.running = False
            log.info(
                "sync policy=auto-converge generation=v1-background watcher ends "
                "(throttle %d%%, max %d%%, active %s)",
                self.throttle_pct(), self.max_pct, self.host.active,
            )  # fmt: skip
            return
        self._timer.mod(self.host.clock.now_ms() + self.POLL_MS)

    def tick(self) -> None:
        if not self.running:
            return
        iterations = self.host.stats.ram.iteration_count
        if iterations > 1:
            unchanged = iterations == self.prev_iterations
            self.prev_iterations = iterations
            lasted_ms = self.host.clock.now_ms() - self.host.period_start_ms
            if unchanged and lasted_ms > self.MAX_ITERATION_MS:
                log.info(
                    "sync policy=auto-converge generation=v1-background iteration=%d "
                    "lasted_ms=%.0f", iterations, lasted_ms,
                )  # fmt: skip
                if self.host.force_sync(SYNC_BACKGROUND):
                    self.syncs += 1
        self._poll()


class PeriodicThrottle:
    MIN_GAP_MS = 1000  # "Be careful that we don't synchronize too often"

    def __init__(self, host: PolicyHost, interval_s: int) -> None:
        self.host = host
        self.interval_ms = interval_s * 1000
        self.sleeping = False  # in sleep(interval), or re-checking after a too-early wake
        self.syncs = 0
        self._timer = host.clock.timer(self.tick, "periodic-throttle")

    def start(self) -> None:
        self.notify()

    def stop(self) -> None:
        self.sleeping = False
        self._timer.close()

    def notify(self) -> None:
        """After each sync: the RFC's thread spins while iteration-count is at most 1 and
        starts its first sleep the moment it moves on. pyvmm starts it from here instead
        of spinning."""
        if not self.sleeping and self.host.stats.ram.iteration_count > 1:
            self.sleeping = True
            self._timer.mod(self.host.clock.now_ms() + self.interval_ms)

    def tick(self) -> None:
        if not self.sleeping:
            return
        now = self.host.clock.now_ms()
        ready_ms = self.host.period_start_ms + self.MIN_GAP_MS
        if now > ready_ms:
            log.info("sync policy=auto-converge generation=rfc-periodic interval_ms=%d",
                     self.interval_ms)  # fmt: skip
            if self.host.force_sync(SYNC_BACKGROUND):
                self.syncs += 1
            self._timer.mod(now + self.interval_ms)
        else:
            # skip_sleep: QEMU re-checks at once, in a loop, until 1 s has passed (its clock
            # counts whole ms: the first time that passes is ready + 1 ms).
            self._timer.mod(ready_ms + 1)
