"""Dirty-page heatmaps: each dirty sync's bitmap, downsampled to at most MAX_CELLS cells.

Guest RAM, slot after slot, is cut into `cells` equal runs of `pages_per_cell` pages (the
last may be shorter); a row gives, per cell, how many of its pages were set in the
migration's bitmap right after a sync: the pages that sync left to send. At a sync that
ends a pass (the usual kind) that is what the guest dirtied during the pass, the
writable working set of Clark et al. made visible; at 9.2's timer's sync it also holds
what the pass had not sent yet, and at a background sync (the 2024 series'), which holds
back what it found, only that. The counting is one Cython loop per slot (`cell_counts`,
dirty/_scan.pyx), never a Python loop per page.

Rows are kept compressed (zlib over little-endian uint32, then base64: an idle guest's
row is a few dozen bytes, a 4096-cell row at most 22 KiB) and read out over QMP
(`x-pyvmm-query-heatmap`, monitor/recording.py). docs/timeline.md has the format.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyvmm.dirty.scan import cell_counts

MAX_CELLS = 4096
DEFAULT_MAX_ROWS = 5000  # about 10 minutes of syncs every 100 ms; later ones are counted
ENCODING = "zlib+base64 uint32le"


def encode_cells(counts: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(counts.astype("<u4").tobytes(), 6)).decode()


def decode_cells(text: str, cells: int) -> np.ndarray:
    """The inverse of encode_cells; ValueError if the row does not hold `cells` counts."""
    try:
        raw = zlib.decompress(base64.b64decode(text, validate=True))
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"a heatmap row is not {ENCODING}: {exc}") from None
    if len(raw) != cells * 4:
        raise ValueError(f"a heatmap row holds {len(raw) // 4} cells, not {cells}")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


@dataclass
class HeatmapRow:
    sync: int  # dirty-sync-count after the sync
    t_us: float  # CLOCK_MONOTONIC microseconds
    dirty_pages: int  # pages set in the bitmap after the sync
    new_pages: int  # pages this sync added (what was not pending already)
    cells: str  # encode_cells of the per-cell counts

    def to_qmp(self) -> dict[str, Any]:
        return {
            "sync": self.sync, "t-us": round(self.t_us, 1), "dirty-pages": self.dirty_pages,
            "new-pages": self.new_pages, "cells": self.cells,
        }  # fmt: skip


class Heatmap:
    """Rows of one migration (or of anything that syncs a view): see the module docstring."""

    def __init__(
        self, slot_pages: Sequence[int], max_cells: int = MAX_CELLS,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:  # fmt: skip
        if not 1 <= max_cells <= MAX_CELLS:
            raise ValueError(f"heatmap cells {max_cells}: use 1 to {MAX_CELLS}")
        self.slot_pages = [int(n) for n in slot_pages]
        self.total_pages = sum(self.slot_pages)
        self.pages_per_cell = max(1, -(-self.total_pages // max_cells))
        self.cells = -(-self.total_pages // self.pages_per_cell)
        self.max_rows = max_rows
        self.rows: list[HeatmapRow] = []
        self.dropped = 0

    def counts(self, bitmaps: Sequence[np.ndarray]) -> np.ndarray:
        """Dirty pages per cell of these per-slot bitmaps (KVM's layout)."""
        out = np.zeros(self.cells, np.uint32)
        first = 0
        for bitmap, npages in zip(bitmaps, self.slot_pages, strict=True):
            cell_counts(bitmap, first, npages, self.pages_per_cell, out)
            first += npages
        return out

    def record(self, bitmaps: Sequence[np.ndarray], sync: int, t_us: float, new_pages: int) -> None:
        if len(self.rows) >= self.max_rows:
            self.dropped += 1
            return
        counts = self.counts(bitmaps)
        row = HeatmapRow(sync, t_us, int(counts.sum()), new_pages, encode_cells(counts))
        self.rows.append(row)

    def header(self) -> dict[str, Any]:
        return {
            "cells": self.cells, "pages-per-cell": self.pages_per_cell,
            "total-pages": self.total_pages, "page-size": 4096, "encoding": ENCODING,
            "total-rows": len(self.rows), "dropped-rows": self.dropped,
        }  # fmt: skip
