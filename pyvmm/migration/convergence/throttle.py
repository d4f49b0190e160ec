"""The CPU throttle engines: make every vCPU sleep part of the time.

CpuThrottle is QEMU's cpu-throttle.c (system/ up to 9.1, migration/ from 9.2), restated:
at p percent a timer fires every 10 ms / (1 - p) (cpu_throttle_timer_tick); each tick
queues, on every vCPU whose `throttle_thread_scheduled` flag is clear, a sleep of
p / (1 - p) x 10 ms that runs on the vCPU's own thread (cpu_throttle_thread, through
async_run_on_cpu; here Vcpu.run_on_thread, which kicks the vCPU out of KVM_RUN). So in
each period a vCPU runs about 10 ms and sleeps the rest: asleep about p of the time.
p is clamped to 1..99; 0 means off, and a tick that finds 0 does not re-arm.

QEMU's flag quirk: cpu_throttle_thread returns at once when the percentage is already 0,
*before* it clears throttle_thread_scheduled. A sleep that was queued but had not run when
the throttle stopped (cpu_throttle_stop at the end of a migration, a cancel above all)
therefore leaves that vCPU's flag set for the life of the process, and every later tick
skips it: in the next migration that vCPU is never throttled. pyvmm clears the flag on
that path, unless `x-throttle-thread-scheduled-leak` asks for QEMU's behaviour; then the
flags live per VM (scheduled_flags) as they live in QEMU's CPUState.

LegacyThrottle is QEMU 1.6's (2013, arch_init.c): no percentage; check_guest_throttling,
called from the send loop after every page, queues a 30 ms sleep on every vCPU
(mig_throttle_guest_down, mig_sleep_cpu) whenever more than 40 ms (whole milliseconds)
have passed since it last did. While the send loop waits for its rate limit nothing is
checked and nothing is queued.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

from pyvmm.machine.vcpu import Vcpu
from pyvmm.migration.clock import WALL_CLOCK, Clock

log = logging.getLogger("pyvmm.convergence")

TIMESLICE_MS = 10.0  # CPU_THROTTLE_TIMESLICE_NS
PCT_MIN, PCT_MAX = 1, 99

_SCHEDULED: weakref.WeakKeyDictionary[object, set[int]] = weakref.WeakKeyDictionary()


def scheduled_flags(vm: object) -> set[int]:
    """The throttle_thread_scheduled flags of one VM (indexes of vCPUs whose flag is set),
    kept as long as the VM lives, as QEMU keeps them in each CPUState."""
    return _SCHEDULED.setdefault(vm, set())


class CpuThrottle:
    def __init__(
        self,
        vcpus: Callable[[], list[Vcpu]],
        clock: Clock = WALL_CLOCK,
        scheduled: set[int] | None = None,
        leak_scheduled: bool = False,
    ) -> None:
        self._vcpus = vcpus
        self._clock = clock
        self._pct = 0
        self.scheduled = set() if scheduled is None else scheduled
        self.leak_scheduled = leak_scheduled
        self._lock = threading.Lock()
        self._timer = clock.timer(self._tick, "cpu-throttle")

    @property
    def percentage(self) -> int:
        return self._pct

    def set_percentage(self, pct: int) -> None:
        """cpu_throttle_set: clamp, store, and tick at once if throttling was off."""
        was_active = self._pct != 0
        self._pct = max(PCT_MIN, min(PCT_MAX, pct))
        if not was_active:
            self._tick()

    def stop(self) -> None:
        """cpu_throttle_stop, for good (a new migration makes a new CpuThrottle). pyvmm
        also ends the sleeps in progress (QEMU lets them run out unless the vCPU is
        stopped)."""
        self._pct = 0
        self._timer.close()
        for vcpu in self._vcpus():
            vcpu.wake()

    def _tick(self) -> None:
        pct = self._pct
        if not pct:
            return
        for vcpu in self._vcpus():
            with self._lock:
                if vcpu.index in self.scheduled:
                    continue  # its previous sleep has not run yet (or its flag leaked)
                self.scheduled.add(vcpu.index)
            vcpu.run_on_thread(self._sleep)
        self._timer.mod(self._clock.now_ms() + TIMESLICE_MS / (1 - pct / 100))

    def _sleep(self, vcpu: Vcpu) -> None:
        """cpu_throttle_thread, on the vCPU's thread."""
        pct = self._pct
        if not pct:
            if not self.leak_scheduled:
                with self._lock:
                    self.scheduled.discard(vcpu.index)
            return  # QEMU returns here with the flag still set
        try:
            p = pct / 100
            sleep_ns = int(p / (1 - p) * TIMESLICE_MS * 1e6 + 1)  # "+1 ns for rounding"
            vcpu.sleep_us(-(-sleep_ns // 1000))
        finally:
            with self._lock:
                self.scheduled.discard(vcpu.index)


class LegacyThrottle:
    """2013 auto-converge: a 30 ms sleep on every vCPU, queued from the send loop."""

    SLEEP_MS = 30
    EVERY_MS = 40  # fires when more than this many whole milliseconds have passed

    def __init__(self, vcpus: Callable[[], list[Vcpu]]) -> None:
        self._vcpus = vcpus
        self.active = False  # QEMU's mig_throttle_on
        self._t0_ms: float | None = None  # check_guest_throttling's static t0
        self.kicks = 0  # how many times it queued sleeps (for the log and tests)

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False
        for vcpu in self._vcpus():
            vcpu.wake()

    def check(self, now_ms: float) -> None:
        """check_guest_throttling: the first call only notes the time (QEMU's t0 is a
        static that is never reset; here it is one per migration)."""
        if not self.active:
            return
        if self._t0_ms is None:
            self._t0_ms = now_ms
            return
        if int(now_ms - self._t0_ms) > self.EVERY_MS:  # QEMU: 40 < (t1 - t0) / 1000000
            self.kicks += 1
            for vcpu in self._vcpus():  # mig_throttle_guest_down: no pending-sleep check
                vcpu.run_on_thread(self._sleep)
            self._t0_ms = now_ms

    def _sleep(self, vcpu: Vcpu) -> None:
        """mig_sleep_cpu (pyvmm skips it once the migration has ended)."""
        if self.active:
            vcpu.sleep_us(self.SLEEP_MS * 1000)
