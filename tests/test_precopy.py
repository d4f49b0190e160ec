"""Pre-copy's decisions, deterministically: the switchover rule and its bulk-stage guard."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from pyvmm.migration.clock import WallClock
from pyvmm.migration.params import MigrationSettings
from pyvmm.migration.precopy import Precopy
from pyvmm.migration.stats import MigrationStats


@dataclass
class Pages:
    """What Precopy asks of DirtyPages for the rule."""

    bulk_done: bool
    pending_bytes: int = 0

    def remaining_bytes(self) -> int:
        return self.pending_bytes


def precopy(bulk_done: bool, bandwidth_bytes_per_ms: float, **params: object) -> Precopy:
    settings = MigrationSettings()
    settings.set_parameters(params)
    p = Precopy(
        Pages(bulk_done), None, None, MigrationStats(), settings, WallClock(),  # type: ignore[arg-type]
        threading.Event(), [], None, lambda name, data: None,  # type: ignore[arg-type]
    )  # fmt: skip
    p.bandwidth_bytes_per_ms = bandwidth_bytes_per_ms
    return p


def test_threshold_is_bandwidth_times_downtime_limit() -> None:
    p = precopy(True, 1000.0, **{"downtime-limit": 300})
    assert p.threshold_bytes() == 300_000
    assert p.converged(299_999) and not p.converged(300_000)  # QEMU <= 10.0: strictly below
    assert p.converged(0)


def test_avail_switchover_bandwidth_replaces_the_estimate() -> None:
    p = precopy(True, 1000.0, **{"downtime-limit": 100, "avail-switchover-bandwidth": 10_000_000})
    assert p.threshold_bytes() == 1_000_000


def test_downtime_limit_zero_completes_only_when_nothing_is_pending() -> None:
    p = precopy(True, 1e9, **{"downtime-limit": 0})
    assert not p.converged(4096)
    assert p.converged(0)


@pytest.mark.parametrize("during_bulk", [False, True])
def test_no_switchover_before_every_page_was_sent_once(during_bulk: bool) -> None:
    p = precopy(False, 1e9, **{"x-switchover-during-bulk": during_bulk})
    # A threshold far above what is pending: QEMU's rule would switch over at once.
    assert p.converged(64 << 20) is during_bulk
    assert p.converged(0)  # nothing pending: always
    p.pages.bulk_done = True  # type: ignore[attr-defined]
    assert p.converged(64 << 20)


class View:
    """The parts of a DirtyView the walk uses."""

    def __init__(self, words_per_slot: list[int]) -> None:
        import numpy as np

        self.bitmaps = [np.full(n, np.uint64(0xFFFFFFFFFFFFFFFF)) for n in words_per_slot]
        self.lock = threading.Lock()
        self.copied: list[tuple[int, int, int]] = []

    def before_copy(self, slot: int, first: int, npages: int) -> None:
        self.copied.append((slot, first, npages))


def test_the_bulk_stage_ends_when_the_walk_has_taken_every_page_once() -> None:
    from pyvmm.migration.dirtypages import DirtyPages

    view = View([20, 5])  # two slots (the 3-4 GiB hole splits RAM in two)
    pages = DirtyPages(view)  # type: ignore[arg-type]
    taken = 0
    while not pages.bulk_done:
        step = pages.take(512)
        assert step is not None
        taken += step.pages
    assert taken == 25 * 64 and pages.count() == 0
    assert pages.take(512) is None  # a lap with nothing left
    # Every step re-armed tracking for exactly what it took, before it was read, in order.
    assert view.copied == [(0, 0, 512), (0, 512, 512), (0, 1024, 256), (1, 0, 320)]
