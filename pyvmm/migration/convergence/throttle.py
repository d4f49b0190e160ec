"""The CPU throttle engine: make every vCPU sleep a fraction of the time.

QEMU's cpu-throttle.c, restated: at p percent, a timer fires every
10 ms / (1 - p); each tick queues, on every vCPU that has no sleep pending,
a sleep of p / (1 - p) x 10 ms that runs on the vCPU's own thread in its exit
path (Vcpu.run_on_thread kicks it out of KVM_RUN). So in each period a vCPU
runs about 10 ms and sleeps the rest: asleep about p of the time. The sleep
ends early when the throttle stops, at a pause (switchover) or a stop.
p is clamped to 1..99; 0 means off.

LegacyThrottle is QEMU 1.6's (2013) fixed duty cycle: every 40 ms each vCPU
sleeps 30 ms.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pyvmm.machine.vcpu import Vcpu

log = logging.getLogger("pyvmm.convergence")

TIMESLICE_MS = 10.0
PCT_MIN, PCT_MAX = 1, 99


def _halt(
    stop: threading.Event, thread: threading.Thread | None, vcpus: Callable[[], list[Vcpu]]
) -> None:
    """Stop a throttle's timer thread and end the sleeps in progress."""
    stop.set()
    if thread is not None:
        thread.join(2)
    for vcpu in vcpus():
        vcpu.wake()


class CpuThrottle:
    def __init__(self, vcpus: Callable[[], list[Vcpu]]) -> None:
        self._vcpus = vcpus
        self._pct = 0
        self._scheduled: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def percentage(self) -> int:
        return self._pct

    def set_percentage(self, pct: int) -> None:
        pct = max(PCT_MIN, min(PCT_MAX, pct))
        self._pct = pct
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="cpu-throttle", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._pct = 0
        _halt(self._stop, self._thread, self._vcpus)
        self._thread = None

    def _run(self) -> None:
        while self._pct and not self._stop.is_set():
            p = self._pct / 100
            for vcpu in self._vcpus():
                with self._lock:
                    if vcpu.index in self._scheduled:
                        continue  # its previous sleep has not run yet
                    self._scheduled.add(vcpu.index)
                vcpu.run_on_thread(self._sleep)
            self._stop.wait(TIMESLICE_MS / (1 - p) / 1000)

    def _sleep(self, vcpu: Vcpu) -> None:
        """Runs on the vCPU's thread."""
        try:
            p = self._pct / 100
            if p > 0:
                vcpu.sleep_us(int(p / (1 - p) * TIMESLICE_MS * 1000) + 1)
        finally:
            with self._lock:
                self._scheduled.discard(vcpu.index)


class LegacyThrottle:
    """2013 auto-converge: a 30 ms sleep on every vCPU whenever 40 ms have passed."""

    SLEEP_MS = 30.0
    EVERY_MS = 40.0

    def __init__(self, vcpus: Callable[[], list[Vcpu]]) -> None:
        self._vcpus = vcpus
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = False

    def start(self) -> None:
        if self.active:
            return
        self.active = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cpu-throttle-2013", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.active = False
        _halt(self._stop, self._thread, self._vcpus)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.EVERY_MS / 1000):
            for vcpu in self._vcpus():
                vcpu.run_on_thread(self._sleep)

    def _sleep(self, vcpu: Vcpu) -> None:
        if self.active:
            vcpu.sleep_us(int(self.SLEEP_MS * 1000))
