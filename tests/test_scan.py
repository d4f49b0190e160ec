"""The Cython hot loops (pyvmm.dirty._scan) against plain numpy/Python references.

Every loop has a reference implementation here, written for clarity rather than speed, and
hypothesis compares the two on random inputs: empty, all-zero, all-ones, partial last words,
bitmaps dense and sparse enough to reach each of bitmap_to_pages' three loops, and fake dirty
rings with wrap-around, not-yet-dirty entries and invalid slots/offsets.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.dirty import scan

PAGE = 4096
U64 = np.uint64
MAX64 = (1 << 64) - 1
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def ref_bitmap_to_pages(bitmap: U64Array) -> U64Array:
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).astype(U64)


def ref_count_set(bitmap: U64Array) -> int:
    return int(np.unpackbits(bitmap.view(np.uint8)).sum())


def ref_set_pages(bitmap: U64Array, pages: U64Array) -> U64Array:
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    bits[pages.astype(np.intp)] = 1
    return np.packbits(bits, bitorder="little").view(U64)


def ref_zero_pages(mem: U8Array, pages: U64Array) -> U8Array:
    by_page = mem.reshape(-1, PAGE)[pages.astype(np.intp)]
    return (~by_page.any(axis=1)).astype(np.uint8)


XXH_P1 = U64(0x9E3779B185EBCA87)
XXH_P2 = U64(0xC2B2AE3D27D4EB4F)
XXH_P3 = U64(0x165667B19E3779F9)
XXH_P4 = U64(0x85EBCA77C2B2AE63)


def _rotl(x: U64Array, r: int) -> U64Array:
    return (x << U64(r)) | (x >> U64(64 - r))


def ref_page_hashes(mem: U8Array, pages: U64Array) -> U64Array:
    """xxHash64 with seed 0 of each page, vectorised over the pages (numpy wraps mod 2**64)."""
    words = mem.view("<u8").reshape(-1, PAGE // 8)[pages.astype(np.intp)]
    stripes = words.reshape(len(pages), PAGE // 32, 4)
    with np.errstate(over="ignore"):
        acc = np.empty((len(pages), 4), dtype=U64)
        acc[:] = [XXH_P1 + XXH_P2, XXH_P2, U64(0), U64(0) - XXH_P1]
        for i in range(PAGE // 32):
            acc = _rotl(acc + stripes[:, i, :] * XXH_P2, 31) * XXH_P1
        h = _rotl(acc[:, 0], 1) + _rotl(acc[:, 1], 7) + _rotl(acc[:, 2], 12) + _rotl(acc[:, 3], 18)
        for j in range(4):
            h = (h ^ (_rotl(acc[:, j] * XXH_P2, 31) * XXH_P1)) * XXH_P1 + XXH_P4
        h = h + U64(PAGE)
        h ^= h >> U64(33)
        h *= XXH_P2
        h ^= h >> U64(29)
        h *= XXH_P3
        h ^= h >> U64(32)
    return h


def ref_gather(mem: U8Array, pages: U64Array) -> U8Array:
    return mem.reshape(-1, PAGE)[pages.astype(np.intp)].ravel()


def ref_runs(pages: U64Array) -> tuple[U64Array, U64Array]:
    if len(pages) == 0:
        return np.zeros(0, U64), np.zeros(0, U64)
    breaks = np.flatnonzero(np.diff(pages.astype(np.int64)) != 1) + 1
    first = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return pages[first], (ends - first).astype(U64)


GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


def ref_harvest(
    ring: np.ndarray, fetch: int, bitmaps: list[U64Array | None], slot_pages: list[int]
) -> tuple[int, int, int]:
    """The harvest as the kernel documentation describes it, one entry at a time."""
    n = len(ring)
    harvested = invalid = 0
    while harvested < n and ring[fetch % n]["flags"] & 1:
        entry = ring[fetch % n]
        slot, offset = int(entry["slot"]) & 0xFFFF, int(entry["offset"])
        if slot < len(bitmaps) and bitmaps[slot] is not None and offset < slot_pages[slot]:
            bitmaps[slot][offset // 64] |= U64(1 << (offset % 64))
        else:
            invalid += 1
        ring[fetch % n]["flags"] = 2
        fetch = (fetch + 1) & MAX64
        harvested += 1
    return fetch, harvested, invalid


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------

DENSITIES = [0.0, 0.001, 0.005, 0.02, 0.06, 0.2, 0.5, 0.9, 1.0]


@st.composite
def bitmaps(draw: st.DrawFn, max_words: int = 400) -> U64Array:
    """Random bitmaps: raw words, or a density, optionally with a partial last word."""
    if draw(st.booleans()):
        words = draw(st.lists(st.integers(0, MAX64), max_size=40))
        return np.array(words, dtype=U64)
    nwords = draw(st.integers(0, max_words))
    density = draw(st.sampled_from(DENSITIES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bits = rng.random(nwords * 64) < density
    if nwords and draw(st.booleans()):  # a slot whose size is not a multiple of 64 pages
        bits[draw(st.integers((nwords - 1) * 64 + 1, nwords * 64)) :] = False
    return np.packbits(bits, bitorder="little").view(U64).copy()


PAGE_KINDS = ["zero", "first", "last", "middle", "random"]


def make_memory(kinds: list[str], seed: int) -> U8Array:
    """One page per kind: all zero, or zero except one byte (first/last/middle), or random."""
    rng = np.random.default_rng(seed)
    mem = np.zeros(len(kinds) * PAGE, dtype=np.uint8)
    for i, kind in enumerate(kinds):
        page = mem[i * PAGE : (i + 1) * PAGE]
        if kind == "first":
            page[0] = 1
        elif kind == "last":
            page[-1] = 0x80
        elif kind == "middle":
            page[int(rng.integers(1, PAGE - 1))] = int(rng.integers(1, 256))
        elif kind == "random":
            page[:] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    return mem


@st.composite
def memory_and_pages(draw: st.DrawFn) -> tuple[U8Array, U64Array]:
    kinds = draw(st.lists(st.sampled_from(PAGE_KINDS), min_size=1, max_size=12))
    mem = make_memory(kinds, draw(st.integers(0, 2**32 - 1)))
    pages = draw(st.lists(st.integers(0, len(kinds) - 1), max_size=30))
    return mem, np.array(pages, dtype=U64)


# ------------------------------------------------------------------------------------------
# 1-3. Bitmaps
# ------------------------------------------------------------------------------------------


@FAST
@given(bitmaps())
def test_bitmap_to_pages_matches_reference(bitmap: U64Array) -> None:
    expected = ref_bitmap_to_pages(bitmap)
    got = scan.bitmap_to_pages(bitmap)
    assert got.dtype == U64
    np.testing.assert_array_equal(got, expected)


@FAST
@given(bitmaps(), st.integers(0, 5))
def test_bitmap_to_pages_into_preallocated_out(bitmap: U64Array, spare: int) -> None:
    expected = ref_bitmap_to_pages(bitmap)
    out = np.full(len(expected) + spare, 0xDEAD, dtype=U64)
    got = scan.bitmap_to_pages(bitmap, out)
    np.testing.assert_array_equal(got, expected)
    assert np.shares_memory(got, out) or len(expected) == 0
    assert np.all(out[len(expected) :] == 0xDEAD)  # nothing written past the filled slice


@pytest.mark.parametrize("density", DENSITIES)
def test_bitmap_to_pages_each_loop_on_a_large_bitmap(density: float) -> None:
    # 4096 words: big enough that every loop (sparse, block of 4, block of 8) and the switch
    # to the exact tail loop run on many words.
    rng = np.random.default_rng(7)
    bitmap = np.packbits(rng.random(4096 * 64) < density, bitorder="little").view(U64)
    np.testing.assert_array_equal(scan.bitmap_to_pages(bitmap), ref_bitmap_to_pages(bitmap))


def test_bitmap_to_pages_edges() -> None:
    assert scan.bitmap_to_pages(np.zeros(0, U64)).shape == (0,)
    np.testing.assert_array_equal(
        scan.bitmap_to_pages(np.full(3, MAX64, dtype=U64)), np.arange(192, dtype=U64)
    )
    np.testing.assert_array_equal(
        scan.bitmap_to_pages(np.array([0, 1 << 63, 1], dtype=U64)), np.array([127, 128], U64)
    )
    readonly = np.array([5], dtype=U64)
    readonly.flags.writeable = False  # KVM's bitmap may come in read-only
    np.testing.assert_array_equal(scan.bitmap_to_pages(readonly), [0, 2])


@FAST
@given(bitmaps())
def test_count_set(bitmap: U64Array) -> None:
    assert scan.count_set(bitmap) == ref_count_set(bitmap)


@FAST
@given(bitmaps(max_words=20), st.data())
def test_set_pages(bitmap: U64Array, data: st.DataObject) -> None:
    nbits = len(bitmap) * 64
    pages = np.array(
        data.draw(st.lists(st.integers(0, max(nbits - 1, 0)), max_size=50 if nbits else 0)),
        dtype=U64,
    )
    expected = ref_set_pages(bitmap.copy(), pages)
    scan.set_pages(bitmap, pages)
    np.testing.assert_array_equal(bitmap, expected)


@FAST
@given(st.integers(0, 30), st.data())
def test_or_into_take_and_clear_or_new_into_and_not(nwords: int, data: st.DataObject) -> None:
    words = st.lists(st.integers(0, MAX64), min_size=nwords, max_size=nwords)
    a = np.array(data.draw(words), dtype=U64)
    b = np.array(data.draw(words), dtype=U64)

    dst = a.copy()
    scan.or_into(dst, b)
    np.testing.assert_array_equal(dst, a | b)

    src, dst = b.copy(), a.copy()
    moved = scan.take_and_clear(src, dst)
    assert moved == ref_count_set(b)
    np.testing.assert_array_equal(dst, a | b)
    assert not src.any()

    dst = a.copy()
    assert scan.or_new_into(dst, b) == ref_count_set(b & ~a)
    np.testing.assert_array_equal(dst, a | b)

    c = np.array(data.draw(words), dtype=U64)
    dst = np.zeros(nwords, U64)
    scan.and_not(dst, b, c)
    np.testing.assert_array_equal(dst, b & ~c)
    in_place = b.copy()
    scan.and_not(in_place, in_place, c)  # dst may be src
    np.testing.assert_array_equal(in_place, b & ~c)


# ------------------------------------------------------------------------------------------
# 4. Zero pages
# ------------------------------------------------------------------------------------------


@FAST
@given(memory_and_pages())
def test_zero_pages(case: tuple[U8Array, U64Array]) -> None:
    mem, pages = case
    expected = ref_zero_pages(mem, pages)
    out = np.full(len(pages) + 1, 7, dtype=np.uint8)
    assert scan.zero_pages(mem, pages, out) == int(expected.sum())
    np.testing.assert_array_equal(out[: len(pages)], expected)
    assert out[-1] == 7
    for k, page in enumerate(pages):
        assert scan.is_zero_page(mem, int(page)) is bool(expected[k])


def test_zero_pages_every_byte_position() -> None:
    # A single non-zero byte anywhere in the page must be seen (covers every chunk and word).
    mem = np.zeros(PAGE * PAGE, dtype=np.uint8)
    mem[np.arange(PAGE) * PAGE + np.arange(PAGE)] = 1  # page i has byte i set
    out = np.empty(PAGE, dtype=np.uint8)
    assert scan.zero_pages(mem, np.arange(PAGE, dtype=U64), out) == 0
    assert not out.any()


def test_zero_pages_accepts_bytes_mmap_and_a_partial_tail() -> None:
    data = bytes(PAGE) + b"\x01" + bytes(PAGE - 1) + b"tail"  # the 4-byte tail is no page
    with mmap.mmap(-1, len(data)) as mm:
        mm[:] = data
        for mem in (data, mm):
            out = np.empty(2, dtype=np.uint8)
            assert scan.zero_pages(mem, np.array([0, 1], U64), out) == 1
            assert list(out) == [1, 0]
        with pytest.raises(ValueError, match="page = 2"):
            scan.is_zero_page(data, 2)


# ------------------------------------------------------------------------------------------
# 5. Page hashes
# ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(memory_and_pages())
def test_page_hashes_match_reference(case: tuple[U8Array, U64Array]) -> None:
    mem, pages = case
    out = np.zeros(len(pages), dtype=U64)
    scan.page_hashes(mem, pages, out)
    np.testing.assert_array_equal(out, ref_page_hashes(mem, pages))


def test_page_hashes_are_xxh64_and_fixed() -> None:
    # Known values pin the hash across processes, machines and releases.
    mem = np.frombuffer(bytes(PAGE) + bytes(range(256)) * 16, dtype=np.uint8)
    out = np.zeros(2, dtype=U64)
    scan.page_hashes(mem, np.array([0, 1], U64), out)
    assert [int(h) for h in out] == [0xAC869B6F32D8BBDB, 0x0F6E64BE186AF6A4]
    assert int(out[1]) == xxhash.xxh64_intdigest(mem[PAGE:].tobytes())


@FAST
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=8),
    seed=st.integers(0, MAX64),
)
def test_xxh64_in_pieces_is_the_xxhash_of_the_whole(data: bytes, cuts: list, seed: int) -> None:
    # Every length class of the algorithm (< 32 bytes, stripes, 8/4/1-byte tails) and every
    # way of splitting the input into update() calls must give the published hash.
    hasher = scan.Xxh64(seed)
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        hasher.update(data[start:cut])
        start = cut
    hasher.update(memoryview(bytearray(data[start:])))
    assert hasher.intdigest() == xxhash.xxh64_intdigest(data, seed)
    assert hasher.intdigest() == hasher.intdigest()  # digest leaves the state alone


def test_xxh64_reads_guest_sized_buffers_in_place() -> None:
    rng = np.random.default_rng(5)
    mem = rng.integers(0, 256, 64 * PAGE + 17, dtype=np.uint8)
    whole = scan.Xxh64(7).update(mem).intdigest()
    assert whole == xxhash.xxh64_intdigest(mem.tobytes(), 7)
    parts = (
        scan.Xxh64(7).update(mem[:5]).update(memoryview(mem)[5 : 9 * PAGE]).update(mem[9 * PAGE :])
    )
    assert parts.intdigest() == whole
    assert scan.Xxh64().intdigest() == xxhash.xxh64_intdigest(b"")


def test_page_hashes_differ_after_any_single_bit_flip() -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, PAGE, dtype=np.uint8)
    mem = np.tile(base, 513)  # page 0 is the original, page 1 + i flips bit i*64 % 32768
    for i in range(512):
        bit = (i * 64 + i % 64) % (PAGE * 8)
        mem[(1 + i) * PAGE + bit // 8] ^= 1 << (bit % 8)
    out = np.zeros(513, dtype=U64)
    scan.page_hashes(mem, np.arange(513, dtype=U64), out)
    assert len(set(out.tolist())) == 513


# ------------------------------------------------------------------------------------------
# 6. Dirty ring
# ------------------------------------------------------------------------------------------


@st.composite
def ring_cases(draw: st.DrawFn) -> dict:
    nentries = draw(st.sampled_from([1, 2, 4, 8, 16, 64]))
    nslots = draw(st.integers(0, 4))
    slot_pages = [draw(st.integers(0, 200)) for _ in range(nslots)]
    present = [draw(st.integers(0, 9)) > 0 for _ in range(nslots)]  # None for some slots
    # Fetch indices near 0, near a multiple of nentries, and about to wrap 2**64.
    fetch = draw(st.one_of(st.integers(0, 3 * nentries), st.integers(MAX64 - 2 * nentries, MAX64)))
    ndirty = draw(st.integers(0, nentries))
    ring = np.zeros(nentries, dtype=GFN)
    # Entries that are not dirty: empty (0) or already harvested, waiting for the kernel (2).
    ring["flags"] = [draw(st.sampled_from([0, 2])) for _ in range(nentries)]
    for k in range(ndirty):
        slot = draw(st.integers(0, nslots + 1))  # nslots and nslots + 1 are unknown slots
        limit = slot_pages[slot] if slot < nslots else 10
        i = (fetch + k) % nentries
        ring[i]["slot"] = slot | (draw(st.integers(0, 1)) << 16)  # address-space bits ignored
        ring[i]["offset"] = draw(st.one_of(st.integers(0, limit + 2), st.integers(0, MAX64)))
        ring[i]["flags"] = draw(st.sampled_from([1, 1, 1, 3]))  # 3: dirty bit set, odd value
    return {
        "ring": ring,
        "fetch": fetch,
        "bitmaps": [
            np.zeros((p + 63) // 64 + draw(st.integers(0, 1)), U64) if here else None
            for p, here in zip(slot_pages, present, strict=True)
        ],
        "slot_pages": slot_pages,
        "ndirty": ndirty,
    }


@FAST
@given(ring_cases())
def test_harvest_ring_matches_reference(case: dict) -> None:
    ring, fetch, bitmaps = case["ring"], case["fetch"], case["bitmaps"]
    expected_ring = ring.copy()
    expected_maps = [None if b is None else b.copy() for b in bitmaps]
    expected = ref_harvest(expected_ring, fetch, expected_maps, case["slot_pages"])

    got = scan.harvest_ring(
        ring, len(ring), fetch, bitmaps, np.array(case["slot_pages"], dtype=U64)
    )
    assert got == expected
    assert got[1] == case["ndirty"]
    assert got[0] == (fetch + case["ndirty"]) & MAX64
    np.testing.assert_array_equal(ring, expected_ring)  # harvested entries are now RESET (2)
    for bitmap, want in zip(bitmaps, expected_maps, strict=True):
        if bitmap is not None:
            np.testing.assert_array_equal(bitmap, want)


def _kernel_push(ring: np.ndarray, index: int, slot: int, offset: int) -> None:
    entry = ring[index % len(ring)]
    entry["slot"], entry["offset"] = slot, offset
    entry["flags"] = scan.KVM_DIRTY_GFN_F_DIRTY


def test_harvest_ring_counts_only_newly_set_bits() -> None:
    """Duplicate entries and pages already dirty in the bitmap are not new (this host's KVM
    pushes duplicates; per-vCPU dirty rates count distinct pages)."""
    n = 8
    ring = np.zeros(n, dtype=GFN)
    bitmaps = [np.zeros(2, U64)]
    bitmaps[0][0] = np.uint64(1 << 5)  # page 5 was already dirty
    for k, offset in enumerate([5, 7, 7, 70, 7]):
        _kernel_push(ring, k, 0, offset)
    fresh = np.zeros(1, U64)
    assert scan.harvest_ring(ring, n, 0, bitmaps, np.array([128], U64), fresh) == (5, 5, 0)
    assert int(fresh[0]) == 2  # pages 7 and 70
    assert list(bitmaps[0]) == [(1 << 5) | (1 << 7), 1 << 6]


def test_harvest_ring_in_an_mmap_with_wraparound_and_invalid_entries() -> None:
    n = 8
    with mmap.mmap(-1, n * scan.KVM_DIRTY_GFN_SIZE) as mm:
        ring = np.frombuffer(mm, dtype=GFN)
        bitmaps = [np.zeros(2, U64), None, np.zeros(1, U64)]
        slot_pages = np.array([100, 0, 64], dtype=U64)
        # The kernel pushed 5 entries starting at 6: indices 6, 7, 0, 1, 2; 3 is empty.
        pushes = [(0, 99), (2, 63), (0, 100), (1, 0), (7, 1)]
        for k, (slot, offset) in enumerate(pushes):
            _kernel_push(ring, 6 + k, slot, offset)
        result = scan.harvest_ring(mm, n, 6, bitmaps, slot_pages)
        assert result == (11, 5, 3)  # 0/100 past the slot, slot 1 absent, slot 7 unknown
        assert list(bitmaps[0]) == [0, 1 << 35]
        assert list(bitmaps[2]) == [1 << 63]
        flags = ring["flags"].tolist()
        assert flags == [2, 2, 2, 0, 0, 0, 2, 2]
        # Nothing new: harvest stops at once and leaves fetch alone.
        assert scan.harvest_ring(mm, n, 11, bitmaps, slot_pages) == (11, 0, 0)
        del ring  # release the export so the mmap can close


def test_harvest_ring_takes_at_most_one_lap() -> None:
    n = 4
    ring = np.zeros(n, dtype=GFN)
    for k in range(n):
        _kernel_push(ring, k, 0, k)
    bitmap = np.zeros(1, U64)
    assert scan.harvest_ring(ring, n, 0, [bitmap], np.array([64], U64)) == (4, 4, 0)
    assert list(bitmap) == [0b1111]
    # A kernel that wrote over unharvested entries would be caught by the caller's soft-limit
    # check; the harvest itself never goes round twice in one call.
    ring["flags"] = 1
    assert scan.harvest_ring(ring, n, 4, [bitmap], np.array([64], U64)) == (8, 4, 0)


def test_harvest_ring_while_a_producer_thread_pushes() -> None:
    # A Python thread plays the kernel: it reuses an entry only after the harvest has marked
    # it RESET, writes slot and offset, and publishes the entry by setting flags last. The
    # harvest runs without the GIL at the same time and must see every page exactly once.
    n, npages = 64, 6000
    ring = np.zeros(n, dtype=GFN)
    flags, slots, offsets = ring["flags"], ring["slot"], ring["offset"]
    pages = np.random.default_rng(5).permutation(npages).astype(U64)
    bitmap = np.zeros(npages // 64 + 1, U64)
    deadline = time.monotonic() + 30  # a generous bound that only catches a hang

    def produce() -> None:
        for k, page in enumerate(pages):
            while flags[k % n] & scan.KVM_DIRTY_GFN_F_DIRTY:
                assert time.monotonic() < deadline, "harvest stopped consuming"
                time.sleep(0)
            slots[k % n], offsets[k % n] = 0, page
            flags[k % n] = scan.KVM_DIRTY_GFN_F_DIRTY

    producer = threading.Thread(target=produce)
    producer.start()
    fetch = harvested = 0
    while harvested < npages and time.monotonic() < deadline:
        fetch, got, invalid = scan.harvest_ring(ring, n, fetch, [bitmap], _u64(npages))
        assert invalid == 0
        harvested += got
        if got == 0:
            time.sleep(0)
    producer.join()
    assert harvested == npages
    np.testing.assert_array_equal(ref_bitmap_to_pages(bitmap), np.arange(npages, dtype=U64))


# ------------------------------------------------------------------------------------------
# 7-8. Gather and runs
# ------------------------------------------------------------------------------------------


@FAST
@given(memory_and_pages())
def test_gather_pages(case: tuple[U8Array, U64Array]) -> None:
    mem, pages = case
    out = np.full(len(pages) * PAGE + 3, 0xAA, dtype=np.uint8)
    assert scan.gather_pages(mem, pages, out) == len(pages) * PAGE
    np.testing.assert_array_equal(out[: len(pages) * PAGE], ref_gather(mem, pages))
    assert list(out[len(pages) * PAGE :]) == [0xAA] * 3


@FAST
@given(st.sets(st.one_of(st.integers(0, 300), st.integers(MAX64 - 5, MAX64)), max_size=120))
def test_pages_to_runs(page_set: set[int]) -> None:
    pages = np.array(sorted(page_set), dtype=U64)
    starts = np.zeros(len(pages), U64)
    lengths = np.zeros(len(pages), U64)
    nruns = scan.pages_to_runs(pages, starts, lengths)
    want_starts, want_lengths = ref_runs(pages)
    assert nruns == len(want_starts)
    np.testing.assert_array_equal(starts[:nruns], want_starts)
    np.testing.assert_array_equal(lengths[:nruns], want_lengths)


def test_pages_to_runs_exact_capacity() -> None:
    pages = np.array([3, 4, 5, 9, 10, 20], dtype=U64)
    starts, lengths = np.zeros(3, U64), np.zeros(3, U64)
    assert scan.pages_to_runs(pages, starts, lengths) == 3
    assert starts.tolist() == [3, 9, 20]
    assert lengths.tolist() == [3, 2, 1]


# ------------------------------------------------------------------------------------------
# Argument validation: ValueError with the bad value, before any memory is touched
# ------------------------------------------------------------------------------------------


def _u64(*values: int) -> U64Array:
    return np.array(values, dtype=U64)


MEM = np.zeros(4 * PAGE, dtype=np.uint8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: scan.bitmap_to_pages(_u64(7), np.zeros(2, U64)), "room for 2 pages"),
        (lambda: scan.bitmap_to_pages(np.zeros(2, np.uint32)), "dtype mismatch"),
        (lambda: scan.bitmap_to_pages(np.zeros(4, U64)[::2]), "not C-contiguous"),
        (lambda: scan.set_pages(np.zeros(1, U64), _u64(1, 64)), r"pages\[1\] = 64"),
        (lambda: scan.or_into(np.zeros(2, U64), np.zeros(3, U64)), "2 and 3"),
        (lambda: scan.take_and_clear(np.zeros(2, U64), np.zeros(1, U64)), "2 and 1"),
        (lambda: scan.or_new_into(np.zeros(2, U64), np.zeros(3, U64)), "2 and 3"),
        (lambda: scan.and_not(*[np.zeros(2, U64)] * 2, np.zeros(1, U64)), "mask.*2 and 1"),
        (lambda: scan.and_not(np.zeros(2, U64), *[np.zeros(4, U64)] * 2), "src.*2 and 4"),
        (lambda: scan.zero_pages(MEM, _u64(0, 4), np.zeros(2, np.uint8)), r"pages\[1\] = 4"),
        (lambda: scan.zero_pages(MEM, _u64(0, 1), np.zeros(1, np.uint8)), "2 pages"),
        (lambda: scan.is_zero_page(MEM, 4), "page = 4"),
        (lambda: scan.is_zero_page(MEM, -1), "page = -1"),
        (lambda: scan.page_hashes(MEM, _u64(9), np.zeros(1, U64)), r"pages\[0\] = 9"),
        (lambda: scan.page_hashes(MEM, _u64(0, 1), np.zeros(1, U64)), "2 pages"),
        (lambda: scan.gather_pages(MEM, _u64(0, 1), np.zeros(PAGE, np.uint8)), "2 pages"),
        (lambda: scan.gather_pages(MEM, _u64(2**63), np.zeros(PAGE, np.uint8)), "outside"),
        (lambda: scan.pages_to_runs(_u64(1, 3, 3), *[np.zeros(3, U64)] * 2), r"pages\[2\] = 3"),
        (lambda: scan.pages_to_runs(_u64(5, 2), *[np.zeros(2, U64)] * 2), "ascending"),
        (lambda: scan.pages_to_runs(_u64(1, 3), np.zeros(1, U64), np.zeros(2, U64)), "form 2"),
    ],
)
def test_bad_arguments_raise_value_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_take_and_clear_refuses_one_buffer_as_both() -> None:
    words = _u64(1, 2)
    with pytest.raises(ValueError, match="same buffer"):
        scan.take_and_clear(words, words)
    assert words.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nentries": 6}, "not a power of two"),
        ({"nentries": 0}, "not a power of two"),
        ({"nentries": 1 << 32}, "nentries"),
        ({"nentries": 8}, "ring has 64 bytes"),
        ({"fetch_index": -1}, "fetch_index = -1"),
        ({"fetch_index": 1 << 64}, "fetch_index"),
        ({"ring": bytes(64)}, "writable"),
        ({"slot_pages": _u64(64, 64)}, "slot_pages has 2 entries"),
        ({"slot_pages": _u64(65)}, r"slot_pages\[0\] = 65"),
        ({"bitmaps": [np.zeros(1, np.uint32)]}, "dtype mismatch"),
    ],
)
def test_harvest_ring_bad_arguments(kwargs: dict, message: str) -> None:
    ring = np.zeros(4, dtype=GFN)
    _kernel_push(ring, 0, 0, 1)
    args = {
        "ring": ring,
        "nentries": 4,
        "fetch_index": 0,
        "bitmaps": [np.zeros(1, U64)],
        "slot_pages": _u64(64),
    } | kwargs
    with pytest.raises(ValueError, match=message):
        scan.harvest_ring(**args)
    assert ring["flags"][0] == 1  # nothing was harvested
