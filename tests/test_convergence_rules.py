"""Every generation's decision rules, deterministic: pyvmm's own Precopy, policies and
timers on a VirtualClock with a model guest and link (tests/convsim.py), no sleeps.

Sources of the rules (docs/convergence.md quotes them): QEMU 1.6 arch_init.c; QEMU 9.2
migration/cpu-throttle.c and migration/ram.c; the 2024 series "migration: auto-converge
refinements for huge VM" (RFC of 9 Sep, v1 of 16 Sep, v2 of 30 Sep 2024)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from convsim import MIB, PAGE, FakeMachine, SimMigration, everything

from pyvmm.migration.clock import VirtualClock
from pyvmm.migration.convergence import build_policies
from pyvmm.migration.convergence.autoconverge import AutoConverge
from pyvmm.migration.convergence.sync import (
    BackgroundSyncWatcher,
    DirtySyncTimer,
    PeriodicThrottle,
)
from pyvmm.migration.convergence.throttle import CpuThrottle, LegacyThrottle, scheduled_flags
from pyvmm.migration.convergence.trigger import DirtyTrigger
from pyvmm.migration.params import (
    PARAMETERS,
    MigrationSettings,
    ParameterError,
    parse_cli_value,
)
from pyvmm.migration.policy import SYNC_BACKGROUND, SYNC_FORCED
from pyvmm.migration.stats import MigrationStats


def settings(**params: object) -> MigrationSettings:
    s = MigrationSettings()
    s.set_parameters({k.replace("_", "-"): v for k, v in params.items()})
    return s


# --- the 2013 mode (QEMU 1.6, arch_init.c) ----------------------------------------------------


def test_2013_trigger_needs_a_rate_from_before_the_period() -> None:
    """`s->dirty_pages_rate && ... && dirty_rate_high_cnt++ > 4`: the rate is still 0 in
    the first period, so the counter first moves in the second; the seventh fires."""
    t = DirtyTrigger(50, legacy=True)
    bad = (60 * MIB // PAGE, 100 * MIB)
    rates = [0, 1, 1, 1, 1, 1, 1, 1]
    fired = [t.evaluate(*bad, rate).fire for rate in rates]
    assert fired == [False] * 6 + [True, False]


def test_2013_fires_on_the_seventh_bad_period_of_a_migration() -> None:
    """Through the real sync path: each sync closes a >= 1 s period whose dirty bytes are
    far above half the bytes sent; the throttle switches on at the seventh."""
    pages = 64 * MIB // PAGE
    ac = AutoConverge()
    sim = SimMigration(pages, everything(pages), settings(x_auto_converge_legacy=True), [ac])
    sim.setup()
    fired_at = None
    for period in range(1, 10):
        sim.clock.advance(1500)
        sim.view.bitmaps[0].fill(0)  # the pass sent everything...
        sim.writer.bytes_sent += 8 * MIB  # ...in far less than 2 x the 64 MiB dirtied
        sim.precopy.sync()
        if ac.legacy is not None and ac.legacy.active and fired_at is None:
            fired_at = period
    assert fired_at == 7
    assert sim.stats.ram.dirty_sync_count == 10  # the setup sync and nine more


def _legacy_run(bandwidth_mib_s: int, seconds: float) -> tuple[SimMigration, AutoConverge]:
    pages = 256 * MIB // PAGE
    ac = AutoConverge()
    sim = SimMigration(
        pages, everything(pages), settings(x_auto_converge_legacy=True,
                                           max_bandwidth=bandwidth_mib_s * MIB),
        [ac], link_mib_s=1024,
    )  # fmt: skip
    sim.setup()
    assert ac.legacy is not None
    ac.legacy.start()  # as if the trigger had fired
    sim.run_for(seconds * 1000)
    return sim, ac


def test_2013_throttle_is_driven_by_the_send_loop() -> None:
    """At 64 MiB/s over a 1 GiB/s link the send loop works ~6 ms per 100 ms window and
    waits the rest; nothing is checked while it waits, so a 30 ms sleep is queued about
    once per window: ~30 % of the time asleep, not 30 of every ~41 ms (~73 %)."""
    sim, ac = _legacy_run(64, 10.0)
    assert ac.legacy is not None
    per_s = ac.legacy.kicks / 10.0
    assert 9 <= per_s <= 11, per_s
    asleep = per_s * 30 / 1000
    assert 0.27 <= asleep <= 0.33
    vcpu = sim.machine.vcpus[0]
    assert len(vcpu.queued) == ac.legacy.kicks  # one 30 ms sleep per kick, on every vCPU
    vcpu.run_pending()
    assert set(vcpu.slept_us) == {30_000}


def test_2013_throttle_unlimited_bandwidth_is_the_fixed_duty_cycle() -> None:
    """A send loop that never waits checks all the time: a kick every 41 ms (more than
    40 whole ms), 24 a second, 30 ms each: ~73 % asleep."""
    _, ac = _legacy_run(0, 10.0)
    assert ac.legacy is not None
    assert 23 <= ac.legacy.kicks / 10.0 <= 25


def test_2013_check_counts_whole_milliseconds() -> None:
    vcpus = FakeMachine(1).vcpus
    legacy = LegacyThrottle(lambda: vcpus)  # type: ignore[arg-type, return-value]
    legacy.check(0.0)  # inactive: nothing
    legacy.start()
    legacy.check(100.0)  # the first check only notes the time
    legacy.check(140.9)  # 40 ms: not more than 40
    assert legacy.kicks == 0
    legacy.check(141.0)
    assert legacy.kicks == 1 and len(vcpus[0].queued) == 1
    legacy.check(150.0)
    assert legacy.kicks == 1


# --- the throttle engine (cpu-throttle.c) ------------------------------------------------------


def test_cpu_throttle_ticks_and_sleeps_as_qemu() -> None:
    clock = VirtualClock()
    machine = FakeMachine(2)
    throttle = CpuThrottle(lambda: machine.vcpus, clock)  # type: ignore[arg-type, return-value]
    throttle.set_percentage(50)  # ticks at once: a sleep queued on each vCPU
    assert [len(v.queued) for v in machine.vcpus] == [1, 1]
    clock.advance(20.0)  # the next tick (10 ms / (1 - 0.5)): both still pending, no second
    assert [len(v.queued) for v in machine.vcpus] == [1, 1]
    for v in machine.vcpus:
        v.run_pending()
    assert [v.slept_us for v in machine.vcpus] == [[10_001], [10_001]]
    clock.advance(20.0)
    assert [len(v.queued) for v in machine.vcpus] == [1, 1]
    throttle.set_percentage(150)  # clamped to 99: a period of 1 s, 990 ms asleep
    assert throttle.percentage == 99
    for v in machine.vcpus:
        v.run_pending()
    assert machine.vcpus[0].slept_us[-1] == 990_000  # 989,999,999.99 ns + 1 ns
    throttle.stop()
    clock.advance(5000.0)
    assert [len(v.queued) for v in machine.vcpus] == [0, 0]  # no tick re-armed
    assert all(v.woken for v in machine.vcpus)


@pytest.mark.parametrize("leak", [False, True], ids=["pyvmm", "qemu-leak"])
def test_a_sleep_queued_at_stop_leaks_its_flag_only_with_the_quirk(leak: bool) -> None:
    """cpu_throttle_thread returns before clearing throttle_thread_scheduled when the
    throttle has stopped; QEMU's flag then blocks that vCPU in every later migration."""
    clock = VirtualClock()
    machine = FakeMachine(2)
    flags = scheduled_flags(machine)
    first = CpuThrottle(lambda: machine.vcpus, clock, flags, leak)  # type: ignore[arg-type, return-value]
    first.set_percentage(20)
    machine.vcpus[1].run_pending()  # vCPU 1 sleeps and clears its flag
    first.stop()  # a cancel: vCPU 0's sleep is still queued
    machine.vcpus[0].run_pending()  # runs after the stop: returns at once
    assert machine.vcpus[0].slept_us == []
    assert flags == ({0} if leak else set())
    retry = CpuThrottle(lambda: machine.vcpus, clock, scheduled_flags(machine), leak)  # type: ignore[arg-type, return-value]
    retry.set_percentage(20)
    assert len(machine.vcpus[1].queued) == 1
    assert len(machine.vcpus[0].queued) == (0 if leak else 1)  # never throttled again
    retry.stop()


