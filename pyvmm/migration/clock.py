"""Where the migration code gets its time from.

The pre-copy loop and the convergence policies read the time and wait through a Clock,
never through `time` directly, so that the same code can run on another clock (a
simulator's virtual time) without change. WallClock is the real one."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> float:
        """Monotonic milliseconds."""
        ...

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Sleep up to timeout_s; return early (True) when event is set."""
        ...


class WallClock:
    def now_ms(self) -> float:
        return time.monotonic() * 1000

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(timeout_s)


WALL_CLOCK = WallClock()
