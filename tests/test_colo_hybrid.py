"""Hybrid mode, deterministically: the ORBIT branch's decisions (migration/colo/hybrid.py)
and the primary's loop (migration/colo/primary.py) on a virtual clock, with the
checkpoint itself and the comparator's requests played by the test. No sleeps."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from pyvmm.migration.clock import VirtualClock
from pyvmm.migration.colo.checkpoint import FailoverRequested
from pyvmm.migration.colo.hybrid import MIN_SAMPLES, ColoTimes, HybridMode
from pyvmm.migration.colo.primary import ColoPrimary, PrimaryHooks, Triggers
from pyvmm.migration.colo.stats import CheckpointRecord, ColoStats
from pyvmm.migration.colo.status import ColoStatus
from pyvmm.migration.params import MigrationSettings

TIMES = ColoTimes(max_time_ms=2000, min_time_ms=3, passive_count=4, passive_limit_ms=400,
                  passive_time_ms=250)  # fmt: skip


def test_the_mean_is_orbits_ewma_and_nothing_is_decided_before_five_samples() -> None:
    mode = HybridMode()
    for n in range(1, MIN_SAMPLES):
        mode.record(10.0)
        assert not mode.decide(TIMES).passive, n  # 4 short checkpoints: still COLO
    assert mode.mean_ms == pytest.approx(10 * (1 - 0.7**4))
    mode.record(10.0)
    decision = mode.decide(TIMES)  # the fifth sample decides: mean 8.3 < 400
    assert decision.passive and decision.change == "to-passive"
    assert mode.passive_left == TIMES.passive_count


def test_long_checkpoints_keep_colo_mode() -> None:
    mode = HybridMode()
    for _ in range(20):
        mode.record(2000.0)
        assert not mode.decide(TIMES).passive
    # 0.7 m + 0.3 x from 0 reaches 2000 (1 - 0.7^n): above the 400 ms limit from n = 1
    assert mode.mean_ms == pytest.approx(2000 * (1 - 0.7**20))


def test_passive_count_passive_checkpoints_then_colo_with_a_reset_mean() -> None:
    mode = HybridMode()
    for _ in range(MIN_SAMPLES):
        mode.record(5.0)
    kinds = [mode.decide(TIMES)]  # to passive: checkpoint 1 of passive_count
    for _ in range(10):
        mode.record(250.0)
        kinds.append(mode.decide(TIMES))
    passive = [d.passive for d in kinds]
    # passive_count (4) passive checkpoints, then COLO with the mean and samples reset
    assert passive[:5] == [True, True, True, True, False]
    assert kinds[4].change == "to-colo"
    # after the reset: that checkpoint and 4 more are COLO without a decision; the fifth
    # sample (mean of 250 ms lengths, under the limit) sends it back to passive
    assert passive[5:9] == [False] * 4
    assert passive[9] is True and kinds[9].change == "to-passive"


def test_relax_time_and_limits() -> None:
    mode = HybridMode()
    assert mode.limit_ms(TIMES) == 2000
    assert mode.relax_ms(TIMES, 1.0, miscompare=True) == 2.0  # min-time 3 - 1
    assert mode.relax_ms(TIMES, 10.0, miscompare=True) == 0.0
    assert mode.relax_ms(TIMES, 1.0, miscompare=False) == 0.0
    mode.passive_left = 2
    assert mode.limit_ms(TIMES) == 250


def test_a_passive_count_of_zero_gives_one_passive_checkpoint_as_orbit_does() -> None:
    mode = HybridMode()
    times = ColoTimes(2000, 3, 0, 400, 250)
    for _ in range(MIN_SAMPLES):
        mode.record(5.0)
    assert mode.decide(times).passive  # ORBIT returns true with passive_count = 0
    mode.record(5.0)
    assert mode.decide(times).passive  # the mean was not reset: passive again


# --- the loop on a virtual clock -------------------------------------------------------------


class StepClock(VirtualClock):
    """A virtual clock whose wait() stops at the moment a timer sets the event (the
    comparator's requests come from timers here)."""

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        end = self.now_ms() + timeout_s * 1000
        while not event.is_set():
            due = [e for e, *_ in self._heap if e <= end]  # the next timer, if any
            step_to = min(due) if due else end
            self.advance(max(0.0, step_to - self.now_ms()))
            if step_to >= end:
                break
        return event.is_set()


@dataclass
class Ran:
    number: int
    passive: bool
    reason: str
    length_ms: float
    relax_ms: float
    at_ms: float


class FakeCheckpoint:
    """Plays checkpoint.Checkpoint: each takes duration_ms of virtual time."""

    def __init__(self, clock: StepClock, duration_ms: float, stop_after: int) -> None:
        self.clock = clock
        self.duration_ms = duration_ms
        self.stop_after = stop_after
        self.ran: list[Ran] = []
        self.secondary_vcpu_us = 0
        self.stopped = False
        self.was_running = True

    def run(self, number: int, passive: bool, reason: str, length_ms: float, relax_ms: float,
            threshold_bytes: int) -> CheckpointRecord:  # fmt: skip
        if number > self.stop_after:
            raise FailoverRequested
        self.ran.append(Ran(number, passive, reason, length_ms, relax_ms, self.clock.now_ms()))
        self.clock.advance(relax_ms + self.duration_ms)
        mode = "passive" if passive else "colo"
        return CheckpointRecord(number, mode, reason, length_ms, self.duration_ms,
                                self.duration_ms, 0, 0, 0, 0.0)  # fmt: skip


def loop(settings: dict, checkpoints: int, comparator: list[float] | None = None,
         duration_ms: float = 5.0) -> tuple[FakeCheckpoint, ColoPrimary, StepClock]:  # fmt: skip
    """Run the primary's loop until `checkpoints` are done. comparator: virtual times at
    which it asks for a checkpoint (a miscompare), each for the epoch current then; like
    the real one (pyvmm/colo/compare.py) it compares nothing while passive."""
    clock = StepClock()
    values = MigrationSettings()
    values.set_parameters(settings)
    hooks = PrimaryHooks(lambda: True, lambda running: None, lambda *a: None, lambda s: None)
    primary = ColoPrimary(
        None, None, None, None, None, values, clock, hooks, ColoStatus(), ColoStats(), None,  # type: ignore[arg-type]
    )  # fmt: skip
    fake = FakeCheckpoint(clock, duration_ms, checkpoints)
    primary.checkpoint = fake  # type: ignore[assignment]

    def miscompare() -> None:
        if not primary.mode.passive:
            primary.triggers.post("miscompare", primary.number)

    for at in comparator or []:
        clock.timer(miscompare, "comparator").mod(at)
    with pytest.raises(FailoverRequested):
        primary._loop()
    return fake, primary, clock


def test_without_a_miscompare_checkpoints_come_only_at_max_time() -> None:
    # The first check on the decision side: x-colo-max-time 2 s over 10 s.
    fake, primary, _ = loop({"x-colo-max-time": 2000}, checkpoints=5)
    assert [r.reason for r in fake.ran] == ["max-time"] * 5
    assert [r.at_ms for r in fake.ran] == [2000, 4005, 6010, 8015, 10020]
    assert all(r.length_ms == 2000 for r in fake.ran) and not any(r.passive for r in fake.ran)
    assert primary.stats.miscompares == 0


def test_x_checkpoint_delay_is_x_colo_max_time() -> None:
    fake, _, _ = loop({"x-checkpoint-delay": 300}, checkpoints=3)
    assert [r.at_ms for r in fake.ran] == [300, 605, 910]


def test_miscompares_flip_to_passive_and_deterministic_answers_bring_colo_back() -> None:
    # A miscompare every 50 ms for the first second, then none: COLO cycles of ~50 ms
    # bring the mean under 400 ms; after colo-passive-count passive checkpoints (every
    # colo-passive-time) it tries COLO again, and with only max-time cycles stays there.
    settings = {"x-colo-max-time": 1000, "colo-passive-count": 6, "colo-passive-time": 250}
    misses = [50.0 * i for i in range(1, 21)]
    fake, primary, _ = loop(settings, checkpoints=20, comparator=misses)
    kinds = ["P" if r.passive else "C" for r in fake.ran]
    reasons = [r.reason for r in fake.ran]
    # five COLO checkpoints on miscompares (lengths ~50 ms), the fifth decides: passive
    assert kinds[:4] == ["C"] * 4 and reasons[:5] == ["miscompare"] * 5
    assert kinds[4:10] == ["P"] * 6  # colo-passive-count passive checkpoints
    assert [r.reason for r in fake.ran[5:10]] == ["passive-time"] * 5
    assert all(r.length_ms == 250 for r in fake.ran[5:10])
    assert kinds[10:] == ["C"] * 10  # back to COLO, and long cycles keep it there
    assert primary.stats.miscompares >= 5
    assert primary.mode.samples == 10 and primary.mode.mean_ms > 400


def test_relax_time_after_a_fast_miscompare() -> None:
    settings = {"x-colo-max-time": 1000, "x-colo-min-time": 30}
    fake, _, _ = loop(settings, checkpoints=2, comparator=[10.0], duration_ms=5.0)
    assert fake.ran[0].reason == "miscompare"
    assert fake.ran[0].length_ms == 10 and fake.ran[0].relax_ms == 20  # 30 - 10


def test_a_request_for_an_old_epoch_is_ignored() -> None:
    triggers = Triggers()
    triggers.post("miscompare", 3)
    assert triggers.take(4) is None  # checkpoint 4 already covered it
    triggers.post("timeout", 4)
    assert triggers.take(4) == "timeout"