# --- QEMU 9.2: the 5 s dirty-sync timer ---------------------------------------------------------


class Host:
    """A bare PolicyHost for the timers' own rules."""

    def __init__(self) -> None:
        self.clock = VirtualClock(10_000.0)
        self.stats = MigrationStats(status="active")
        self.settings = MigrationSettings()
        self.machine = FakeMachine(1)
        self.period_start_ms = self.clock.now_ms()
        self.forced: list[tuple[float, str]] = []
        self.in_downtime = False

    @property
    def active(self) -> bool:
        return self.stats.status == "active"

    def force_sync(self, kind: str = SYNC_FORCED) -> bool:
        self.forced.append((self.clock.now_ms() - 10_000.0, kind))
        self.stats.ram.dirty_sync_count += 1
        return True


def test_9_2_timer_syncs_when_no_sync_came_for_5_s() -> None:
    host = Host()
    timer = DirtySyncTimer(host)  # type: ignore[arg-type]
    host.stats.ram.dirty_sync_count = 1
    timer.start()
    host.clock.advance(5000)  # count 1: the first pass, skipped
    assert host.forced == []
    host.stats.ram.dirty_sync_count = 2  # the first pass ended
    host.clock.advance(5000)  # count moved since the previous tick: nothing
    assert host.forced == []
    host.clock.advance(5000)  # unchanged for 5 s: an ordinary sync
    assert host.forced == [(15000.0, SYNC_FORCED)]
    host.clock.advance(5000)  # its own sync moved the count... and it is noted as seen
    assert len(host.forced) == 2
    timer.stop()
    host.clock.advance(60000)
    assert len(host.forced) == 2
    timer2 = DirtySyncTimer(host)  # type: ignore[arg-type]
    timer2.prev_count = host.stats.ram.dirty_sync_count
    timer2.start()  # reset on enable (Peter Xu's fixup): no sync at the first tick
    host.clock.advance(5000)
    assert len(host.forced) == 2


