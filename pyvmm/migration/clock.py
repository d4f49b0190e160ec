"""Where the migration code gets its time and its timers from.

The pre-copy loop and the convergence policies read the time, wait and arm timers through
a Clock, never through `time` or their own threads, so that the same code runs on another
clock without change: VirtualClock is a deterministic one for tests and simulators, where
time moves only when `advance` is called and timers fire in that call, in order.

Timers follow QEMU's QEMUTimer: `mod(expire_ms)` arms (or re-arms) at an absolute time,
`delete()` disarms, and a callback that wants to run again re-arms itself. That is how
QEMU's throttle tick (cpu_throttle_timer_tick) and 9.2's dirty-sync timer work, so
pyvmm's restatements of them keep their shape.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Timer(Protocol):
    def mod(self, expire_ms: float) -> None:
        """Fire at expire_ms (the clock's time), replacing an earlier arming."""
        ...

    def delete(self) -> None:
        """Disarm (a callback already running finishes)."""
        ...

    def close(self) -> None:
        """Disarm for good and release what the timer holds (its thread): a callback still
        running that re-arms it does nothing."""
        ...


class Clock(Protocol):
    def now_ms(self) -> float:
        """Monotonic milliseconds."""
        ...

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Sleep up to timeout_s; return early (True) when event is set."""
        ...

    def timer(self, callback: Callable[[], None], name: str) -> Timer:
        """A disarmed timer that runs callback() when it expires."""
        ...


class WallTimer:
    """A timer on its own daemon thread (QEMU runs timers on its main loop)."""

    def __init__(self, callback: Callable[[], None], name: str) -> None:
        self._callback = callback
        self._name = name
        self._cond = threading.Condition()
        self._expire_ms: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def mod(self, expire_ms: float) -> None:
        with self._cond:
            if self._closed:
                return
            self._expire_ms = expire_ms
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def delete(self) -> None:
        with self._cond:
            self._expire_ms = None
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._expire_ms = None
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._expire_ms is not None:
                        left_ms = self._expire_ms - time.monotonic() * 1000
                        if left_ms <= 0:
                            self._expire_ms = None
                            break
                        self._cond.wait(left_ms / 1000)
                    else:
                        self._cond.wait()
            try:
                self._callback()
            except Exception:  # a timer thread must not die silently
                log.exception("timer %s: callback failed", self._name)


class WallClock:
    def now_ms(self) -> float:
        return time.monotonic() * 1000

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(timeout_s)

    def timer(self, callback: Callable[[], None], name: str) -> Timer:
        return WallTimer(callback, name)


WALL_CLOCK = WallClock()


class VirtualTimer:
    def __init__(self, clock: VirtualClock, callback: Callable[[], None], name: str) -> None:
        self.clock = clock
        self.callback = callback
        self.name = name
        self.expire_ms: float | None = None
        self._generation = 0  # stale heap entries are skipped
        self._closed = False

    def mod(self, expire_ms: float) -> None:
        if self._closed:
            return
        self._generation += 1
        self.expire_ms = expire_ms
        self.clock._schedule(self, expire_ms, self._generation)

    def delete(self) -> None:
        self._generation += 1
        self.expire_ms = None

    def close(self) -> None:
        self.delete()
        self._closed = True


class VirtualClock:
    """Deterministic time: it moves only in advance()/wait(); timers fire during advance(),
    in expiry order (ties in arming order), each at its own instant."""

    def __init__(self, start_ms: float = 0.0) -> None:
        self._now_ms = start_ms
        self._heap: list[tuple[float, int, int, VirtualTimer]] = []
        self._seq = itertools.count()

    def now_ms(self) -> float:
        return self._now_ms

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """A sleep moves virtual time on (firing timers) unless event is already set."""
        if event.is_set():
            return True
        self.advance(timeout_s * 1000)
        return event.is_set()

    def timer(self, callback: Callable[[], None], name: str) -> Timer:
        return VirtualTimer(self, callback, name)

    def advance(self, ms: float) -> None:
        """Move time forward by ms, firing every timer that expires on the way."""
        end = self._now_ms + ms
        while self._heap and self._heap[0][0] <= end:
            expire, _, generation, timer = heapq.heappop(self._heap)
            if generation != timer._generation:
                continue
            self._now_ms = max(self._now_ms, expire)
            timer.expire_ms = None
            timer.callback()
        self._now_ms = max(self._now_ms, end)

    def _schedule(self, timer: VirtualTimer, expire_ms: float, generation: int) -> None:
        heapq.heappush(self._heap, (expire_ms, next(self._seq), generation, timer))
