"""The walk (walk_runs, dirty_window, zero_range, take_new) against numpy references, and
DirtyPages over real guest memory: across the 3-4 GiB hole, at the ends of both slots,
with never-populated chunks that must not be read."""

from __future__ import annotations

import mmap
import threading

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.dirty import scan
from pyvmm.dirty.ranges import RangeTable
from pyvmm.machine.memory import GuestMemory
from pyvmm.migration.dirtypages import DirtyPages
from pyvmm.migration.stream import MAX_RUN_PAGES

PAGE = 4096
U64 = np.uint64
CHUNK = scan.CHUNK_PAGES
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]
Run = tuple[int, int, bool]


# ------------------------------------------------------------------------------------------
# numpy references
# ------------------------------------------------------------------------------------------


def ref_pages(words: U64Array, first_word: int = 0) -> npt.NDArray[np.int64]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).astype(np.int64) + first_word * 64


def ref_kinds(
    pages: npt.NDArray[np.int64], mem: U8Array | None, populated: U8Array | None
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(zero, read) per page: never-populated chunks are zero unread; otherwise the zero
    test reads the page (and without mem every page is data, unread)."""
    unpopulated = (
        populated[pages // CHUNK] == 0 if populated is not None else np.zeros(len(pages), bool)
    )
    if mem is None:
        return unpopulated, np.zeros(len(pages), bool)
    by_page = mem.reshape(-1, PAGE)
    tested_zero = ~by_page[pages].any(axis=1) if len(pages) else np.zeros(0, bool)
    return unpopulated | tested_zero, ~unpopulated


def ref_runs(pages: npt.NDArray[np.int64], zero: npt.NDArray[np.bool_], max_run: int) -> list[Run]:
    if not len(pages):
        return []
    breaks = np.flatnonzero((np.diff(pages) != 1) | (np.diff(zero.astype(np.int8)) != 0)) + 1
    runs: list[Run] = []
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(pages)], strict=True):
        first, n, z = int(pages[lo]), int(hi - lo), bool(zero[lo])
        while n:
            k = n if z else min(n, max_run)
            runs.append((first, k, z))
            first += k
            n -= k
    return runs


def ref_taken_words(
    words: U64Array, start: int, stop: int, max_pages: int, populated: U8Array | None
) -> int:
    """The word the walk stops at when run capacity is not the limit: once max_pages pages
    outside never-populated chunks are taken."""
    counts = np.bitwise_count(words[start:stop]).astype(np.int64)
    if populated is not None:
        costly = populated[np.arange(start, stop) // 8] == 1
        counts_costly = np.where(costly, counts, 0)
    else:
        counts_costly = counts
    before = np.concatenate(([0], np.cumsum(counts_costly)[:-1]))
    over = np.flatnonzero((before >= max_pages) & (counts > 0))
    return start + int(over[0]) if len(over) else stop


def walk(
    bitmap: U64Array, start: int, stop: int, mem: object, populated: U8Array | None,
    max_pages: int, max_run: int, cap: int,
) -> tuple[list[Run], int, int, int, int]:  # fmt: skip
    first, npages, zero = np.zeros(cap, U64), np.zeros(cap, U64), np.zeros(cap, np.uint8)
    n, nxt, taken, zeros, reads = scan.walk_runs(
        bitmap, start, stop, mem, populated, 0, max_pages, max_run, first, npages, zero
    )
    runs = [(int(first[i]), int(npages[i]), bool(zero[i])) for i in range(n)]
    return runs, nxt, taken, zeros, reads


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------


@st.composite
def walk_cases(draw: st.DrawFn) -> dict:
    nwords = draw(st.integers(1, 48))
    npages = nwords * 64 - draw(st.integers(0, 63))  # a slot whose last word is partial
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9, 1.0]))
    bits = rng.random(nwords * 64) < density
    bits[npages:] = False
    for page in draw(st.lists(st.sampled_from([0, 63, 64, 511, 512, npages - 1]), max_size=4)):
        if page < npages:
            bits[page] = True  # word, chunk and slot ends
    bitmap = np.packbits(bits, bitorder="little").view(U64).copy()
    mem = np.zeros(npages * PAGE, np.uint8)
    data = rng.random(npages) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    for p in np.flatnonzero(data):
        mem[p * PAGE + int(rng.integers(0, PAGE))] = int(rng.integers(1, 256))
    nchunks = (nwords + 7) // 8
    populated = None
    if draw(st.booleans()):
        # A chunk is "never populated" only if it really is all zeros (the kernel's promise).
        has_data = [mem[c * CHUNK * PAGE : (c + 1) * CHUNK * PAGE].any() for c in range(nchunks)]
        populated = np.array([1 if has or draw(st.booleans()) else 0 for has in has_data], np.uint8)
    start = draw(st.integers(0, nwords))
    stop = draw(st.integers(start, nwords))
    return {
        "bitmap": bitmap,
        "mem": mem if draw(st.booleans()) else None,
        "populated": populated,
        "start": start,
        "stop": stop,
        "max_pages": draw(st.integers(1, nwords * 64 + 1)),
        "max_run": draw(st.sampled_from([1, 3, 64, 100, MAX_RUN_PAGES])),
    }


# ------------------------------------------------------------------------------------------
# walk_runs
# ------------------------------------------------------------------------------------------


@FAST
@given(walk_cases())
def test_walk_runs_matches_the_numpy_reference(case: dict) -> None:
    bitmap, start, stop = case["bitmap"], case["start"], case["stop"]
    mem, populated = case["mem"], case["populated"]
    original = bitmap.copy()
    runs, nxt, taken, zeros, reads = walk(
        bitmap, start, stop, mem, populated, case["max_pages"], case["max_run"], 64 * 64
    )
    assert nxt == ref_taken_words(original, start, stop, case["max_pages"], populated)
    pages = ref_pages(original[start:nxt], start)
    zero, read = ref_kinds(pages, mem, populated)
    assert runs == ref_runs(pages, zero, case["max_run"])
    assert (taken, zeros, reads) == (len(pages), int(zero.sum()), int(read.sum()))
    # The taken words are cleared, nothing else is touched.
    expected = original.copy()
    expected[start:nxt] = 0
    np.testing.assert_array_equal(bitmap, expected)


@FAST
@given(walk_cases(), st.integers(1, 80))
def test_walk_runs_stops_before_a_word_that_might_not_fit(case: dict, cap: int) -> None:
    bitmap, start, stop = case["bitmap"], case["start"], case["stop"]
    original = bitmap.copy()
    runs, nxt, _, _, _ = walk(
        bitmap, start, stop, case["mem"], case["populated"], 1 << 40, case["max_run"], cap
    )
    pages = ref_pages(original[start:nxt], start)
    zero, _ = ref_kinds(pages, case["mem"], case["populated"])
    assert runs == ref_runs(pages, zero, case["max_run"])  # a prefix, exactly
    if nxt < stop:  # stopped early: the next word's bits could need more runs than left
        assert original[nxt] != 0
        assert len(runs) + int(np.bitwise_count(original[nxt])) > cap


def test_walk_runs_on_an_mmap_and_its_errors() -> None:
    with mmap.mmap(-1, 130 * PAGE) as mm:
        mm[5 * PAGE] = 1
        bitmap = np.array([0b111111, 1 << 1], U64)  # pages 0-5 and 65
        runs, nxt, taken, zeros, reads = walk(bitmap, 0, 2, mm, None, 1 << 20, 4096, 16)
        assert runs == [(0, 5, True), (5, 1, False), (65, 1, True)]
        assert (nxt, taken, zeros, reads) == (2, 7, 6, 7)
        with pytest.raises(ValueError, match="page 191 is outside mem"):
            walk(np.array([0, 0, 1 << 63], U64), 0, 3, mm, None, 1 << 20, 4096, 16)
    with pytest.raises(ValueError, match="outside the bitmap"):
        walk(np.zeros(2, U64), 1, 3, None, None, 1, 1, 4)
    with pytest.raises(ValueError, match="populated covers chunks"):
        walk(np.ones(9, U64), 0, 9, None, np.ones(1, np.uint8), 1 << 20, 1, 64)
    with pytest.raises(ValueError, match="max_run_pages"):
        walk(np.ones(1, U64), 0, 1, None, None, 1, 0, 4)


@FAST
@given(walk_cases())
def test_dirty_window(case: dict) -> None:
    bitmap, start, stop, max_pages = case["bitmap"], case["start"], case["stop"], case["max_pages"]
    populated = case["populated"]
    first, end, pages = scan.dirty_window(bitmap, start, stop, max_pages, populated, 0)
    nonzero = np.flatnonzero(bitmap[start:stop])
    assert first == (start + int(nonzero[0]) if len(nonzero) else stop)
    counts = np.bitwise_count(bitmap[first:stop]).astype(np.int64)
    if populated is not None:  # never-populated chunks are free, as in walk_runs
        counts[populated[np.arange(first, stop) // 8] == 0] = 0
    reach = np.flatnonzero(np.cumsum(counts) >= max_pages)
    assert end == (first + int(reach[0]) + 1 if len(reach) else stop)
    assert pages == int(counts[: end - first].sum())


# ------------------------------------------------------------------------------------------
# zero_range and take_new
# ------------------------------------------------------------------------------------------


@FAST
@given(st.integers(1, 3000), st.data())
def test_zero_range_reads_only_populated_chunks_and_writes_only_non_zero_pages(
    npages: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    mem = np.zeros(npages * PAGE, np.uint8)
    for p in np.flatnonzero(rng.random(npages) < 0.4):
        mem[p * PAGE + int(rng.integers(0, PAGE))] = 9
    nchunks = (npages + CHUNK - 1) // CHUNK
    has = [mem[c * CHUNK * PAGE : (c + 1) * CHUNK * PAGE].any() for c in range(nchunks)]
    populated = np.array([1 if h or data.draw(st.booleans()) else 0 for h in has], np.uint8)
    first = data.draw(st.integers(0, npages - 1))
    n = data.draw(st.integers(1, npages - first))
    pages = np.arange(first, first + n)
    by_page = mem.reshape(-1, PAGE)
    in_populated = populated[pages // CHUNK] == 1
    non_zero = by_page[pages].any(axis=1)
    before = mem.copy()
    read, written = scan.zero_range(mem, first, n, populated, 0)
    assert read == int(in_populated.sum())
    assert written == int(non_zero.sum())
    assert not mem[first * PAGE : (first + n) * PAGE].any()
    outside = np.ones(npages * PAGE, bool)
    outside[first * PAGE : (first + n) * PAGE] = False
    np.testing.assert_array_equal(mem[outside], before[outside])
    with pytest.raises(ValueError, match="outside mem"):
        scan.zero_range(mem, npages, 1, None, 0)


@FAST
@given(st.integers(0, 20), st.data())
def test_take_new_holds_what_the_sync_added(nwords: int, data: st.DataObject) -> None:
    words = st.lists(st.integers(0, 2**64 - 1), min_size=nwords, max_size=nwords)
    old = np.array(data.draw(words), U64)
    added = np.array(data.draw(words), U64)
    held0 = np.array(data.draw(words), U64)
    bitmap, held = old | added, held0.copy()
    moved = scan.take_new(bitmap, old, held)
    new = (old | added) & ~old
    assert moved == int(np.bitwise_count(new).sum())
    np.testing.assert_array_equal(bitmap, old)
    np.testing.assert_array_equal(held, held0 | new)


# ------------------------------------------------------------------------------------------
# DirtyPages over real guest memory, across the 3-4 GiB hole
# ------------------------------------------------------------------------------------------


class View:
    """The parts of a DirtyView the walk uses, over a GuestMemory's layout."""

    def __init__(self, memory: GuestMemory) -> None:
        self.bitmaps = [np.zeros(r.bitmap_words(), U64) for r in memory.regions]
        self.lock = threading.Lock()
        self.rearmed: list[tuple[int, int, int]] = []

    def before_copy(self, slot: int, first: int, npages: int, unpopulated: object = None) -> None:
        self.rearmed.append((slot, first, npages))


HOLE_GUEST = (3 << 30) + 300 * PAGE  # slot 1 holds 300 pages: its last word is partial


@pytest.fixture(scope="module")
def hole_guest() -> GuestMemory:
    memory = GuestMemory(HOLE_GUEST)
    yield memory
    memory.close()


def slot_edges(memory: GuestMemory) -> list[tuple[int, int]]:
    low, high = memory.regions[0].pages, memory.regions[1].pages
    return [(0, 0), (0, 1), (0, low - 512), (0, low - 65), (0, low - 64), (0, low - 2),
            (0, low - 1), (1, 0), (1, 1), (1, 63), (1, 64), (1, high - 1)]  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.data())
