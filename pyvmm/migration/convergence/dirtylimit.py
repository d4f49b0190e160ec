"""The dirty limit: QEMU 8.1's per-vCPU dirty-rate throttle (system/dirtylimit.c), on
pyvmm's dirty rings.

QEMU's design, restated (docs/dirty-limit.md has the long version):
- a "dirtyrate-stat" thread measures each vCPU's dirty rate over a period (1000 ms;
  during a migration with the dirty-limit capability, x-vcpu-dirty-limit-period) from
  the per-vCPU dirty-ring entry counters (cpu->dirty_pages): snapshot, wait, sync,
  snapshot (vcpu_calculate_dirtyrate);
- after each period, for every limited vCPU, `dirtylimit_set_throttle` moves that
  vCPU's sleep per ring-full (`throttle_us_per_full`) towards the quota: nothing
  within 25 MB/s; a ratio step when more than 50 % off; a fixed step of a tenth of
  the ring-full time when near; clamped to [0, 99 ring-full times];
- each time a vCPU fills its dirty ring it exits, reaps its own ring and sleeps
  `throttle_us_per_full` on its own thread (dirtylimit_vcpu_execute). While a limit is
  in service QEMU's reaper thread idles, so rings are reaped only by ring-full exits and
  syncs. Only vCPUs that write are slowed down; readers run freely.

The counts and the reaps are the tracker's (RingTracker with its RingModel): entries, as
QEMU counts them, reaped by QEMU's rules while `tracker.limit_in_service` is set. Where
the host's real ring-full exits are reliable, the counted ring is the real one and the
penalty is served at KVM_EXIT_DIRTY_RING_FULL (RingTracker.on_ring_full). pyvmm's one
deviation is for hosts where a full ring may lose entries (this one, see
docs/dirty-tracking.md): there the real rings are kept from filling and the counted ring
is a *virtual* ring of x-vcpu-dirty-limit-ring-size entries that holds what a real ring
of that size would; when it fills (RingTracker.on_counted_full) the vCPU owes one sleep
and is kicked to serve it in its exit path (Vcpu.run_on_thread + Vcpu.sleep_us). The
controller reasons about either ring exactly as QEMU's does: ring MiB = entries x 4 KiB.

QEMU quirks kept on purpose, so experiments compare: the ring-full time divides by a
running maximum of every rate ever seen (a function-static in QEMU, never reset; here
one per VM, for the life of the process); throttle_us_per_full survives a cancel and
is where a later limit starts from; query-migrate's ring-full time goes through the
same function and can raise that maximum.

Every decision is one structured log line on logger "pyvmm.convergence" (INFO).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvmm.dirty.rate import pages_to_mib_s
from pyvmm.dirty.ring import RingTracker
from pyvmm.dirty.tracker import DirtyTracker, DirtyView
from pyvmm.machine.machine import Machine
from pyvmm.machine.vcpu import Vcpu, VcpuRunState
from pyvmm.migration.clock import WALL_CLOCK, Clock, Timer
from pyvmm.migration.convergence.trigger import DirtyTrigger, TriggerVerdict
from pyvmm.migration.params import MigrationSettings

if TYPE_CHECKING:
    from pyvmm.migration.policy import PeriodStats, PolicyHost

log = logging.getLogger("pyvmm.convergence")

TOLERANCE_MBPS = 25  # DIRTYLIMIT_TOLERANCE_RANGE: no adjustment within this of the quota
LINEAR_ADJUSTMENT_PCT = 50  # DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT: "far" beyond this error
THROTTLE_PCT_MAX = 99  # DIRTYLIMIT_THROTTLE_PCT_MAX: sleep <= 99 ring-full times
CALC_TIME_MS = 1000  # DIRTYLIMIT_CALC_TIME_MS: the period outside a dirty-limit migration
PAGE_SIZE = 4096

QMP_THROTTLE_TIME = "dirty-limit-throttle-time-per-round"
QMP_RING_FULL_TIME = "dirty-limit-ring-full-time"


# --- the controller's arithmetic (pure) -------------------------------------------------------


class RingFullTime:
    """QEMU's dirtylimit_dirty_ring_full_time: how long a vCPU takes to fill its ring.

    `ring_bytes x 1e6 / max_rate` in microseconds, where max_rate is a running maximum
    of every rate ever passed in (QEMU's function-static `max_dirtyrate`): it never
    decreases, so the estimate is the shortest fill time seen, not the current one.
    QEMU counts the ring in whole MiB (an integer); for rings of 256 entries and more
    that is the same number, below it QEMU's would be 0 and pyvmm's is exact.
    """

    def __init__(self) -> None:
        self.max_rate_mbps = 0

    def __call__(self, rate_mbps: int, ring_entries: int) -> int:
        if self.max_rate_mbps < rate_mbps:
            self.max_rate_mbps = rate_mbps
        if self.max_rate_mbps == 0:
            return 0
        return ring_entries * PAGE_SIZE * 1_000_000 // (self.max_rate_mbps << 20)


@dataclass
class Adjustment:
    """One decision of dirtylimit_adjust_throttle / dirtylimit_set_throttle for one vCPU."""

    quota_mbps: int
    current_mbps: int
    old_us: int
    new_us: int
    rule: str  # tolerance | idle | far-up | far-down | near-up | near-down
    sleep_pct: int = 0  # the far rule's percentage
    ring_full_us: int = 0
    clamped: bool = False


def adjust_throttle(
    old_us: int, quota_mbps: int, current_mbps: int, ring_full_time: Callable[[int], int]
) -> Adjustment:
    """The new sleep per ring-full, QEMU's integer arithmetic step for step.

    ring_full_time(current) is RingFullTime bound to the ring size (it updates the
    running maximum, so it is called exactly where QEMU calls it)."""
    adj = Adjustment(quota_mbps, current_mbps, old_us, old_us, "tolerance")
    if abs(quota_mbps - current_mbps) <= TOLERANCE_MBPS:  # dirtylimit_done
        return adj
    if current_mbps == 0:
        adj.new_us, adj.rule = 0, "idle"
        return adj
    rft = ring_full_time(current_mbps)
    adj.ring_full_us = rft
    low, high = min(quota_mbps, current_mbps), max(quota_mbps, current_mbps)
    new = old_us
    if (high - low) * 100 // high > LINEAR_ADJUSTMENT_PCT:
        if quota_mbps < current_mbps:
            pct = (current_mbps - quota_mbps) * 100 // current_mbps
            new += int(rft * pct / (100 - pct))  # C: double, truncated to uint64
            adj.rule = "far-up"
        else:
            pct = (quota_mbps - current_mbps) * 100 // quota_mbps
            new -= int(rft * pct / (100 - pct))
            adj.rule = "far-down"
        adj.sleep_pct = pct
    elif quota_mbps < current_mbps:
        new += rft // 10
        adj.rule = "near-up"
    else:
        new -= rft // 10
        adj.rule = "near-down"
    cap = rft * THROTTLE_PCT_MAX
    adj.clamped = not 0 <= new <= cap
    adj.new_us = max(min(new, cap), 0)
    return adj


# --- per-vCPU state ---------------------------------------------------------------------------


@dataclass
class VcpuLimit:
    index: int
    enabled: bool = False
    quota_mbps: int = 0
    current_mbps: int = 0  # measured over the last period (0 until one has ended)
    throttle_us_per_full: int = 0  # sleep per (virtual) ring fill; survives a cancel (QEMU)
    owed_us: int = 0  # sleep owed for rings filled, not yet served
    penalty_queued: bool = False  # a _serve_penalty is queued or running on the vCPU
    rings_filled: int = 0  # virtual rings filled since the last decision (for the log)
    slept_us: int = 0  # sleep actually served since the last decision (for the log)


@dataclass
class _Stat:
    """One run of the "dirtyrate-stat" measurement: its view, its timer, the period's start."""

    view: DirtyView
    timer: Timer | None = None
    before: list[int] = field(default_factory=list)
    t0_ms: float = 0.0
    stopped: bool = False


# --- the controller ---------------------------------------------------------------------------


class DirtyLimitController:
    """One per VM: the limits set by QMP or by a migration, the stat thread, the penalties.

    `migration()` returns the VM's current outgoing migration (or None). The stat thread
    has its own dirty view: its syncs reap the rings for every view, the migration's
    included (under that view's lock), and the migration counts those pages at its next
    sync; they do not add to its dirty-sync-count. QEMU's stat thread does the same: it
    syncs the KVM log (memory_global_dirty_log_sync, which reaps every ring), which feeds
    the migration's bitmap, not the migration bitmap sync.
    """

    def __init__(
        self,
        machine: Machine,
        tracker: DirtyTracker,
        settings: MigrationSettings,
        migration: Callable[[], PolicyHost | None] = lambda: None,
        clock: Clock = WALL_CLOCK,
    ) -> None:
        if getattr(tracker, "mode", None) != "ring":  # RingTracker, or the simulator's rings
            raise ValueError("the dirty limit needs ring-mode dirty tracking (--dirty-ring)")
        self.machine = machine
        self.tracker: RingTracker = tracker  # type: ignore[assignment]
        self.clock = clock
        self.settings = settings
        self._migration = migration
        self.vcpus = [VcpuLimit(i) for i in range(len(machine.vcpus))]
        self.ring_full_time = RingFullTime()
        self.last_migration_quota = 0  # migration_dirty_limit_guest's static quota_dirtyrate
        self.listeners: list[Callable[[], None]] = []  # run after each adjustment pass
        self._lock = threading.RLock()  # QEMU's dirtylimit_mutex: limits and throttles
        self._penalty_lock = threading.Lock()  # owed_us / penalty_queued
        self._stat: _Stat | None = None  # the measurement while a limit is in service
        tracker.on_counted_full = self._on_counted_full
        tracker.on_ring_full = self._on_ring_full

    # --- what QMP and the migration policy call ----------------------------------------------

    @property
    def in_service(self) -> bool:
        """QEMU's dirtylimit_in_service: at least one vCPU is limited."""
        return any(v.enabled for v in self.vcpus)

    def ring_entries(self) -> int:
        """The ring the limit penalises per: the real ring, or where ring-full is unsafe the
        virtual ring of x-vcpu-dirty-limit-ring-size entries (applied to the tracker here)."""
        if self.tracker.virtual:
            self.tracker.use_virtual_ring(int(self.settings["x-vcpu-dirty-limit-ring-size"]))
        return self.tracker.counted_entries

    def period_ms(self) -> int:
        """x-vcpu-dirty-limit-period during a migration with the capability, else 1000."""
        source = self._migration()
        if source is not None and source.active and source.settings.caps.get("dirty-limit"):
            return int(source.settings["x-vcpu-dirty-limit-period"])
        return CALC_TIME_MS

    def set_limit(self, cpu_index: int | None, quota_mbps: int) -> None:
        """Limit one vCPU (or all) to quota_mbps MB/s; 0 cancels (qmp_set_vcpu_dirty_limit)."""
        if quota_mbps <= 0:
            self.cancel(cpu_index)
            return
        entries = self.ring_entries()
        with self._lock:
            start = not self.in_service
            for v in self._select(cpu_index):
                if not v.enabled:
                    v.rings_filled = v.slept_us = 0
                v.enabled, v.quota_mbps = True, quota_mbps
            # dirtylimit_in_service(): QEMU's reaper idles, a ring-full reaps its own ring.
            self.tracker.limit_in_service = True
        log.info(
            "limit policy=dirty-limit vcpu=%s quota_mbps=%d ring_entries=%d ring=%s "
            "period_ms=%d",
            "all" if cpu_index is None else cpu_index, quota_mbps, entries,
            "virtual" if self.tracker.virtual else "real", self.period_ms(),
        )  # fmt: skip
        if start:
            self._start_thread()
        self._notify()

    def cancel(self, cpu_index: int | None = None) -> None:
        """Remove the limit of one vCPU (or all); the thread ends with the last one."""
        with self._lock:
            was = self.in_service
            cancelled = [v for v in self._select(cpu_index) if v.enabled]
            for v in cancelled:
                v.enabled, v.quota_mbps = False, 0
                with self._penalty_lock:
                    v.owed_us = 0
            stop = was and not self.in_service
            self.tracker.limit_in_service = self.in_service
        for v in cancelled:  # end a penalty being served
            if v.index < len(self.machine.vcpus):
                self.machine.vcpus[v.index].kick()
        if cancelled:
            log.info(
                "cancel policy=dirty-limit vcpu=%s",
                "all" if cpu_index is None else cpu_index,
            )
        if stop:
            self._stop_thread()
        self._notify()

    def query(self) -> list[dict[str, int]]:
        """query-vcpu-dirty-limit: the limited vCPUs, rates in MB/s."""
        with self._lock:
            return [
                {"cpu-index": v.index, "limit-rate": v.quota_mbps, "current-rate": v.current_mbps}
                for v in self.vcpus
                if v.enabled
            ]

    def throttle_time_per_round_us(self) -> int:
        """dirtylimit_throttle_time_per_round: the largest sleep per ring-full of any vCPU."""
        return max((v.throttle_us_per_full for v in self.vcpus), default=0)

    def ring_full_time_us(self) -> int:
        """dirtylimit_ring_full_time: ring-full time at the running vCPUs' mean rate (0: idle)."""
        rates = [
            self.vcpus[vcpu.index].current_mbps
            for vcpu in self.machine.vcpus
            if vcpu.state is VcpuRunState.RUNNING and vcpu.index < len(self.vcpus)
        ]
        if not rates or not sum(rates):
            return 0
        with self._lock:
            return self.ring_full_time(sum(rates) // len(rates), self.ring_entries())

    def close(self) -> None:
        self.cancel(None)
        self._stop_thread()
        if self.tracker.on_counted_full == self._on_counted_full:
            self.tracker.on_counted_full = None
        if self.tracker.on_ring_full == self._on_ring_full:
            self.tracker.on_ring_full = None

    # --- the stat thread ("dirtyrate-stat") ---------------------------------------------------

    def _select(self, cpu_index: int | None) -> list[VcpuLimit]:
        return self.vcpus if cpu_index is None else [self.vcpus[cpu_index]]

    def _start_thread(self) -> None:
        """vcpu_dirty_rate_stat_start. QEMU's "dirtyrate-stat" thread is a timer of the
        controller's Clock here (on the wall clock, a thread of that name): each expiry
        ends one period (vcpu_calculate_dirtyrate: snapshot, wait, sync, snapshot) and
        adjusts the throttles, and the next period starts right after it."""
        with self._lock:
            if self._stat is not None:
                return
            for v in self.vcpus:
                v.current_mbps = 0  # vcpu_dirty_rate_stat_initialize
            # The view keeps dirty logging on while we measure (vcpu_dirty_rate_stat_thread's
            # global_dirty_log_change); the rates come from the tracker's per-vCPU entry
            # counters, so its bitmaps are never read. As in QEMU, no sync before the first
            # period.
            stat = _Stat(self.tracker.open_view("dirty-limit"))
            stat.timer = self.clock.timer(lambda: self._stat_tick(stat), "dirtyrate-stat")
            self._stat = stat
            self._begin_period(stat)

    def _begin_period(self, stat: _Stat) -> None:
        stat.t0_ms = self.clock.now_ms()
        stat.before = self.tracker.vcpu_dirty_pages() or []
        assert stat.timer is not None
        stat.timer.mod(stat.t0_ms + self.period_ms())

    def _stop_thread(self) -> None:
        with self._lock:
            stat, self._stat = self._stat, None
        if stat is None:
            return
        stat.stopped = True
        assert stat.timer is not None
        stat.timer.close()  # waits for a period being processed (unless called from it)
        stat.view.close()

    def _stat_tick(self, stat: _Stat) -> None:
        """One period has passed: global_dirty_log_sync (reaps every ring, so the counters
        are current), the rates, dirtylimit_process, and the next period."""
        if stat.stopped:
            return
        try:
            stat.view.sync()
            after = self.tracker.vcpu_dirty_pages() or []
            elapsed_ms = self.clock.now_ms() - stat.t0_ms
            if stat.stopped:
                return
            self._process(vcpu_rates(stat.before, after, elapsed_ms), elapsed_ms)
            if not stat.stopped:
                self._begin_period(stat)
        except Exception:  # the VM may be ending under us; never die silently
            log.exception("dirty-limit stat timer failed")

    def _process(self, rates: list[int], elapsed_ms: float) -> None:
        """dirtylimit_process: adjust every limited vCPU's sleep per ring-full."""
        entries = self.ring_entries()
        with self._lock:
            for v, rate in zip(self.vcpus, rates, strict=False):
                v.current_mbps = rate
            for v in self.vcpus:
                if not v.enabled:
                    continue
                adj = adjust_throttle(
                    v.throttle_us_per_full, v.quota_mbps, v.current_mbps,
                    lambda rate: self.ring_full_time(rate, entries),
                )  # fmt: skip
                v.throttle_us_per_full = adj.new_us
                rings, slept_us = v.rings_filled, v.slept_us
                v.rings_filled = v.slept_us = 0
                log.info(
                    "decision policy=dirty-limit vcpu=%d quota_mbps=%d current_mbps=%d "
                    "old_us=%d new_us=%d rule=%s sleep_pct=%d ring_full_us=%d clamped=%s "
                    "max_rate_mbps=%d ring_entries=%d period_ms=%.0f rings=%d slept_ms=%.0f",
                    v.index, adj.quota_mbps, adj.current_mbps, adj.old_us, adj.new_us, adj.rule,
                    adj.sleep_pct, adj.ring_full_us, adj.clamped,
                    self.ring_full_time.max_rate_mbps, entries, elapsed_ms, rings, slept_us / 1000,
                )  # fmt: skip
        self._notify()

    def _notify(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:
                log.exception("dirty-limit listener failed")

    # --- penalties: on the reaper's and the vCPUs' threads ------------------------------------

    def _on_counted_full(self, index: int, fulls: int) -> None:
        """RingTracker.on_counted_full (the harvesting thread, virtual rings only): vCPU
        `index` filled its virtual ring `fulls` times; it owes one sleep per fill, served on
        its own thread as soon as it is kicked out of the guest."""
        if index >= len(self.vcpus):
            return
        v = self.vcpus[index]
        if not v.enabled:
            return
        v.rings_filled += fulls
        sleep_us = v.throttle_us_per_full
        if sleep_us <= 0:
            return
        with self._penalty_lock:
            v.owed_us += fulls * sleep_us
            if v.penalty_queued:
                return  # the queued (or running) one serves this debt too
            v.penalty_queued = True
        vcpus = self.machine.vcpus
        if index < len(vcpus):
            vcpus[index].run_on_thread(self._serve_penalty)

    def _serve_penalty(self, vcpu: Vcpu) -> None:
        """On the vCPU's thread, before it re-enters the guest: sleep what it owes.

        Debt that arrives while it sleeps is served by the same call, so one penalty never
        kicks (and so cuts short) another. A pause, stop or any other kick ends the sleep
        early (Vcpu.sleep_us); what was not slept is forgiven."""
        v = self.vcpus[vcpu.index]
        while True:
            with self._penalty_lock:
                owed = v.owed_us if v.enabled else 0
                v.owed_us = 0
                if owed <= 0:
                    v.penalty_queued = False
                    return
            t0_ms = self.clock.now_ms()
            scheduled = vcpu.sleep_us(owed)
            # A vCPU whose sleeps are scheduled rather than slept (the simulator's) says
            # how long it will sleep; a real one has slept when sleep_us returns.
            slept = int((self.clock.now_ms() - t0_ms) * 1000) if scheduled is None else scheduled
            v.slept_us += slept
            log.debug(
                "penalty policy=dirty-limit vcpu=%d owed_us=%d slept_us=%d", v.index, owed, slept
            )
            if slept < owed * 0.9:  # interrupted: pause, stop, switchover, cancel
                with self._penalty_lock:
                    v.owed_us = 0
                    v.penalty_queued = False
                return

    def _on_ring_full(self, vcpu: Vcpu) -> None:
        """RingTracker.on_ring_full: KVM_EXIT_DIRTY_RING_FULL, on the vCPU's thread, after
        the tracker reaped as QEMU does.

        A real counted ring: QEMU's dirtylimit_vcpu_execute, sleep throttle_us_per_full if
        this vCPU is limited. A virtual one: a real ring-full is only pyvmm's harvest
        falling behind, not a counted ring-full; serve the debt that harvest just counted."""
        if vcpu.index >= len(self.vcpus):
            return
        v = self.vcpus[vcpu.index]
        with self._penalty_lock:
            if self.tracker.virtual:
                if v.owed_us <= 0:
                    return
            else:
                if not v.enabled:
                    return
                v.rings_filled += 1
                if v.throttle_us_per_full <= 0:
                    return
                v.owed_us += v.throttle_us_per_full
            v.penalty_queued = True
        self._serve_penalty(vcpu)


def vcpu_rates(before: list[int], after: list[int], elapsed_ms: float) -> list[int]:
    """Per-vCPU rates in MB/s from two snapshots of the entry counters (QEMU's
    do_calculate_dirtyrate: MiB, integer arithmetic)."""
    return [pages_to_mib_s(a - b, elapsed_ms) for a, b in zip(after, before, strict=True)]


# --- the migration policy ---------------------------------------------------------------------


class DirtyLimitPolicy:
    """Capability dirty-limit: when DirtyTrigger fires (dirty bytes over the threshold, second
    hit, as auto-converge), limit every vCPU to vcpu-dirty-limit (QEMU's
    migration_dirty_limit_guest); at the end (completed, failed or cancelled) cancel it.

    QEMU 8.1 cancels only in migration_cancel(), so after a failed or completed migration its
    limit stays on; pyvmm cancels at every end so that a source that goes on running after
    a failure is not left throttled."""

    def __init__(self, controller: DirtyLimitController | None) -> None:
        self.controller = controller
        self.trigger: DirtyTrigger | None = None
        self.limited = False  # this migration set the limits
        self._source: PolicyHost | None = None

    def on_setup(self, source: PolicyHost) -> None:
        s = source.settings
        self.trigger = DirtyTrigger(s["throttle-trigger-threshold"])
        self._source = source
        if self.controller is not None:
            self.controller.listeners.append(self._publish)
        log.info(
            "setup policy=dirty-limit threshold_pct=%d vcpu_dirty_limit_mbps=%d period_ms=%d "
            "ring_entries=%d controller=%s",
            s["throttle-trigger-threshold"], s["vcpu-dirty-limit"],
            s["x-vcpu-dirty-limit-period"], s["x-vcpu-dirty-limit-ring-size"],
            self.controller is not None,
        )  # fmt: skip

    def on_sync(self, source: PolicyHost, period: PeriodStats | None) -> None:
        if period is None or self.trigger is None:
            return
        verdict = self.trigger.judge("dirty-limit", period, source.stats.ram.dirty_pages_rate)
        if verdict.fire:
            self._limit_guest(source, period, verdict)

    def on_end(self, source: PolicyHost) -> None:
        controller = self.controller
        if controller is not None:
            if self._publish in controller.listeners:
                controller.listeners.remove(self._publish)
            if self.limited:
                controller.cancel(None)
        source.stats.extra.pop(QMP_THROTTLE_TIME, None)
        source.stats.extra.pop(QMP_RING_FULL_TIME, None)
        self._source = None

    def _limit_guest(self, source: PolicyHost, period: PeriodStats, v: TriggerVerdict) -> None:
        """migration_dirty_limit_guest: set (or update) every vCPU's quota, no stepping."""
        quota = int(source.settings["vcpu-dirty-limit"])
        controller = self.controller
        if controller is None:
            log.warning("dirty-limit triggered but the VM has no dirty-limit controller")
            return
        unchanged = controller.in_service and controller.last_migration_quota == quota
        log.info(
            "decision policy=dirty-limit trigger=%s sync=%d period_ms=%.0f dirty_bytes=%d "
            "xfer_bytes=%d threshold_bytes=%d quota_mbps=%d action=%s",
            v.criterion, period.sync_count, period.elapsed_ms, v.bytes_dirty_period,
            v.bytes_xfer_period, v.bytes_dirty_threshold, quota,
            "none (already in service)" if unchanged else "limit all vCPUs",
        )  # fmt: skip
        if unchanged:
            return
        controller.last_migration_quota = quota
        self.limited = True
        controller.set_limit(None, quota)
        self._publish()

    def _publish(self) -> None:
        """query-migrate's two fields, present while the limit is in service."""
        source, controller = self._source, self.controller
        if source is None or controller is None:
            return
        extra: dict[str, Any] = source.stats.extra
        if controller.in_service:
            extra[QMP_THROTTLE_TIME] = controller.throttle_time_per_round_us()
            extra[QMP_RING_FULL_TIME] = controller.ring_full_time_us()
        else:
            extra.pop(QMP_THROTTLE_TIME, None)
            extra.pop(QMP_RING_FULL_TIME, None)
