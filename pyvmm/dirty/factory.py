"""make_tracker: the dirty tracker that matches how a machine was built.

It lives apart from tracker.py so that the base class never imports its
subclasses (bitmap.py and ring.py import tracker.py, not the other way round).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmm.dirty.bitmap import BitmapTracker
from pyvmm.dirty.ring import RingTracker
from pyvmm.dirty.tracker import DirtyTracker
from pyvmm.machine.machine import Machine

if TYPE_CHECKING:
    from pyvmm.dirty.ring_quirk import RingQuirk


def make_tracker(
    machine: Machine, ring_quirk: RingQuirk | None = None, *, ring_reaper: bool = True
) -> DirtyTracker:
    """Ring mode iff the machine has dirty rings, else bitmap mode.

    ring_quirk: this host's verdict for the ring size (ring_quirk.decide); None means
    ring-full exits lose nothing. ring_reaper=False holds the reaper back, so rings are
    harvested only at syncs and ring-full exits (experiments, the probe)."""
    if machine.ring_bytes:
        lossy = ring_quirk is not None and ring_quirk.lossy
        return RingTracker(machine, lossy=lossy, reaper=ring_reaper)
    return BitmapTracker(machine)