# --- v1: the background sync watcher ----------------------------------------------------------


def test_v1_watcher_polls_every_second_and_syncs_after_5_s() -> None:
    host = Host()
    pct = [0]
    watcher = BackgroundSyncWatcher(host, 99, lambda: pct[0])  # type: ignore[arg-type]
    host.stats.ram.iteration_count = 1
    watcher.start()
    host.clock.advance(10_000)  # iteration count 1: the first pass, skipped
    assert host.forced == []
    host.stats.ram.iteration_count = 2  # the second iteration begins now
    host.period_start_ms = host.clock.now_ms()
    host.clock.advance(5000)  # 5 s exactly: not more than 5 s
    assert host.forced == []
    host.clock.advance(1000)
    assert host.forced == [(16_000.0, SYNC_BACKGROUND)]
    assert host.stats.ram.iteration_count == 2  # a background sync is not an iteration
    host.period_start_ms = host.clock.now_ms()  # it closed a period
    host.clock.advance(5000)
    assert len(host.forced) == 1
    host.clock.advance(1000)
    assert len(host.forced) == 2
    host.stats.ram.iteration_count = 3  # a pass ended: the count moved
    host.clock.advance(1000)  # > 5 s since the period began, but the count just changed
    assert len(host.forced) == 2
    host.clock.advance(1000)
    assert len(host.forced) == 3
    pct[0] = 99  # max-cpu-throttle: the watcher ends at its next poll
    host.clock.advance(1000)
    assert not watcher.running
    host.period_start_ms = 0.0
    host.clock.advance(60_000)
    assert len(host.forced) == 4  # the poll that saw 99 % had synced first


def test_v1_watcher_is_not_built_under_the_dirty_limit() -> None:
    policies = build_policies({"dirty-limit": True}, None)
    assert policies and not any(isinstance(p, AutoConverge) for p in policies)


def test_v1_background_sync_counts_for_the_throttle_but_queues_nothing() -> None:
    """A 16 s pass (1 GiB against 64 MiB/s): the watcher syncs every ~6 s mid-pass and the
    throttle steps on those syncs; their pages wait for the next iteration."""
    pages = 1024 * MIB // PAGE
    ac = AutoConverge()
    sim = SimMigration(pages, everything(pages),
                       settings(x_auto_converge_sync="background", max_bandwidth=64 * MIB),
                       [ac])  # fmt: skip
    sim.setup()
    sim.run_for(16_500)  # the first pass (all of RAM): iteration 2 begins at ~16 s
    ram = sim.stats.ram
    assert ram.iteration_count == 2 and sim.forced == []
    queued = sim.precopy.pages.count()
    sim.run_for(7_000)
    assert sim.forced == [SYNC_BACKGROUND]
    assert ram.iteration_count == 2 and ram.dirty_sync_count == 3
    held = sim.precopy.pages.held
    assert held is not None and int(sum(np.bitwise_count(h).sum() for h in held)) > 0
    assert sim.precopy.pages.count() < queued  # only sending shrank the queue
    assert sim.writer.iterations == [2]  # none for the setup sync (before HEADER) nor the
    # background one
    sim.run_for(30_000)
    assert ac.percentage >= 30  # steps every other background sync: ~12 s per step
    assert ram.dirty_sync_count > ram.iteration_count + 3
    sim.end()


