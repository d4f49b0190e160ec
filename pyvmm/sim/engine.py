"""One simulated migration, start to finish, written as a `pyvmm bench` report.

The parts that decide are pyvmm's own, imported and run unchanged: Precopy (the rate
limit's windows, the threshold, the switchover rule, the dirty syncs and their periods),
DirtyPages (which pages go, the background syncs' held pages), MigrationSettings (QMP's
parameters, checked as `migrate-set-parameters` checks them) and the convergence
policies that `build_policies` makes for the capabilities (every auto-converge generation,
its triggers and sync timers). Around them, on one VirtualClock:

- the guest (guest.py) and the link (link.py) in place of GuestMemory and the socket;
- the harness's side (pyvmm/bench/engine.py's loop): every 50 ms of virtual time a look at
  the statistics, `migrate_cancel` past --max-iters or --max-time, and every
  SimModel.sample_ms one progress sample built from query-migrate's own answer
  (MigrationStats.to_qmp);
- the switchover: the guest stops, Precopy's final sync and unlimited send (the same calls
  Switchover makes), then the machine state over the link, the destination's load and two
  round trips (SWITCHOVER/LOADED, GO/STARTED).

The migration's thread is the caller's: timers fire inside the virtual time a send or a
rate-limit wait takes, in expiry order, which is when their threads would have run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pyvmm.bench import report
from pyvmm.bench.engine import _host, progress_sample
from pyvmm.bench.scenario import Hardware, Scenario, ScenarioError, to_dict
from pyvmm.migration.clock import VirtualClock
from pyvmm.migration.convergence import build_policies
from pyvmm.migration.convergence.dirtylimit import DirtyLimitController
from pyvmm.migration.dirtypages import DirtyPages
from pyvmm.migration.params import MigrationSettings, ParameterError
from pyvmm.migration.policy import SYNC_FORCED
from pyvmm.migration.precopy import MigrationCancelled, Precopy
from pyvmm.migration.stats import ACTIVE_STATES, MigrationStats
from pyvmm.sim.guest import PAGE_SIZE, GuestModel, SimDirtyView, SimMachine
from pyvmm.sim.link import Link, SimPageWriter, SimStreamWriter
from pyvmm.sim.model import MIB, SimModel, lag_points, model_to_dict
from pyvmm.sim.rings import SimRingTracker

log = logging.getLogger("pyvmm.sim")

POLL_MS = 50.0  # the harness's query-migrate period (bench/engine.py POLL_S)
CPU_SAMPLE_MS = 500.0  # vcpu_cpu samples (the harness: every 0.5 s)
VMM = "pyvmm-sim"


class SimRun:
    """A PolicyHost, as MigrationSource is one, around a real Precopy."""

    def __init__(self, scenario: Scenario, hw: Hardware, model: SimModel) -> None:
        scenario.check()
        hw.check()
        model.check()
        if scenario.dirty_limit and not hw.dirty_ring_size:
            raise ScenarioError("--dirty-limit needs --dirty-ring-size")
        self.scenario, self.hw, self.model = scenario, hw, model
        self.settings = MigrationSettings()
        try:
            self.settings.set_capabilities(scenario.capabilities(), bool(hw.dirty_ring_size))
            params = scenario.parameters()
            if hw.dirty_ring_size:
                params["x-vcpu-dirty-limit-ring-size"] = hw.dirty_ring_size
            self.settings.set_parameters(params)
            self.settings.check_migrate()
        except ParameterError as exc:
            raise ScenarioError(str(exc)) from None
        self.clock = VirtualClock(0.0)
        total_pages = hw.vm_mem_mib() * MIB // PAGE_SIZE
        ws_pages = hw.working_set_mib() * MIB // PAGE_SIZE
        rng = np.random.default_rng(model.seed)
        rate_mib_s = hw.stress_rate or model.guest_rate_mib_s
        spread = model.jitter_pct / 100 * rng.uniform(-1.0, 1.0, hw.cpus)
        rates = rate_mib_s * (1 + spread) * MIB / PAGE_SIZE / 1000
        offsets = rng.uniform(0, ws_pages, hw.cpus)
        self.guest = GuestModel(self.clock, total_pages, hw.cpus, ws_pages, rates, offsets,
                                lag_function(lag_points(model.wake_lag_ms)))  # fmt: skip
        self.machine = SimMachine(self.guest)
        mbit = scenario.link_mbit or model.loopback_mib_s * MIB * 8 / 1e6
        self.link = Link.of(mbit, model.latency_ms, model.zero_scan_gib_s)
        self.stats = MigrationStats(status="setup", start_ms=self.clock.now_ms())
        self.stats.ram.total = total_pages * PAGE_SIZE
        self.view = SimDirtyView(self.guest)
        self.pages = DirtyPages(self.view)  # type: ignore[arg-type]
        self.writer = SimStreamWriter(self.clock, self.link)
        self.page_writer = SimPageWriter(
            self.writer, self.stats.ram, self.guest.nonzero_pages, self.link
        )
        if model.sync_ms_per_gib:
            sync_ms = model.sync_ms_per_gib * total_pages * PAGE_SIZE / (1 << 30)
            self.view.on_sync = lambda: self._charge(sync_ms)
        self.cancel = threading.Event()
        self.dirty_limit: DirtyLimitController | None = None
        if scenario.dirty_limit:
            rings = SimRingTracker(self.guest, self.machine, hw.dirty_ring_size)
            self.dirty_limit = DirtyLimitController(
                self.machine,
                rings,
                self.settings,
                lambda: self,
                self.clock,  # type: ignore[arg-type]
            )
        self.policies = build_policies(self.settings.caps, self.dirty_limit)
        self.events: list[tuple[str, dict[str, Any] | None]] = []
        self.precopy = Precopy(
            self.pages, self.page_writer, self.writer, self.stats,  # type: ignore[arg-type]
            self.settings, self.clock, self.cancel, self.policies, self,
            lambda name, data: self.events.append((name, data)),
        )  # fmt: skip
        self._in_downtime = False
        self.cancel_reason: str | None = None
        self.progress: list[dict[str, Any]] = []
        self.guest_timings: dict[str, list[dict[str, float]]] = {}
        self.vcpu_cpu: dict[str, list[dict[str, float]]] = {}
        self.max_pct = 0
        self._next_sample_ms = 0.0
        self._next_cpu_ms = 0.0
        self._monitor = self.clock.timer(self._poll, "sim-monitor")

    def _charge(self, ms: float) -> None:
        """A sync's cost: the migration thread's next send starts that much later (timers
        that fire inside a sync would re-enter it, so the clock does not move here)."""
        self.page_writer.busy_ms += ms

    # --- PolicyHost ---------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.stats.status in ACTIVE_STATES

    @property
    def in_downtime(self) -> bool:
        return self._in_downtime

    @property
    def period_start_ms(self) -> float:
        return self.precopy.period_start_ms

    def force_sync(self, kind: str = SYNC_FORCED) -> bool:
        if self.stats.status != "active" or self._in_downtime:
            return False
        self.precopy.sync(kind)
        return True

    # --- the run ------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self._monitor.mod(self.clock.now_ms())
        try:
            self._setup()
            self.precopy.run()
            self._switch_over()
        except MigrationCancelled:
            self.stats.status = "cancelled"
        finally:
            self.stats.end_ms = self.clock.now_ms()
            for policy in self.policies:
                policy.on_end(self)  # type: ignore[arg-type]
            if self.dirty_limit is not None:
                self.dirty_limit.close()
            self._monitor.close()
        self._sample(force=True)
        wall_s = time.monotonic() - t0
        log.info("simulated %.1f s in %.2f s", self.clock.now_ms() / 1000, wall_s)
        return self._report(wall_s)

    def _setup(self) -> None:
        """MigrationSource._setup's order: connect, setup sync, HEADER, on_setup, periods."""
        self.clock.advance(self.model.setup_ms + 2 * self.link.latency_ms)
        self.precopy.sync()
        self.writer.send_bytes(256)  # preamble and HEADER
        self.precopy.header_sent = True
        for policy in self.policies:
            policy.on_setup(self)  # type: ignore[arg-type]
        self.precopy.start_periods()
        self.stats.setup_time_ms = self.clock.now_ms() - self.stats.start_ms
        self.stats.status = "active"

    def _switch_over(self) -> None:
        """Switchover.run's steps, with the machine's parts modelled."""
        precopy, stats = self.precopy, self.stats
        stats.status = "device"
        self._in_downtime = True
        self.page_writer.in_downtime = True
        start = self.clock.now_ms()
        self.guest.stop()
        precopy.sync()
        while not precopy.send(float("inf"), limited=False):
            pass
        m, link = self.model, self.link
        state = m.state_bytes + m.state_bytes_per_vcpu * self.hw.cpus
        self.writer.send_bytes(state)
        self.clock.advance(2 * link.latency_ms + m.dest_load_ms)  # SWITCHOVER -> LOADED
        self.clock.advance(2 * link.latency_ms)  # GO -> STARTED
        stats.downtime_ms = self.clock.now_ms() - start
        stats.ram.remaining = 0
        stats.status = "completed"

    # --- the harness's side -------------------------------------------------------------------

    def _poll(self) -> None:
        """bench/engine.py's loop body: sample, and cancel past a limit."""
        now = self.clock.now_ms()
        if self.stats.status not in ACTIVE_STATES:
            return
        self._sample()
        pct = self.stats.extra.get("cpu-throttle-percentage", 0)  # (the dirty limit has none)
        self.max_pct = max(self.max_pct, pct if isinstance(pct, int) else 0)
        s = self.scenario
        if self.cancel_reason is None and self.stats.status == "active":
            if self.stats.ram.dirty_sync_count > s.max_iters:
                self.cancel_reason = "max-iters"
            elif now > s.max_time * 1000:
                self.cancel_reason = "max-time"
            if self.cancel_reason is not None:
                log.info("%s reached at %.1f s: cancel", self.cancel_reason, now / 1000)
                self.cancel.set()
        self._monitor.mod(now + POLL_MS)

    def _sample(self, force: bool = False) -> None:
        now = self.clock.now_ms()
        if force or now >= self._next_sample_ms:
            self._next_sample_ms = now + self.model.sample_ms
            self.stats.ram.remaining = (
                self.pages.remaining_bytes() if self.stats.status != "completed" else 0
            )
            info = self.stats.to_qmp(now)
            self.progress.append(progress_sample(info, 0.0, now / 1000))
            for index, mib in enumerate(self.guest.written_mib()):
                self.guest_timings.setdefault(str(index), []).append(
                    {"t": now / 1000, "mib": int(mib)}
                )
        if force or now >= self._next_cpu_ms:
            self._next_cpu_ms = now + CPU_SAMPLE_MS
            for index, cpu_ms in enumerate(self.guest.running_ms()):
                self.vcpu_cpu.setdefault(str(index), []).append(
                    {"t": now / 1000, "cpu_ms": round(cpu_ms, 3), "tid": index}
                )

    def _report(self, wall_s: float) -> dict[str, Any]:
        stats, ram = self.stats, self.stats.ram
        status = stats.status
        return {
            "version": report.VERSION,
            "scenario": to_dict(self.scenario),
            "hardware": {
                **to_dict(self.hw),
                "vmm": "pyvmm",
                "binary": VMM,
                "vmm_version": "pyvmm sim (virtual clock)",
                "host": _host(0),
            },
            "progress_history": self.progress,
            "guest_timings": {"src": self.guest_timings, "dst": {}},
            "vcpu_cpu": {"src": self.vcpu_cpu, "dst": {}},
            "result": {
                "status": status,
                "success": status == "completed",
                "cancelled": status == "cancelled",
                "cancel_reason": self.cancel_reason if status == "cancelled" else None,
                "error": None,
                "started_at": 0.0,
                "total_time": int(stats.end_ms - stats.start_ms),
                "downtime": int(stats.downtime_ms) if status == "completed" else None,
                "dirty_syncs": ram.dirty_sync_count,
                "iteration_count": ram.iteration_count,
                "max_throttle_pcent": self.max_pct,
                "transferred_bytes": ram.transferred,
            },
            "simulation": {
                "model": model_to_dict(self.model),
                "link_mbit": round(self.link.bytes_per_ms * 8 * 1000 / 1e6, 3),
                "guest_rate_mib_s": self.hw.stress_rate or self.model.guest_rate_mib_s,
                "throttle_sleeps": self.guest.sleeps,
                "wall_s": round(wall_s, 3),
            },
        }


def lag_function(points: list[tuple[float, float]]) -> Callable[[float], float]:
    """The wake lag after a sleep: linear between the measured points, flat beyond."""
    if not points:
        return lambda _sleep_ms: 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return lambda sleep_ms: float(np.interp(sleep_ms, xs, ys))


def simulate(scenario: Scenario, hw: Hardware, model: SimModel) -> dict[str, Any]:
    return SimRun(scenario, hw, model).execute()
