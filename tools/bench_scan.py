"""Benchmark the Cython hot loops of pyvmm.dirty._scan against numpy and a memcpy ceiling.

Usage: python tools/bench_scan.py [--quick]

Every row shows the Cython loop, the plain numpy way of computing the same result (checked to
be equal), and the speed-up. The memcpy ceiling (numpy.copyto of a 1 GiB buffer, measured in
the same run) is the bound for the loops that stream through guest memory. Timings are the best
of several rounds, so they show what the code can do rather than scheduler noise.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pyvmm.dirty import scan
from pyvmm.dirty.ring_model import RingModel

PAGE = scan.PAGE_SIZE
GIB = 1 << 30
GUEST_64G_PAGES = 64 * GIB // PAGE  # 16 Mi pages -> 256 Ki bitmap words (2 MiB)
RING_ENTRIES = 65536
GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])

U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]


@dataclass
class Row:
    function: str
    case: str
    unit: str
    ours: float
    numpy_ref: float | None  # same unit; None when there is no reference for the row
    higher_is_better: bool

    def speedup(self) -> str:
        if self.numpy_ref is None or self.numpy_ref == 0 or self.ours == 0:
            return "-"
        ratio = self.ours / self.numpy_ref if self.higher_is_better else self.numpy_ref / self.ours
        return f"{ratio:.1f}x"


def best_seconds(
    fn: Callable[[], object], rounds: int, setup: Callable[[], object] | None = None
) -> float:
    """Best wall time of `rounds` calls of fn; `setup` runs before each call, untimed."""
    best = float("inf")
    for _ in range(rounds):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_bitmap(rng: np.random.Generator, npages: int, density: float) -> U64Array:
    bits = rng.random(npages, dtype=np.float32) < density
    return np.packbits(bits, bitorder="little").view(np.uint64)


# ------------------------------------------------------------------------------------------
# numpy references (the straightforward vectorised way; each is checked against scan)
# ------------------------------------------------------------------------------------------


def np_bitmap_to_pages(bitmap: U64Array) -> npt.NDArray[np.intp]:
    return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little"))


def np_count_set(bitmap: U64Array) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return int(np.bitwise_count(bitmap).sum())
    return int(np.unpackbits(bitmap.view(np.uint8)).sum())


def np_set_pages(bitmap: U64Array, pages: U64Array) -> None:
    np.bitwise_or.at(bitmap, pages >> np.uint64(6), np.uint64(1) << (pages & np.uint64(63)))


def np_zero_pages(mem: U8Array, pages: U64Array) -> U8Array:
    return (~mem.reshape(-1, PAGE)[pages].any(axis=1)).view(np.uint8)


def np_xxh64_pages(mem: U8Array, pages: U64Array) -> U64Array:
    """xxHash64 (seed 0) of each page, vectorised across pages."""
    p1, p2 = np.uint64(0x9E3779B185EBCA87), np.uint64(0xC2B2AE3D27D4EB4F)
    p3, p4 = np.uint64(0x165667B19E3779F9), np.uint64(0x85EBCA77C2B2AE63)

    def rotl(x: U64Array, r: int) -> U64Array:
        return (x << np.uint64(r)) | (x >> np.uint64(64 - r))

    stripes = mem.view("<u8").reshape(-1, PAGE // 8)[pages].reshape(len(pages), -1, 4)
    with np.errstate(over="ignore"):
        acc = np.empty((len(pages), 4), dtype=np.uint64)
        acc[:] = [p1 + p2, p2, 0, np.uint64(0) - p1]
        for i in range(stripes.shape[1]):
            acc = rotl(acc + stripes[:, i] * p2, 31) * p1
        h = rotl(acc[:, 0], 1) + rotl(acc[:, 1], 7) + rotl(acc[:, 2], 12) + rotl(acc[:, 3], 18)
        for j in range(4):
            h = (h ^ (rotl(acc[:, j] * p2, 31) * p1)) * p1 + p4
        h += np.uint64(PAGE)
        for shift, prime in ((33, p2), (29, p3)):
            h ^= h >> np.uint64(shift)
            h *= prime
        h ^= h >> np.uint64(32)
    return h


def np_harvest(ring: npt.NDArray[np.void], fetch: int, bitmap: U64Array) -> tuple[int, int]:
    """Vectorised harvest of a one-slot ring (no memory ordering: a throughput reference)."""
    n = len(ring)
    order = (fetch + np.arange(n)) % n
    not_dirty = (ring["flags"][order] & 1) == 0
    count = int(np.argmax(not_dirty)) if not_dirty.any() else n
    taken = order[:count]
    offsets = ring["offset"][taken]
    np_set_pages(bitmap, offsets)
    ring["flags"][taken] = scan.KVM_DIRTY_GFN_F_RESET
    return fetch + count, count


def np_gather(mem: U8Array, pages: U64Array, out: U8Array) -> None:
    np.take(mem.reshape(-1, PAGE), pages.astype(np.intp), axis=0, out=out.reshape(-1, PAGE))


def np_pages_to_runs(pages: U64Array) -> tuple[U64Array, U64Array]:
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    first = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return pages[first], (ends - first).astype(np.uint64)


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------


def run(quick: bool) -> tuple[list[Row], float]:
    rng = np.random.default_rng(2026)
    rounds = 3 if quick else 7
    mem_bytes = GIB // 4 if quick else GIB
    rows: list[Row] = []

    # memcpy ceiling: numpy.copyto of a 1 GiB buffer (both buffers touched first, so the
    # copy measures memory bandwidth and not page faults).
    src = np.zeros(GIB, dtype=np.uint8)
    dst = np.empty(GIB, dtype=np.uint8)
    src.fill(0)
    dst.fill(1)
    memcpy_gbs = GIB / best_seconds(lambda: np.copyto(dst, src), rounds) / 1e9
    rows.append(Row("numpy.copyto", "1 GiB (ceiling)", "GB/s", memcpy_gbs, None, True))

    # 1. bitmap_to_pages on a 64 GiB guest's bitmap.
    for density in (0.001, 0.01, 0.1):
        bitmap = random_bitmap(rng, GUEST_64G_PAGES, density)
        ref = np_bitmap_to_pages(bitmap)
        assert np.array_equal(scan.bitmap_to_pages(bitmap), ref)
        out = np.zeros(len(ref), dtype=np.uint64)
        ours = best_seconds(lambda b=bitmap: scan.bitmap_to_pages(b), rounds * 3)
        into = best_seconds(lambda b=bitmap, o=out: scan.bitmap_to_pages(b, o), rounds * 3)
        theirs = best_seconds(lambda b=bitmap: np_bitmap_to_pages(b), rounds)
        case = f"64 GiB guest, {density:.1%}"
        rows.append(Row("bitmap_to_pages", case, "ms", ours * 1e3, theirs * 1e3, False))
        rows.append(Row("bitmap_to_pages", case + ", out=", "ms", into * 1e3, theirs * 1e3, False))

    # 2-3. Bitmap helpers, on the 1% bitmap.
    bitmap = random_bitmap(rng, GUEST_64G_PAGES, 0.01)
    assert scan.count_set(bitmap) == np_count_set(bitmap)
    ours = best_seconds(lambda: scan.count_set(bitmap), rounds * 3)
    theirs = best_seconds(lambda: np_count_set(bitmap), rounds * 3)
    rows.append(Row("count_set", "64 GiB guest, 1%", "ms", ours * 1e3, theirs * 1e3, False))

    pages = rng.integers(0, GUEST_64G_PAGES, 1 << 20, dtype=np.uint64)
    a, b = np.zeros_like(bitmap), np.zeros_like(bitmap)
    scan.set_pages(a, pages)
    np_set_pages(b, pages)
    assert np.array_equal(a, b)
    ours = best_seconds(lambda: scan.set_pages(a, pages), rounds)
    theirs = best_seconds(lambda: np_set_pages(b, pages), rounds)
    mps = len(pages) / 1e6
    rows.append(Row("set_pages", "1 Mi random pages", "Mpages/s", mps / ours, mps / theirs, True))

    other = random_bitmap(rng, GUEST_64G_PAGES, 0.01)
    ours = best_seconds(lambda: scan.or_into(a, other), rounds * 3)
    theirs = best_seconds(lambda: np.bitwise_or(b, other, out=b), rounds * 3)
    rows.append(Row("or_into", "64 GiB guest bitmaps", "ms", ours * 1e3, theirs * 1e3, False))

    def np_take_and_clear(s: U64Array, d: U64Array) -> int:
        moved = np_count_set(s)
        np.bitwise_or(d, s, out=d)
        s.fill(0)
        return moved

    take_src = other.copy()

    def refill() -> None:
        np.copyto(take_src, other)

    ours = best_seconds(lambda: scan.take_and_clear(take_src, a), rounds * 3, refill)
    theirs = best_seconds(lambda: np_take_and_clear(take_src, b), rounds * 3, refill)
    rows.append(
        Row("take_and_clear", "64 GiB guest bitmaps", "ms", ours * 1e3, theirs * 1e3, False)
    )

    # 4. zero_pages on memory that is all zeros (every byte must be read).
    mem = src[:mem_bytes]
    all_pages = np.arange(mem_bytes // PAGE, dtype=np.uint64)
    flags = np.empty(len(all_pages), dtype=np.uint8)
    assert scan.zero_pages(mem, all_pages, flags) == len(all_pages)
    ours = best_seconds(lambda: scan.zero_pages(mem, all_pages, flags), rounds)
    theirs = best_seconds(lambda: np_zero_pages(mem, all_pages), max(2, rounds // 2))
    gb = mem_bytes / 1e9
    label = f"{mem_bytes // (1 << 20)} MiB of zeros"
    rows.append(Row("zero_pages", label, "GB/s", gb / ours, gb / theirs, True))

    # 5. page_hashes on non-zero data (xxHash64 speed does not depend on the content).
    data = dst[:mem_bytes]
    data.view(np.uint64)[:] = np.arange(mem_bytes // 8, dtype=np.uint64) * np.uint64(0x9E3779B1)
    hashes = np.empty(len(all_pages), dtype=np.uint64)
    ours = best_seconds(lambda: scan.page_hashes(data, all_pages, hashes), rounds)
    few = all_pages[: 64 * (1 << 20) // PAGE]  # numpy reference on 64 MiB: it is slow
    assert np.array_equal(np_xxh64_pages(data, few), hashes[: len(few)])
    theirs = best_seconds(lambda: np_xxh64_pages(data, few), 2)
    rows.append(
        Row(
            "page_hashes",
            label.replace("zeros", "data"),
            "GB/s",
            gb / ours,
            len(few) * PAGE / 1e9 / theirs,
            True,
        )
    )

    # 6. harvest_ring: a 65536-entry ring, all dirty, random pages of a 64 GiB slot.
    ring = np.zeros(RING_ENTRIES, dtype=GFN)
    ring["offset"] = rng.integers(0, GUEST_64G_PAGES, RING_ENTRIES, dtype=np.uint64)
    slot_pages = np.array([GUEST_64G_PAGES], dtype=np.uint64)
    ring_bitmap = np.zeros(GUEST_64G_PAGES // 64, dtype=np.uint64)
    ref_bitmap = np.zeros_like(ring_bitmap)

    def fill() -> None:
        ring["flags"] = scan.KVM_DIRTY_GFN_F_DIRTY

    fill()
    assert scan.harvest_ring(ring, RING_ENTRIES, 5, [ring_bitmap], slot_pages)[1] == RING_ENTRIES
    fill()
    assert np_harvest(ring, 5, ref_bitmap)[1] == RING_ENTRIES
    assert np.array_equal(ring_bitmap, ref_bitmap)
    ours = best_seconds(
        lambda: scan.harvest_ring(ring, RING_ENTRIES, 5, [ring_bitmap], slot_pages),
        rounds * 3,
        fill,
    )
    theirs = best_seconds(lambda: np_harvest(ring, 5, ref_bitmap), rounds * 3, fill)
    me = RING_ENTRIES / 1e6
    rows.append(
        Row("harvest_ring", "65536 entries, refilled", "M entries/s", me / ours, me / theirs, True)
    )

    # 7. gather_pages: 65536 random pages (256 MiB) out of guest memory into a send buffer.
    gather = rng.choice(mem_bytes // PAGE, 65536 if not quick else 16384, replace=False)
    gather = gather.astype(np.uint64)
    send = np.empty(len(gather) * PAGE, dtype=np.uint8)
    send.fill(0)
    check = np.empty_like(send)
    scan.gather_pages(data, gather, send)
    np_gather(data, gather, check)
    assert np.array_equal(send, check)
    ours = best_seconds(lambda: scan.gather_pages(data, gather, send), rounds)
    theirs = best_seconds(lambda: np_gather(data, gather, check), rounds)
    gb = len(send) / 1e9
    rows.append(
        Row("gather_pages", f"{len(gather)} random pages", "GB/s", gb / ours, gb / theirs, True)
    )

    # 8. pages_to_runs: the 1% dirty pages of a 64 GiB guest (mostly runs of one).
    dirty = scan.bitmap_to_pages(random_bitmap(rng, GUEST_64G_PAGES, 0.01))
    starts, lengths = np.empty_like(dirty), np.empty_like(dirty)
    nruns = scan.pages_to_runs(dirty, starts, lengths)
    ref_starts, ref_lengths = np_pages_to_runs(dirty)
    assert np.array_equal(starts[:nruns], ref_starts)
    assert np.array_equal(lengths[:nruns], ref_lengths)
    ours = best_seconds(lambda: scan.pages_to_runs(dirty, starts, lengths), rounds * 3)
    theirs = best_seconds(lambda: np_pages_to_runs(dirty), rounds * 3)
    mp = len(dirty) / 1e6
    rows.append(
        Row("pages_to_runs", f"{len(dirty)} pages (1%)", "Mpages/s", mp / ours, mp / theirs, True)
    )

    # 9. The counted rings (ring_model.py): the harvested ring's pages, then pushed into
    # modelled 4096-entry rings (reaped alone when full, as under a dirty limit).
    first, one_slot = np.zeros(1, np.uint64), np.array([GUEST_64G_PAGES], np.uint64)
    pages = np.empty(RING_ENTRIES, np.uint64)
    got = scan.ring_entry_pages(ring, RING_ENTRIES, 5, RING_ENTRIES, first, one_slot, pages)
    order = (5 + np.arange(RING_ENTRIES)) % RING_ENTRIES
    assert got == RING_ENTRIES and np.array_equal(pages, ring["offset"][order])
    ours = best_seconds(
        lambda: scan.ring_entry_pages(ring, RING_ENTRIES, 5, RING_ENTRIES, first, one_slot, pages),
        rounds * 3,
    )
    theirs = best_seconds(lambda: ring["offset"][(5 + np.arange(RING_ENTRIES)) % RING_ENTRIES], 3)
    rows.append(
        Row("ring_entry_pages", "65536 entries", "M entries/s", me / ours, me / theirs, True)
    )
    model = RingModel(1, [GUEST_64G_PAGES], 4096)
    fulls = model.push(0, pages, reap_all_on_full=False)
    distinct = len(np.unique(pages))  # random pages of 64 GiB: almost all distinct
    assert fulls == distinct // model.soft_limit  # every page an entry, one fill per 4032
    ours = best_seconds(
        lambda: model.push(0, pages, reap_all_on_full=False), rounds * 3, model.clear
    )
    rows.append(
        Row("ring_model_push", "65536 entries, 4096 ring", "M entries/s", me / ours, None, True)
    )
    return rows, memcpy_gbs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, 256 MiB buffers")
    args = parser.parse_args()

    rows, memcpy_gbs = run(args.quick)
    today = datetime.date.today().isoformat()
    print(f"pyvmm scan benchmark  {today}  {platform.node()}  {platform.processor() or ''}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}"
        f"{'  (--quick)' if args.quick else ''}"
    )
    print(f"memcpy ceiling (numpy.copyto, 1 GiB): {memcpy_gbs:.1f} GB/s\n")
    header = f"{'function':<16} {'case':<30} {'pyvmm':>10} {'numpy':>10} {'speed-up':>9}  unit"
    print(header)
    print("-" * len(header))
    for row in rows:
        ref = "-" if row.numpy_ref is None else f"{row.numpy_ref:10.3f}"
        print(
            f"{row.function:<16} {row.case:<30} {row.ours:10.3f} {ref:>10} "
            f"{row.speedup():>9}  {row.unit}"
        )


if __name__ == "__main__":
    main()