def test_dirty_pages_walk_across_the_hole_matches_the_reference(
    hole_guest: GuestMemory, data: st.DataObject
) -> None:
    memory = hole_guest
    edges = slot_edges(memory)
    dirty = data.draw(st.lists(st.sampled_from(edges), min_size=1, unique=True))
    written = data.draw(st.lists(st.sampled_from(dirty), unique=True))
    extra = data.draw(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 299)), max_size=20))
    view = View(memory)
    for slot, page in dirty + extra:
        view.bitmaps[slot][page // 64] |= U64(1 << (page % 64))
    for slot, page in written:
        memory.regions[slot].array[page * PAGE + 17] = 0xA5  # populates its 2 MiB chunk
    try:
        pages = DirtyPages(view, memory)  # type: ignore[arg-type]
        expected = [ref_pages(b) for b in view.bitmaps]
        got: list[list[Run]] = [[], []]
        max_pages = data.draw(st.sampled_from([1, 7, 64, 4096]))
        while (table := pages.take(max_pages)) is not None:
            assert isinstance(table, RangeTable) and table.count > 0
            got[table.slot].extend(table.runs())
            # Re-armed exactly what was taken, before it was read.
            slot, first, npages = view.rearmed[-1]
            assert slot == table.slot and first <= int(table.first[0])
            assert (
                int(table.first[table.count - 1] + table.npages[table.count - 1]) <= first + npages
            )
        assert pages.bulk_done and pages.count() == 0
        for slot in (0, 1):
            mem = memory.regions[slot].array
            zero, _ = ref_kinds(expected[slot], mem, None)
            merged = ref_runs(expected[slot], zero, MAX_RUN_PAGES)
            assert merge(got[slot]) == merge(merged)
            data_pages = {(slot, p) for p in expected[slot][~zero].tolist()}
            assert data_pages == {e for e in written if e[0] == slot}
    finally:
        for slot, page in written:
            memory.regions[slot].array[page * PAGE + 17] = 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.data())
