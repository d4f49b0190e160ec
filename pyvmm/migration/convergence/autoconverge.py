"""Auto-converge, in every generation QEMU has had, as one policy.

- QEMU 5.0+ (default): DirtyTrigger's dirty-rate test; the first step sets
  cpu-throttle-initial, later steps add cpu-throttle-increment (or, with
  cpu-throttle-tailslow, min(increment, cpu_now - cpu_now x allowed/actual)),
  never beyond max-cpu-throttle.
- QEMU 9.2 periodic sync (x-cpu-throttle-periodic-sync, default on): a timer every
  x-cpu-throttle-periodic-sync-interval ms forces a dirty sync when none happened
  since its previous tick (and the count is above 1), so the throttle can step
  mid-pass instead of once per pass over RAM. Off gives QEMU <= 9.1.
- The 2024 v1 series' responsive throttle (cpu-throttle-responsive): a second
  trigger, the dirty ratio not improving (DirtyTrigger).
- QEMU 1.6 (2013, x-auto-converge-legacy): the sixth bad period switches on a
  fixed 30 ms sleep every 40 ms (LegacyThrottle).
Every decision is one structured log line (logger pyvmm.convergence).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from pyvmm.migration.convergence.throttle import CpuThrottle, LegacyThrottle
from pyvmm.migration.convergence.trigger import DirtyTrigger, TriggerVerdict

if TYPE_CHECKING:
    from pyvmm.migration.policy import PeriodStats, PolicyHost

log = logging.getLogger("pyvmm.convergence")


class AutoConverge:
    def __init__(self) -> None:
        self.throttle: CpuThrottle | None = None
        self.legacy: LegacyThrottle | None = None
        self.trigger: DirtyTrigger | None = None
        self.max_pct = 0
        self._periodic_stop = threading.Event()
        self._periodic: threading.Thread | None = None

    # --- hooks -------------------------------------------------------------------------------

    def on_setup(self, source: PolicyHost) -> None:
        s = source.settings
        legacy = bool(s["x-auto-converge-legacy"])
        self.trigger = DirtyTrigger(
            s["throttle-trigger-threshold"], responsive=bool(s["cpu-throttle-responsive"]),
            legacy=legacy,
        )  # fmt: skip
        vcpus = lambda: source.machine.vcpus  # noqa: E731 - the list may change on close
        if legacy:
            self.legacy = LegacyThrottle(vcpus)
        else:
            self.throttle = CpuThrottle(vcpus)
        if s["x-cpu-throttle-periodic-sync"] and not legacy:
            self._periodic_stop.clear()
            interval_s = s["x-cpu-throttle-periodic-sync-interval"] / 1000
            self._periodic = threading.Thread(
                target=self._periodic_sync, args=(source, interval_s),
                name="throttle-dirty-sync", daemon=True,
            )  # fmt: skip
            self._periodic.start()
        log.info(
            "setup policy=auto-converge generation=%s threshold_pct=%d initial=%d increment=%d "
            "tailslow=%s max=%d periodic_sync=%s responsive=%s",
            "2013" if legacy else "current", self.trigger.threshold_pct,
            s["cpu-throttle-initial"], s["cpu-throttle-increment"], s["cpu-throttle-tailslow"],
            s["max-cpu-throttle"], bool(self._periodic), s["cpu-throttle-responsive"],
        )  # fmt: skip

    def on_sync(self, source: PolicyHost, period: PeriodStats | None) -> None:
        if period is None or self.trigger is None:
            return
        verdict = self.trigger.judge("auto-converge", period, source.stats.ram.dirty_pages_rate)
        if not verdict.fire:
            return
        if self.legacy is not None:
            if not self.legacy.active:
                self.legacy.start()
                self._trace(period, verdict, "off", "30ms/40ms")
            return
        self._step(source, period, verdict)

    def on_end(self, source: PolicyHost) -> None:
        self._periodic_stop.set()
        if self._periodic is not None:
            self._periodic.join(2)
            self._periodic = None
        if self.throttle is not None:
            self.throttle.stop()
        if self.legacy is not None:
            self.legacy.stop()
        source.stats.extra.pop("cpu-throttle-percentage", None)

    # --- mechanics ---------------------------------------------------------------------------

    def _step(self, source: PolicyHost, period: PeriodStats, verdict: TriggerVerdict) -> None:
        """QEMU's mig_throttle_guest_down."""
        assert self.throttle is not None
        s = source.settings
        old = self.throttle.percentage
        if old == 0:
            new = s["cpu-throttle-initial"]
        else:
            inc = s["cpu-throttle-increment"]
            if s["cpu-throttle-tailslow"] and verdict.bytes_dirty_period:
                cpu_now = 100 - old
                ratio = verdict.bytes_dirty_threshold / verdict.bytes_dirty_period
                inc = min(cpu_now - int(cpu_now * ratio), inc)
            new = min(old + inc, s["max-cpu-throttle"])
        self.throttle.set_percentage(new)
        self.max_pct = max(self.max_pct, self.throttle.percentage)
        source.stats.extra["cpu-throttle-percentage"] = self.throttle.percentage
        self._trace(period, verdict, str(old), str(self.throttle.percentage))

    def _trace(self, period: PeriodStats, v: TriggerVerdict, old: str, new: str) -> None:
        log.info(
            "decision policy=auto-converge criterion=%s old=%s new=%s sync=%d period_ms=%.0f "
            "dirty_bytes=%d xfer_bytes=%d threshold_bytes=%d",
            v.criterion, old, new, period.sync_count, period.elapsed_ms, v.bytes_dirty_period,
            v.bytes_xfer_period, v.bytes_dirty_threshold,
        )  # fmt: skip

    def _periodic_sync(self, source: PolicyHost, interval_s: float) -> None:
        """QEMU 9.2's cpu_throttle_dirty_sync_timer_tick."""
        prev = 0
        while not self._periodic_stop.wait(interval_s):
            count = source.stats.ram.dirty_sync_count
            if count > 1 and count == prev and source.active and not source.in_downtime:
                log.info("periodic-sync policy=auto-converge sync_count=%d: forcing a sync", count)
                source.force_sync()
            prev = source.stats.ram.dirty_sync_count