# --- the RFC: cpu-periodic-throttle --------------------------------------------------------------


def test_rfc_periodic_throttle_waits_sleeps_and_keeps_1_s_apart() -> None:
    host = Host()
    rfc = PeriodicThrottle(host, 3)  # type: ignore[arg-type]
    host.stats.ram.iteration_count = 1
    rfc.start()
    host.clock.advance(20_000)  # iteration count <= 1: it waits
    assert host.forced == []
    host.stats.ram.iteration_count = 2
    rfc.notify()  # a sync: the count moved on, the first sleep starts
    host.period_start_ms = host.clock.now_ms() - 200
    host.clock.advance(3000)  # the interval
    assert host.forced == [(23_000.0, SYNC_BACKGROUND)]
    host.period_start_ms = 25_500.0 + 10_000.0  # an iteration sync closed a period at 25.5 s
    host.clock.advance(3000)  # wakes at 26 s: only 0.5 s since then: checks again at once
    assert len(host.forced) == 1
    host.clock.advance(500)  # 26.5 s: exactly 1 s is not more than 1 s
    assert len(host.forced) == 1
    host.clock.advance(1)
    assert host.forced[-1] == (26_501.0, SYNC_BACKGROUND)
    host.clock.advance(2999)
    assert len(host.forced) == 2
    host.clock.advance(1)  # an interval after the last sync
    assert len(host.forced) == 3
    rfc.stop()


def test_rfc_runs_with_syncs_once_per_pass() -> None:
    """With cpu-periodic-throttle, x-auto-converge-sync left at its default means one
    sync per pass: no 9.2 timer beside the RFC's thread."""
    pages = 1024 * MIB // PAGE
    ac = AutoConverge()
    sim = SimMigration(
        pages, everything(pages), settings(cpu_periodic_throttle=True, max_bandwidth=64 * MIB), [ac]
    )
    sim.setup()
    assert ac.syncer is None and ac.periodic is not None
    sim.run_for(16_500 + 5_100)
    assert sim.forced == [SYNC_BACKGROUND]
    assert sim.stats.ram.iteration_count == 2
    sim.end()


# --- parameters -----------------------------------------------------------------------------


def test_sync_generations_parameters() -> None:
    s = MigrationSettings()
    assert s["x-auto-converge-sync"] == "timer" and s.auto_converge_sync() == "timer"
    for value in ("iteration", "timer", "background"):
        s.set_parameters({"x-auto-converge-sync": value})
        assert s.auto_converge_sync() == value
    with pytest.raises(ParameterError, match=r"^Parameter 'x-auto-converge-sync' does not "
                       r"accept value 'periodic'$"):  # fmt: skip
        s.set_parameters({"x-auto-converge-sync": "periodic"})
    with pytest.raises(ParameterError, match="expected: string"):
        s.set_parameters({"x-auto-converge-sync": 1})
    assert parse_cli_value("x-auto-converge-sync", "background") == "background"
    with pytest.raises(ParameterError, match="takes one of iteration, timer, background"):
        parse_cli_value("x-auto-converge-sync", "sometimes")


def test_rfc_parameters_and_their_rules() -> None:
    s = MigrationSettings()
    assert (s["cpu-periodic-throttle"], s["cpu-periodic-throttle-interval"]) == (False, 5)
    for bad in (1, 11):
        with pytest.raises(ParameterError, match=r"^Parameter 'cpu_periodic_throttle_interval' "
                           r"expects an integer in the range of 2 to 10$"):  # fmt: skip
            s.set_parameters({"cpu-periodic-throttle-interval": bad})
    s.set_parameters({"cpu-periodic-throttle": True, "cpu-periodic-throttle-interval": 2})
    assert s.auto_converge_sync() == "iteration"  # the default: once per pass
    s.check_migrate()
    s.set_parameters({"x-auto-converge-sync": "timer"})  # explicit: refused at migrate
    with pytest.raises(ParameterError) as err:
        s.check_migrate()
    message = str(err.value)
    assert "'cpu-periodic-throttle'" in message and "'x-auto-converge-sync'" in message
    assert "\n" not in message
    s.set_parameters({"x-auto-converge-sync": "iteration"})
    s.check_migrate()
    legacy = settings(x_auto_converge_legacy=True)
    assert legacy.auto_converge_sync() == "iteration"
    legacy.set_parameters({"x-auto-converge-sync": "background"})
    with pytest.raises(ParameterError, match=r"'x-auto-converge-legacy'.*'x-auto-converge-sync'"):
        legacy.check_migrate()


