"""What tools/bench_walk.py and tools/bench_curves.py hand Precopy instead of a stream:
writers that count what the walk gives them and send nothing, so a pass is the walk alone."""

from __future__ import annotations

import threading

from pyvmm.dirty.ranges import RangeTable
from pyvmm.migration.clock import WALL_CLOCK
from pyvmm.migration.dirtypages import DirtyPages
from pyvmm.migration.params import MigrationSettings
from pyvmm.migration.precopy import Precopy
from pyvmm.migration.stats import MigrationStats


class NullPageWriter:
    """Counts the pages, runs and pages read of each range table; sends nothing."""

    def __init__(self) -> None:
        self.in_downtime = False
        self.pages = self.runs = self.read = 0

    def send(self, table: RangeTable) -> int:
        self.pages += table.pages
        self.runs += table.count
        self.read += table.read_pages
        return 0


class NullWriter:
    bytes_sent = 0

    def iteration(self, number: int) -> None:
        pass


def null_precopy(pages: DirtyPages, writer: NullPageWriter) -> Precopy:
    """pyvmm's own send loop over `pages`, writing to `writer` and to no stream."""
    return Precopy(
        pages, writer, NullWriter(), MigrationStats(), MigrationSettings(), WALL_CLOCK,  # type: ignore[arg-type]
        threading.Event(), [], None, lambda name, data: None,  # type: ignore[arg-type]
    )  # fmt: skip
