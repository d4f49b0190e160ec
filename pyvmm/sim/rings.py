"""The modelled guest's dirty rings, as the dirty limit's controller sees them.

DirtyLimitController (pyvmm/migration/convergence/dirtylimit.py) runs unchanged on this
instead of RingTracker: it reads per-vCPU entry counters (vcpu_dirty_pages), opens a view
whose syncs harvest and reset every ring, and is called at each ring-full exit
(on_ring_full, with the vCPU), where it serves the vCPU's penalty as a sleep. The rings
are real-sized counted rings (the host quirk that makes pyvmm count virtual rings does
not exist here), of --dirty-ring-size entries; the guest (guest.py) stops at each fill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyvmm.sim.guest import GuestModel, SimMachine


class SimRingView:
    def __init__(self, tracker: SimRingTracker) -> None:
        self.tracker = tracker

    def sync(self) -> int:
        guest = self.tracker.guest
        guest.advance_to(guest.clock.now_ms())
        guest.reset_rings()
        return 0

    def close(self) -> None:
        pass


class SimRingTracker:
    mode = "ring"
    virtual = False  # counted rings are the real ones

    def __init__(self, guest: GuestModel, machine: SimMachine, entries: int) -> None:
        self.guest = guest
        self.machine = machine
        self.entries = entries
        guest.ring_entries = entries
        self.on_counted_full: Callable[[int, int], None] | None = None  # virtual rings only
        self.on_ring_full: Callable[[Any], None] | None = None
        self._limit_in_service = False

    @property
    def limit_in_service(self) -> bool:
        return self._limit_in_service

    @limit_in_service.setter
    def limit_in_service(self, value: bool) -> None:
        """Ring-full exits matter (and the guest stops at them) only under a limit."""
        self._limit_in_service = value
        self.guest.ring_full = self._ring_full if value else None

    @property
    def counted_entries(self) -> int:
        return self.entries

    def use_virtual_ring(self, entries: int) -> None:
        pass  # never called: the rings are not virtual

    def open_view(self, name: str) -> SimRingView:
        return SimRingView(self)

    def vcpu_dirty_pages(self) -> list[int]:
        guest = self.guest
        guest.advance_to(guest.clock.now_ms())
        return [int(e) for e in guest.entries_total]

    def _ring_full(self, index: int) -> None:
        hook = self.on_ring_full
        if hook is not None:
            hook(self.machine.vcpus[index])
