"""Range tables: runs of pages of one memory slot, each all zero or all data.

What a walk over the dirty bitmap produces (dirty/_scan.pyx's walk_runs, docs/scan.md "The
walk") and what a page writer consumes: "which pages" handed to "the code that moves
them" as one object, in the manner of Cloud Hypervisor's MemoryRangeTable. A data run is
one iovec of guest RAM (bytes first * 4096 .. (first + npages) * 4096 of the slot); a zero
run is one record on the wire, whatever its length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class RangeTable:
    slot: int
    first: np.ndarray  # uint64: first page of each run, ascending
    npages: np.ndarray  # uint64: pages in each run
    zero: np.ndarray  # uint8: 1 if every page of the run is zero
    count: int = 0  # runs in use (the arrays may be longer)
    pages: int = 0  # pages in all runs
    zero_pages: int = 0  # pages in zero runs
    read_pages: int = 0  # pages whose memory the walk read (the zero test)
    unpopulated_pages: int = 0  # zero pages known without reading (never populated)
    words: int = 0  # bitmap words the walk went over, clean ones included

    @classmethod
    def empty(cls, slot: int, capacity: int) -> RangeTable:
        """A table with room for `capacity` runs."""
        return cls(
            slot,
            np.empty(capacity, np.uint64),
            np.empty(capacity, np.uint64),
            np.empty(capacity, np.uint8),
        )

    @property
    def data_pages(self) -> int:
        return self.pages - self.zero_pages

    def runs(self) -> Iterator[tuple[int, int, bool]]:
        """(first page, pages, is zero) of each run, as Python values."""
        n = self.count
        return zip(
            self.first[:n].tolist(),
            self.npages[:n].tolist(),
            map(bool, self.zero[:n].tolist()),
            strict=True,
        )

    def __len__(self) -> int:
        return self.count
