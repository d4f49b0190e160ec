"""Typed entry point to the Cython hot loops of pyvmm.dirty._scan.

Import the loops from here: at run time this module re-exports the compiled functions
unchanged (no wrapper, no per-call cost); for type checkers it declares their signatures,
which a compiled module cannot provide. What each loop does and why is in docs/scan.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "BLOCK_PAGES",
    "CHUNK_PAGES",
    "KVM_DIRTY_GFN_F_DIRTY",
    "KVM_DIRTY_GFN_F_RESET",
    "KVM_DIRTY_GFN_SIZE",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "Xxh64",
    "and_not",
    "bitmap_to_pages",
    "block_summary_words",
    "cell_counts",
    "clear_blocks",
    "count_set",
    "dirty_window",
    "gather_pages",
    "harvest_ring",
    "is_zero_page",
    "or_into",
    "or_new_into",
    "page_hashes",
    "pages_to_runs",
    "ring_entry_pages",
    "ring_model_push",
    "ring_model_reap",
    "set_pages",
    "take_and_clear",
    "take_new",
    "walk_runs",
    "zero_pages",
    "zero_range",
]

if TYPE_CHECKING:
    import mmap
    from collections.abc import Sequence

    import numpy as np
    import numpy.typing as npt

    U64Array = npt.NDArray[np.uint64]
    U8Array = npt.NDArray[np.uint8]
    # Guest memory: the GuestMemory mmap, a numpy uint8 view of it, or any C-contiguous bytes.
    ReadableBuffer = bytes | bytearray | memoryview | mmap.mmap | U8Array
    WritableBytes = bytearray | memoryview | mmap.mmap | U8Array
    # The dirty ring: the vCPU fd's mmap, or any writable buffer (tests use numpy arrays).
    RingBuffer = bytearray | memoryview | mmap.mmap | npt.NDArray[np.generic]

    PAGE_SIZE: int
    PAGE_SHIFT: int
    CHUNK_PAGES: int
    BLOCK_PAGES: int
    KVM_DIRTY_GFN_F_DIRTY: int
    KVM_DIRTY_GFN_F_RESET: int
    KVM_DIRTY_GFN_SIZE: int

    def bitmap_to_pages(bitmap: U64Array, out: U64Array | None = None) -> U64Array:
        """Ascending page numbers of the set bits; fills and slices `out` if given."""

    def cell_counts(
        bitmap: U64Array, first_page: int, npages: int, pages_per_cell: int,
        out: npt.NDArray[np.uint32],
    ) -> int:  # fmt: skip
        """out[(first_page + p) // pages_per_cell] += 1 per set bit p < npages; the count."""

    def count_set(bitmap: U64Array) -> int:
        """Number of set bits."""

    def set_pages(bitmap: U64Array, pages: U64Array) -> None:
        """Set the bit of every listed page."""

    def or_into(dst: U64Array, src: U64Array) -> None:
        """dst |= src."""

    def or_new_into(dst: U64Array, src: U64Array, blocks: U64Array | None = None) -> int:
        """dst |= src; returns the number of bits that were clear in dst and set in src.
        blocks: a block summary of src; only its blocks are read."""

    def and_not(dst: U64Array, src: U64Array, mask: U64Array) -> None:
        """dst = src & ~mask (dst may be src or mask)."""

    def take_and_clear(src: U64Array, dst: U64Array, blocks: U64Array | None = None) -> int:
        """dst |= src; src = 0; returns popcount(src). blocks: a block summary of src."""

    def clear_blocks(bitmap: U64Array, blocks: U64Array) -> None:
        """Zero the words of the blocks flagged in a block summary."""

    def block_summary_words(nwords: int) -> int:
        """Words of a block summary (one bit per BLOCK_PAGES pages) for nwords words."""

    def zero_pages(mem: ReadableBuffer, pages: U64Array, out: U8Array) -> int:
        """out[k] = page pages[k] is all zero; returns how many are."""

    def is_zero_page(mem: ReadableBuffer, page: int) -> bool:
        """Whether one page is all zero."""

    def page_hashes(mem: ReadableBuffer, pages: U64Array, out: U64Array) -> None:
        """out[k] = xxHash64 (seed 0) of page pages[k]."""

    def harvest_ring(
        ring: RingBuffer,
        nentries: int,
        fetch_index: int,
        bitmaps: Sequence[U64Array | None],
        slot_pages: U64Array,
        newly_set: U64Array | None = None,
        blocks: Sequence[U64Array | None] | None = None,
    ) -> tuple[int, int, int]:
        """Harvest a vCPU dirty ring; returns (new_fetch_index, harvested, invalid).
        newly_set[0] (optional) grows by the number of bits that were clear before;
        blocks (optional, per slot) get the block of every recorded page flagged."""

    def gather_pages(mem: ReadableBuffer, pages: U64Array, out: WritableBytes) -> int:
        """Copy the listed pages back to back into out; returns bytes written."""

    def pages_to_runs(pages: U64Array, starts: U64Array, lengths: U64Array) -> int:
        """Coalesce ascending pages into (start, length) runs; returns the run count."""

    def dirty_window(
        bitmap: U64Array,
        from_word: int,
        limit_word: int,
        max_pages: int,
        populated: U8Array | None = None,
        populated_first_chunk: int = 0,
    ) -> tuple[int, int, int]:
        """(start, stop, pages): the first dirty word from from_word, and the word after the
        one where max_pages set bits are reached (both at most limit_word); with populated,
        bits of never-populated chunks do not count."""

    def walk_runs(
        bitmap: U64Array,
        start_word: int,
        stop_word: int,
        mem: ReadableBuffer | None,
        populated: U8Array | None,
        populated_first_chunk: int,
        max_pages: int,
        max_run_pages: int,
        run_first: U64Array,
        run_pages: U64Array,
        run_zero: U8Array,
    ) -> tuple[int, int, int, int, int]:
        """Take words [start_word, stop_word) into runs; returns (nruns, next_word, pages,
        zero_pages, read_pages)."""

    def zero_range(
        mem: WritableBytes,
        first: int,
        npages: int,
        populated: U8Array | None,
        populated_first_chunk: int,
    ) -> tuple[int, int]:
        """Zero pages [first, first + npages) that are not zero; returns (read, written)."""

    def take_new(bitmap: U64Array, old: U64Array, held: U64Array) -> int:
        """held |= bitmap & ~old; bitmap = old; returns the bits moved."""

    class Xxh64:
        """Streaming xxHash64 of the concatenation of the buffers given to update()."""

        def __init__(self, seed: int = 0) -> None: ...
        def update(self, data: ReadableBuffer) -> Xxh64:
            """Hash data after everything given so far (in place, GIL released)."""

        def intdigest(self) -> int:
            """The hash of everything given so far."""

    def ring_entry_pages(
        ring: RingBuffer,
        nentries: int,
        first_fetch: int,
        count: int,
        slot_first_page: U64Array,
        slot_pages: U64Array,
        out: U64Array,
    ) -> int:
        """Flat page numbers of ring entries [first_fetch, first_fetch + count) into out;
        entries naming no known page are skipped; returns how many were written."""

    def ring_model_push(
        pages: U64Array,
        armed: U64Array,
        rings: U64Array,
        fill: npt.NDArray[np.int64],
        reaped: U64Array,
        vcpu: int,
        soft_limit: int,
        reap_all_on_full: bool,
    ) -> int:
        """Push the entries a KVM ring would get for these writes; returns ring-full count."""

    def ring_model_reap(
        armed: U64Array,
        rings: U64Array,
        fill: npt.NDArray[np.int64],
        reaped: U64Array,
        vcpu: int,
    ) -> int:
        """Reap ring vcpu (-1: all); returns the entries reaped."""

else:
    from pyvmm.dirty._scan import (
        BLOCK_PAGES,
        CHUNK_PAGES,
        KVM_DIRTY_GFN_F_DIRTY,
        KVM_DIRTY_GFN_F_RESET,
        KVM_DIRTY_GFN_SIZE,
        PAGE_SHIFT,
        PAGE_SIZE,
        Xxh64,
        and_not,
        bitmap_to_pages,
        block_summary_words,
        cell_counts,
        clear_blocks,
        count_set,
        dirty_window,
        gather_pages,
        harvest_ring,
        is_zero_page,
        or_into,
        or_new_into,
        page_hashes,
        pages_to_runs,
        ring_entry_pages,
        ring_model_push,
        ring_model_reap,
        set_pages,
        take_and_clear,
        take_new,
        walk_runs,
        zero_pages,
        zero_range,
    )