def test_none_left_answers_as_count_does(hole_guest: GuestMemory, data: st.DataObject) -> None:
    """none_left() is count() == 0 wherever the cursor stands and wherever bits were set
    again behind it (a sync re-dirtying pages already sent, in either slot)."""
    view = View(hole_guest)
    edges = slot_edges(hole_guest)
    for slot, page in data.draw(st.lists(st.sampled_from(edges), unique=True)):
        view.bitmaps[slot][page // 64] |= U64(1 << (page % 64))
    pages = DirtyPages(view)  # type: ignore[arg-type]  # no memory: the bitmap alone
    for _ in range(data.draw(st.integers(0, 6))):
        assert pages.none_left() == (pages.count() == 0)
        for slot, page in data.draw(st.lists(st.sampled_from(edges), max_size=2)):
            view.bitmaps[slot][page // 64] |= U64(1 << (page % 64))
        assert pages.none_left() == (pages.count() == 0)
        pages.take(data.draw(st.sampled_from([1, 64, 4096])))
    while pages.take(4096) is not None:
        assert pages.none_left() == (pages.count() == 0)
    assert pages.none_left() and pages.count() == 0


def merge(runs: list[Run]) -> list[Run]:
    """Adjacent runs of the same kind joined (takes may cut a run anywhere)."""
    out: list[list] = []
    for first, n, zero in runs:
        if out and out[-1][2] == zero and out[-1][0] + out[-1][1] == first:
            out[-1][1] += n
        else:
            out.append([first, n, zero])
    return [tuple(r) for r in out]  # type: ignore[misc]


def test_first_pass_reads_only_populated_chunks() -> None:
    """A 6 GiB guest with 3 pages written: the first pass reads their 2 MiB chunks (a written
    page may bring a whole transparent huge page) and nothing else; later passes read
    every dirty page, populated or not."""
    memory = GuestMemory(6 << 30)
    try:
        view = View(memory)
        for bitmap, region in zip(view.bitmaps, memory.regions, strict=True):
            bitmap.fill(U64(0xFFFFFFFFFFFFFFFF))
            if region.pages % 64:
                bitmap[-1] = U64((1 << (region.pages % 64)) - 1)
        touched = [(0, 5), (0, memory.regions[0].pages - 1), (1, 12345)]
        for slot, page in touched:
            memory.regions[slot].array[page * PAGE] = 1
        pages = DirtyPages(view, memory)  # type: ignore[arg-type]
        total = read = unpopulated = data_pages = 0
        while (table := pages.take()) is not None:
            total += table.pages
            read += table.read_pages
            unpopulated += table.unpopulated_pages
            data_pages += table.data_pages
        assert total == (6 << 30) // PAGE and data_pages == 3
        # Each written page populated its chunk (a whole transparent huge page, where the
        # mapping is 2 MiB aligned; else the huge page may straddle two chunks).
        aligned = all(r.host_addr % (CHUNK * PAGE) == 0 for r in memory.regions)
        assert read == 3 * CHUNK if aligned else 3 * CHUNK <= read <= 6 * CHUNK
        assert unpopulated == total - read
        # A later pass: the walk no longer asks, it reads what is dirty.
        view.bitmaps[1][:] = U64(1)  # page 0 of every word of slot 1
        table = pages.take(1 << 30)
        assert table is not None and table.read_pages == table.pages
    finally:
        memory.close()


# ------------------------------------------------------------------------------------------
# Block summaries: a sync's passes touch only the blocks that hold bits (ring mode)
# ------------------------------------------------------------------------------------------

BLOCK_WORDS = scan.BLOCK_PAGES // 64


@st.composite
def blocked_bitmaps(draw: st.DrawFn) -> tuple[U64Array, U64Array]:
    """(bitmap, summary): bits only inside the flagged blocks, the last block partial."""
    nwords = draw(st.integers(1, 5 * BLOCK_WORDS))
    nblocks = -(-nwords // BLOCK_WORDS)
    flagged = draw(st.lists(st.booleans(), min_size=nblocks, max_size=nblocks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bitmap = rng.integers(0, 2**64, nwords, dtype=U64, endpoint=False)
    bitmap &= rng.integers(0, 2**64, nwords, dtype=U64, endpoint=False)  # sparser
    summary = np.zeros(scan.block_summary_words(nwords), U64)
    for b, on in enumerate(flagged):
        if on:
            summary[b // 64] |= U64(1 << (b % 64))
        else:
            bitmap[b * BLOCK_WORDS : (b + 1) * BLOCK_WORDS] = 0
    return bitmap, summary


@FAST
@given(blocked_bitmaps(), st.data())
def test_block_summaries_limit_the_passes_to_their_blocks(
    case: tuple[U64Array, U64Array], data: st.DataObject
) -> None:
    src, summary = case
    n = len(src)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dst0 = rng.integers(0, 2**64, n, dtype=U64, endpoint=False)
    # or_new_into and take_and_clear over the blocks give what the full passes give.
    dst = dst0.copy()
    assert scan.or_new_into(dst, src, summary) == int(np.bitwise_count(src & ~dst0).sum())
    np.testing.assert_array_equal(dst, dst0 | src)
    taken, dst = src.copy(), dst0.copy()
    assert scan.take_and_clear(taken, dst, summary) == int(np.bitwise_count(src).sum())
    np.testing.assert_array_equal(dst, dst0 | src)
    assert not taken.any()
    # clear_blocks zeroes the flagged blocks and nothing else.
    cleared = dst0.copy()
    scan.clear_blocks(cleared, summary)
    flagged_words = np.zeros(n, bool)
    for b in range(-(-n // BLOCK_WORDS)):
        if int(summary[b // 64]) >> (b % 64) & 1:
            flagged_words[b * BLOCK_WORDS : (b + 1) * BLOCK_WORDS] = True
    np.testing.assert_array_equal(cleared, np.where(flagged_words, U64(0), dst0))
    # Bits outside the flagged blocks are not looked at (the caller promises none).
    outside = src.copy()
    outside[~flagged_words] = U64(1)
    dst = np.zeros(n, U64)
    scan.or_new_into(dst, outside, summary)
    assert not dst[~flagged_words].any()
    with pytest.raises(ValueError, match="blocks has"):
        scan.or_new_into(dst, src, np.zeros(0, U64))


def test_harvest_ring_flags_the_block_of_every_page() -> None:
    gfn = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
    ring = np.zeros(8, gfn)
    offsets = [0, 4095, 4096, 64 * 4096 + 7, 70 * 4096, 9]
    ring["offset"][: len(offsets)] = offsets
    ring["flags"][: len(offsets)] = 1
    pages = 80 * 4096
    bitmap = np.zeros(pages // 64, U64)
    blocks = np.zeros(scan.block_summary_words(len(bitmap)), U64)
    _, harvested, invalid = scan.harvest_ring(
        ring, 8, 0, [bitmap], np.array([pages], U64), None, [blocks]
    )
    assert (harvested, invalid) == (len(offsets), 0)
    flagged = {b for b in range(len(blocks) * 64) if int(blocks[b // 64]) >> (b % 64) & 1}
    assert flagged == {0, 1, 64, 70}
    np.testing.assert_array_equal(ref_pages(bitmap), sorted(offsets))


# ------------------------------------------------------------------------------------------
# Bitmap mode: never-populated pages are watched through pagemap, not re-armed in KVM
# ------------------------------------------------------------------------------------------


@pytest.mark.kvm
def test_a_page_written_after_the_first_pass_parked_it_is_reported() -> None:
    """The first pass parks the INITIALLY_SET bits of never-populated chunks instead of
    clearing them in KVM (which keeps reporting them); a page the guest writes afterwards
    is populated by that write, and the next sync hands it over as dirty."""
    import io

    from pyvmm.dirty.bitmap import BitmapTracker
    from pyvmm.machine.devices import SerialConsole
    from pyvmm.machine.elf import load_pvh_image
    from pyvmm.machine.images import resolve_image
    from pyvmm.machine.machine import Machine, MachineConfig

    written = 3000
    config = MachineConfig(1 << 30, 1, f"pages={written} cpl=3")
    with Machine(config, SerialConsole(io.StringIO())) as machine:
        machine.boot(load_pvh_image(resolve_image("ringprobe")))
        memory = machine.memory
        assert memory is not None
        tracker = BitmapTracker(machine)
        if not tracker.manual_protect:
            pytest.skip("this KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (nothing to park)")
        view = tracker.open_view("migration", defer_clear=True, initially_dirty=True)
        try:
            view.sync()
            pages = DirtyPages(view, memory)  # type: ignore[arg-type]
            while not pages.bulk_done:
                assert pages.take() is not None
            parked = sum(scan.count_set(b) for b in tracker._parked)
            assert parked > 0.9 * memory.regions[0].pages  # almost all of it never populated
            assert tracker.clears <= 1  # only the chunk the image lives in was re-armed
            with view.lock:
                for bitmap in view.bitmaps:
                    bitmap.fill(0)
            machine.start()
            end = machine.wait(60)
            assert end is not None and end.code == 0, end
            view.sync()
            first_words = memory.regions[0].array.view(U64)[:: PAGE // 8]
            marked = np.flatnonzero(first_words == U64(0x52494E4750524F42))  # RINGPROB
            assert len(marked) == written
            dirty = ref_pages(view.bitmaps[0])
            assert set(marked.tolist()) <= set(dirty.tolist())
            # Woken pages are ordinary stale pages again; the rest stays parked.
            assert sum(scan.count_set(b) for b in tracker._parked) < parked
        finally:
            tracker.close()


def test_populated_queries_from_two_threads_agree_with_one() -> None:
    """A sync on one thread (parked pages) and a walk on another ask at the same time."""
    memory = GuestMemory(8 << 30)
    try:
        region = memory.regions[1]
        for gib in range(0, 5):
            for page in (0, 700, 100_000):
                region.array[(gib << 30) + page * PAGE] = 1
        expected, _ = memory.populated_chunks(1, 0, region.pages)
        assert expected is not None and 0 < expected.sum() < len(expected)
        failures: list[object] = []

        def ask() -> None:
            for _ in range(200):
                try:
                    got, _ = memory.populated_chunks(1, 0, region.pages)
                except Exception as exc:  # a torn answer may fail a check instead
                    failures.append(exc)
                    return
                if got is None or not np.array_equal(got, expected):
                    failures.append(got)

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
    finally:
        memory.close()