def test_responsive_throttle_has_both_patch_names() -> None:
    s = MigrationSettings()
    q = s.query_parameters()
    assert q["cpu-throttle-responsive"] is False and q["cpu-responsive-throttle"] is False
    s.set_parameters({"cpu-responsive-throttle": True})  # v1's name
    q = s.query_parameters()
    assert q["cpu-throttle-responsive"] is True and q["cpu-responsive-throttle"] is True
    s.set_parameters({"cpu-throttle-responsive": False})  # v2's name
    assert s.query_parameters()["cpu-responsive-throttle"] is False
    with pytest.raises(ParameterError, match="one parameter"):
        s.set_parameters({"cpu-throttle-responsive": True, "cpu-responsive-throttle": False})


@pytest.mark.parametrize("name", ["x-cpu-throttle-periodic-sync",
                                  "x-cpu-throttle-periodic-sync-interval"])  # fmt: skip
def test_invented_periodic_sync_names_are_gone(name: str) -> None:
    assert name not in PARAMETERS
    with pytest.raises(ParameterError, match=f"^Parameter '{name}' is unexpected$"):
        MigrationSettings().set_parameters({name: True})


# --- statistics and the switchover edge ----------------------------------------------------


def test_iteration_count_is_its_own_statistic() -> None:
    stats = MigrationStats(status="active")
    stats.ram.dirty_sync_count, stats.ram.iteration_count = 7, 3
    ram = stats.to_qmp(0.0)["ram"]
    assert ram["dirty-sync-count"] == 7 and ram["iteration-count"] == 3


def test_9_2_timer_syncs_are_not_iterations() -> None:
    pages = 1024 * MIB // PAGE
    ac = AutoConverge()
    sim = SimMigration(pages, everything(pages), settings(max_bandwidth=64 * MIB), [ac])
    sim.setup()
    sim.run_for(40_000)
    ram = sim.stats.ram
    assert sim.forced and set(sim.forced) == {SYNC_FORCED}
    assert ram.dirty_sync_count == ram.iteration_count + len(sim.forced)
    assert sim.writer.iterations[-1] == ram.dirty_sync_count  # ordinary syncs: records
    sim.end()


def test_downtime_limit_0_switches_over_only_when_nothing_is_pending() -> None:
    """QEMU <= 10.0: `!pending_size || pending_size < threshold_size`; the threshold is 0
    at downtime-limit 0, so however fast the link, one dirty page keeps it iterating."""
    pages = 16 * MIB // PAGE
    dirtying = [0]

    def guest() -> np.ndarray:
        if dirtying[0] == 0:
            return np.arange(0)
        dirtying[0] -= 1
        return np.arange(1)  # one page dirtied between syncs

    sim = SimMigration(pages, guest, settings(downtime_limit=0, max_bandwidth=0))
    sim.setup()
    dirtying[0] = 3  # three more syncs find one page dirty each
    assert sim.precopy.converged(0)
    assert not sim.precopy.converged(PAGE)
    sim.precopy.run()
    assert dirtying[0] == 0  # it went on until the guest stopped dirtying
    assert sim.precopy.pages.remaining_bytes() == 0
    assert sim.page_writer.pages_sent == pages + 3
    quick = SimMigration(pages, lambda: np.arange(1), settings(max_bandwidth=0))
    quick.setup()
    quick.precopy.run()  # downtime-limit 300: one pending page fits, it switches over
    assert quick.precopy.pages.remaining_bytes() == PAGE


def test_a_steady_dirty_ratio_makes_the_responsive_throttle_step_every_period() -> None:
    """Why responsive halves a flat-out light load here and not in the series: a ratio
    that never improves fires the ratio counter between the rate counter's firings; an
    improving one never does."""

    def fired(responsive: bool, dirty_mib: Callable[[int], int]) -> list[int]:
        t = DirtyTrigger(50, responsive=responsive)
        return [
            n for n in range(1, 13) if t.evaluate(dirty_mib(n) * MIB // PAGE, 100 * MIB, 1).fire
        ]

    steady = lambda n: 200  # noqa: E731 - the whole working set, every period
    improving = lambda n: 210 - 10 * n  # noqa: E731
    assert fired(False, steady) == [2, 4, 6, 8, 10, 12]
    assert fired(True, steady) == list(range(2, 13))
    assert fired(True, improving) == fired(False, improving) == [2, 4, 6, 8, 10, 12]
