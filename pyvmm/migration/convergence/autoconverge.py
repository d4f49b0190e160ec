"""Auto-converge, in every generation QEMU and the 2024 series have had, as one policy.

- The trigger (DirtyTrigger, trigger.py): QEMU >= 5.0's dirty-rate test; with
  cpu-throttle-responsive (v2's name) or cpu-responsive-throttle (the RFC's and v1's) the
  2024 series' dirty-ratio test as well; with x-auto-converge-legacy QEMU 1.6's test.
- The step (mig_throttle_guest_down): the first sets cpu-throttle-initial, later ones
  add cpu-throttle-increment (or, with cpu-throttle-tailslow, min(increment, cpu_now -
  cpu_now x allowed/actual)), never beyond max-cpu-throttle; CpuThrottle applies it.
  In the 2013 mode there is no step: the first firing switches on LegacyThrottle, which
  the send loop drives through on_send_step.
- When syncs come (sync.py), `x-auto-converge-sync`: iteration (once per pass, QEMU
  <= 9.1), timer (QEMU 9.2's 5 s timer, the default) or background (v1's watcher); and
  the RFC's own switch, cpu-periodic-throttle. The RFC and the 2013 mode were written
  against syncs once per pass: with either on, x-auto-converge-sync left at its default
  means iteration (MigrationSettings.auto_converge_sync).
Every decision is one structured log line (logger pyvmm.convergence).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pyvmm.migration.convergence.sync import (
    BackgroundSyncWatcher,
    DirtySyncTimer,
    PeriodicThrottle,
)
from pyvmm.migration.convergence.throttle import CpuThrottle, LegacyThrottle, scheduled_flags
from pyvmm.migration.convergence.trigger import DirtyTrigger, TriggerVerdict
from pyvmm.migration.params import SYNC_BACKGROUND, SYNC_TIMER

if TYPE_CHECKING:
    from pyvmm.migration.policy import PeriodStats, PolicyHost

log = logging.getLogger("pyvmm.convergence")


class AutoConverge:
    def __init__(self) -> None:
        self.throttle: CpuThrottle | None = None
        self.legacy: LegacyThrottle | None = None
        self.trigger: DirtyTrigger | None = None
        self.syncer: DirtySyncTimer | BackgroundSyncWatcher | None = None
        self.periodic: PeriodicThrottle | None = None
        self.max_pct = 0

    @property
    def percentage(self) -> int:
        return self.throttle.percentage if self.throttle is not None else 0

    # --- hooks -------------------------------------------------------------------------------

    def on_setup(self, source: PolicyHost) -> None:
        s = source.settings
        legacy = bool(s["x-auto-converge-legacy"])
        sync = s.auto_converge_sync()
        self.trigger = DirtyTrigger(
            s["throttle-trigger-threshold"], responsive=bool(s["cpu-throttle-responsive"]),
            legacy=legacy,
        )  # fmt: skip
        vcpus = lambda: source.machine.vcpus  # noqa: E731 - the list may change on close
        if legacy:
            self.legacy = LegacyThrottle(vcpus)
        else:
            leak = bool(s["x-throttle-thread-scheduled-leak"])
            scheduled = scheduled_flags(source.machine) if leak else None
            self.throttle = CpuThrottle(vcpus, source.clock, scheduled, leak)
        if sync == SYNC_TIMER:
            self.syncer = DirtySyncTimer(source)
        elif sync == SYNC_BACKGROUND:
            self.syncer = BackgroundSyncWatcher(
                source, s["max-cpu-throttle"], lambda: self.percentage
            )
        if s["cpu-periodic-throttle"]:
            self.periodic = PeriodicThrottle(source, s["cpu-periodic-throttle-interval"])
        log.info(
            "setup policy=auto-converge generation=%s threshold_pct=%d initial=%d increment=%d "
            "tailslow=%s max=%d sync=%s periodic_throttle=%s responsive=%s",
            "2013" if legacy else "current", self.trigger.threshold_pct,
            s["cpu-throttle-initial"], s["cpu-throttle-increment"], s["cpu-throttle-tailslow"],
            s["max-cpu-throttle"], sync, s["cpu-periodic-throttle"],
            s["cpu-throttle-responsive"],
        )  # fmt: skip
        if self.syncer is not None:
            self.syncer.start()
        if self.periodic is not None:
            self.periodic.start()

    def on_sync(self, source: PolicyHost, period: PeriodStats | None) -> None:
        if self.periodic is not None:
            self.periodic.notify()
        if period is None or self.trigger is None:
            return
        verdict = self.trigger.judge("auto-converge", period)
        if not verdict.fire:
            return
        if self.legacy is not None:
            if not self.legacy.active:
                self.legacy.start()
                self._trace(period, verdict, "off", "30ms/40ms")
            return
        self._step(source, period, verdict)

    def on_send_step(self, now_ms: float) -> None:
        """The send loop, after each step: the 2013 throttle's clock."""
        legacy = self.legacy
        if legacy is not None:
            legacy.check(now_ms)

    def on_end(self, source: PolicyHost) -> None:
        for part in (self.syncer, self.periodic, self.throttle, self.legacy):
            if part is not None:
                part.stop()
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
            "decision policy=auto-converge criterion=%s old=%s new=%s sync=%d sync_kind=%s "
            "period_ms=%.0f dirty_bytes=%d xfer_bytes=%d threshold_bytes=%d",
            v.criterion, old, new, period.sync_count, period.kind, period.elapsed_ms,
            v.bytes_dirty_period, v.bytes_xfer_period, v.bytes_dirty_threshold,
        )  # fmt: skip
