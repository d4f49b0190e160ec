"""When is a migration "not converging"? QEMU's migration_trigger_throttle, in one place.

Evaluated at a dirty sync that closes a period of at least 1 s (the source's
PeriodStats). Both auto-converge and the dirty limit act on its verdict.

- dirty-rate test (QEMU >= 5.0): bytes dirtied in the period exceed
  throttle-trigger-threshold % of the bytes sent in it. Each such period
  pre-increments a counter; the second hit fires and resets it. The counter is
  never reset by a good period: "2 hits since the last step", not "2 in a row".
- responsive test (the 2024 series: cpu-responsive-throttle in the RFC and v1,
  cpu-throttle-responsive in v2): the dirty ratio 100 x dirtied / sent is above the
  threshold and not better than the previous period's; two such periods fire. It is
  an *additional* way to fire, and still only when the dirty-rate test holds.
- legacy (QEMU 1.6, 2013, arch_init.c migration_bitmap_sync):
  `s->dirty_pages_rate && dirty > transferred / 2 && dirty_rate_high_cnt++ > 4`.
  The rate is the one from before the period (QEMU assigns it after the test), so
  it is 0 in the first period and `&&` stops before the counter moves; the
  post-increment then passes on its sixth evaluation: the seventh bad period fires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmm.migration.policy import PeriodStats

log = logging.getLogger("pyvmm.convergence")

PAGE_SIZE = 4096


@dataclass
class TriggerVerdict:
    fire: bool
    criterion: str  # "dirty-rate", "dirty-ratio", "legacy" or "" (did not fire)
    bytes_dirty_period: int
    bytes_xfer_period: int
    bytes_dirty_threshold: int


class DirtyTrigger:
    def __init__(self, threshold_pct: int, responsive: bool = False, legacy: bool = False) -> None:
        self.threshold_pct = 50 if legacy else threshold_pct
        self.responsive = responsive
        self.legacy = legacy
        self.dirty_rate_high_cnt = 0
        self._prev_ratio_pct = 0
        self._ratio_high_cnt = 0

    def evaluate(self, dirty_pages: int, bytes_xfer: int, dirty_pages_rate: int) -> TriggerVerdict:
        bytes_dirty = dirty_pages * PAGE_SIZE
        threshold = bytes_xfer * self.threshold_pct // 100
        verdict = TriggerVerdict(False, "", bytes_dirty, bytes_xfer, threshold)
        if self.legacy:
            if dirty_pages_rate and bytes_dirty > threshold:
                fired = self.dirty_rate_high_cnt > 4
                self.dirty_rate_high_cnt += 1  # post-increment, as in 2013
                if fired:
                    self.dirty_rate_high_cnt = 0
                    verdict.fire, verdict.criterion = True, "legacy"
            return verdict
        if bytes_dirty <= threshold:
            if self.responsive and bytes_xfer:
                self._ratio_high(bytes_dirty, bytes_xfer)  # keep the ratio history current
            return verdict
        self.dirty_rate_high_cnt += 1
        ratio_fired = self.responsive and bytes_xfer and self._ratio_high(bytes_dirty, bytes_xfer)
        if self.dirty_rate_high_cnt >= 2:
            self.dirty_rate_high_cnt = 0
            verdict.fire, verdict.criterion = True, "dirty-rate"
        elif ratio_fired:
            verdict.fire, verdict.criterion = True, "dirty-ratio"
        return verdict

    def judge(
        self, policy: str, period: PeriodStats, dirty_pages_rate: int | None = None
    ) -> TriggerVerdict:
        """Evaluate one closed period, with a debug trace line for the policy. The rate
        the 2013 test reads is, by default, the one from before the period closed."""
        rate = period.prev_dirty_pages_rate if dirty_pages_rate is None else dirty_pages_rate
        verdict = self.evaluate(period.dirty_pages, period.bytes_transferred, rate)
        log.debug(
            "period policy=%s sync=%d dirty_bytes=%d xfer_bytes=%d threshold_bytes=%d fire=%s",
            policy, period.sync_count, verdict.bytes_dirty_period, verdict.bytes_xfer_period,
            verdict.bytes_dirty_threshold, verdict.fire,
        )  # fmt: skip
        return verdict

    def _ratio_high(self, bytes_dirty: int, bytes_xfer: int) -> bool:
        """The series' migration_dirty_ratio_high: not improving, twice."""
        curr = 100 * bytes_dirty // bytes_xfer
        prev, self._prev_ratio_pct = self._prev_ratio_pct, curr
        if prev == 0:
            return False
        if curr > self.threshold_pct and curr >= prev:
            self._ratio_high_cnt += 1
            if self._ratio_high_cnt >= 2:
                self._ratio_high_cnt = 0
                return True
        return False
