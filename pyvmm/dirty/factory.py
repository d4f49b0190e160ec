"""make_tracker: the dirty tracker that matches how a machine was built.

It lives apart from tracker.py so that the base class never imports its
subclasses (bitmap.py and ring.py import tracker.py, not the other way round).
"""

from __future__ import annotations

from pyvmm.dirty.bitmap import BitmapTracker
from pyvmm.dirty.ring import RingTracker
from pyvmm.dirty.tracker import DirtyTracker
from pyvmm.machine.machine import Machine


def make_tracker(machine: Machine) -> DirtyTracker:
    """Ring mode iff the machine has dirty rings, else bitmap mode."""
    if machine.ring_bytes:
        return RingTracker(machine)
    return BitmapTracker(machine)
