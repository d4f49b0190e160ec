#!/usr/bin/env python3
"""The migration's walk over real guests, beside the walk kernel alone and the zero test's
memory-bandwidth bound, measured in the same run.

1. A 64 GiB guest (a real VM: KVM slots, the bitmap tracker, its CLEAR ioctls), after a
   sync that found 0.1 %, 1 % or 100 % of its pages dirty (random pages): one pass of the
   real Precopy/DirtyPages walk (Precopy.send with a page writer that sends nothing)
   against walk_runs called once per slot on the same bitmap (the isolated kernel).
   "bitmap only": the walk without the zero test (every page data); "zero test": the
   dirty pages were written by the guest (4 KiB pages, no huge pages, so that 1 % stays
   655 MiB of RAM), and the walk tests each for zeros. This machine cannot populate 64 GiB,
   so 100 % is bitmap only. Goal (issue 13): the real walk within 2x of the kernel at 1 %.
2. A 16 GiB guest whose memory is all populated (zeros): the first pass of the real walk,
   which must read every page, against zero_pages and walk_runs over the same 16 GiB in
   one call each (the zero test at memory bandwidth: the faster of the two is the bound).
   Goal: within 1.2x.

Best of --rounds rounds; each round dirties the bitmap again, untimed.
Usage: python tools/bench_walk.py [--rounds 5] [--quick] [--skip-populated]
"""

from __future__ import annotations

import argparse
import io
import mmap
import os
import time
from collections.abc import Callable

import numpy as np
from nullwriter import NullPageWriter, null_precopy

from pyvmm.dirty.bitmap import BitmapTracker
from pyvmm.dirty.ranges import RangeTable
from pyvmm.dirty.scan import bitmap_to_pages, count_set, walk_runs, zero_pages
from pyvmm.dirty.tracker import DirtyView
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.machine.memory import GuestMemory
from pyvmm.migration.dirtypages import DirtyPages
from pyvmm.migration.precopy import Precopy
from pyvmm.migration.stream import MAX_RUN_PAGES

PAGE = 4096
GIB = 1 << 30


def best_s(fn: Callable[[], object], setup: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def random_bitmaps(machine: Machine, fraction: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    assert machine.memory is not None
    out = []
    for region in machine.memory.regions:
        words = region.bitmap_words()
        if fraction >= 1.0:
            bitmap = np.full(words, np.uint64(0xFFFFFFFFFFFFFFFF))
            if region.pages % 64:
                bitmap[-1] = np.uint64((1 << (region.pages % 64)) - 1)
        else:
            bits = rng.random(words * 64, dtype=np.float32) < fraction
            bits[region.pages :] = False
            bitmap = np.packbits(bits, bitorder="little").view(np.uint64).copy()
        out.append(bitmap)
    return out


class Bench:
    """A real VM (no vCPUs run) with the bitmap tracker and the migration's view."""

    def __init__(self, mem_bytes: int) -> None:
        self.machine = Machine(MachineConfig(mem_bytes, 1), SerialConsole(io.StringIO()))
        self.tracker = BitmapTracker(self.machine)
        self.view: DirtyView = self.tracker.open_view("bench", defer_clear=True)
        self.view.sync()  # INITIALLY_SET: everything reported once; start from nothing
        for slot in range(len(self.view.bitmaps)):
            self.tracker._clear(slot, 0, 1 << 62)
            self.view.bitmaps[slot].fill(0)

    @property
    def memory(self) -> GuestMemory:
        assert self.machine.memory is not None
        return self.machine.memory

    def dirty(self, bitmaps: list[np.ndarray], rearm: bool = True) -> None:
        """What a sync that found these pages leaves behind: the view's bits, and (rearm)
        the tracker's stale bits, which the walk's before_copy re-arms with CLEAR ioctls
        (KVM_CLEAR_DIRTY_LOG, the "clear" of a sync's get + clear)."""
        for slot, bitmap in enumerate(bitmaps):
            np.copyto(self.view.bitmaps[slot], bitmap)
            if rearm:
                np.copyto(self.tracker._stale[slot], bitmap)
            else:
                self.tracker._stale[slot].fill(0)

    def precopy(self, pages: DirtyPages, writer: NullPageWriter) -> Precopy:
        return null_precopy(pages, writer)

    def close(self) -> None:
        self.view.close()
        self.machine.close()


def kernel_s(bitmaps: list[np.ndarray], mems: list[object | None], rounds: int) -> float:
    """walk_runs once per slot over the whole bitmap: the isolated kernel."""
    work = [b.copy() for b in bitmaps]
    cap = max(count_set(b) for b in bitmaps) + 64
    table = RangeTable.empty(0, cap)

    def setup() -> None:
        for w, b in zip(work, bitmaps, strict=True):
            np.copyto(w, b)

    def run() -> None:
        for w, mem in zip(work, mems, strict=True):
            walk_runs(w, 0, len(w), mem, None, 0, 1 << 62, MAX_RUN_PAGES, table.first,
                      table.npages, table.zero)  # fmt: skip

    return best_s(run, setup, rounds)


def real_walk_s(bench: Bench, bitmaps: list[np.ndarray], with_memory: bool, first_pass: bool,
                rounds: int, rearm: bool = True) -> tuple[float, NullPageWriter]:  # fmt: skip
    """One pass of Precopy.send (unlimited) over DirtyPages, as the migration runs it."""
    state: dict[str, object] = {}

    def setup() -> None:
        bench.dirty(bitmaps, rearm)
        pages = DirtyPages(bench.view, bench.memory if with_memory else None)
        if not first_pass:
            pages.laps = 1  # a later pass: the walk reads what is dirty, asks nothing
        writer = NullPageWriter()
        state["writer"] = writer
        state["precopy"] = bench.precopy(pages, writer)

    def run() -> None:
        precopy = state["precopy"]
        assert isinstance(precopy, Precopy)
        while not precopy.send(float("inf"), limited=False):
            pass

    seconds = best_s(run, setup, rounds)
    writer = state["writer"]
    assert isinstance(writer, NullPageWriter)
    return seconds, writer


def write_pages(bench: Bench, bitmaps: list[np.ndarray]) -> None:
    """The guest wrote every dirty page: 4 KiB pages, not huge pages (RSS stays the dirty
    memory), one non-zero byte each."""
    for region, bitmap in zip(bench.memory.regions, bitmaps, strict=True):
        region.mm.madvise(mmap.MADV_NOHUGEPAGE)
        pages = bitmap_to_pages(bitmap).astype(np.intp)
        region.array.reshape(-1, PAGE)[pages, 100] = 1


def part_64g(rounds: int, quick: bool) -> None:
    size = (16 if quick else 64) * GIB
    print(f"\n1. a {size // GIB} GiB guest after one sync: one pass of the walk "
          "(best of %d)" % rounds)  # fmt: skip
    print("   real: Precopy.send over DirtyPages; +CLEAR: with the re-arming ioctls the walk "
          "issues (the clear of get + clear)")  # fmt: skip
    header = (f"{'dirty':>6} {'pages':>9} {'walk':>12} {'kernel ms':>10} {'real ms':>9} "
              f"{'ratio':>6} {'+CLEAR ms':>10} {'ratio':>6} "
              f"{'bitmap_to_pages ms':>19}")  # fmt: skip
    print(header)
    print("-" * len(header))
    bench = Bench(size)
    try:
        for fraction in (0.001, 0.01, 1.0):
            bitmaps = random_bitmaps(bench.machine, fraction, 13)
            npages = sum(count_set(b) for b in bitmaps)
            b2p = best_s(lambda bms=bitmaps: [bitmap_to_pages(b) for b in bms], lambda: None,
                         rounds)  # fmt: skip
            cases = [("bitmap only", False)]
            if fraction < 1.0:
                cases.append(("zero test", True))
            for label, with_mem in cases:
                if with_mem:
                    write_pages(bench, bitmaps)
                mems = [r.mm for r in bench.memory.regions] if with_mem else [None] * len(bitmaps)
                kernel = kernel_s(bitmaps, mems, rounds)
                real, writer = real_walk_s(bench, bitmaps, with_mem, False, rounds, False)
                assert writer.pages == npages, (writer.pages, npages)
                clear, _ = real_walk_s(bench, bitmaps, with_mem, False, rounds, True)
                print(f"{fraction:>6.1%} {npages:>9} {label:>12} {kernel * 1e3:>10.2f} "
                      f"{real * 1e3:>9.2f} {real / kernel:>5.2f}x {clear * 1e3:>10.2f} "
                      f"{clear / kernel:>5.2f}x {b2p * 1e3:>19.2f}")  # fmt: skip
            if fraction < 1.0:  # give the written pages back before the next case
                for region in bench.memory.regions:
                    region.mm.madvise(mmap.MADV_DONTNEED)
    finally:
        bench.close()
    print("goal: the real walk within 2x of the kernel at 1 %")


def part_16g(rounds: int, quick: bool) -> None:
    size = (2 if quick else 16) * GIB
    print(f"\n2. a {size // GIB} GiB guest, all populated with zeros: the first pass with "
          "the zero test")  # fmt: skip
    bench = Bench(size)
    try:
        t0 = time.perf_counter()
        for region in bench.memory.regions:
            region.array[::PAGE] = 0  # a write populates (with huge pages where it can)
        print(f"   populating took {time.perf_counter() - t0:.1f} s")
        mems = [r.mm for r in bench.memory.regions]
        all_pages = [np.arange(r.pages, dtype=np.uint64) for r in bench.memory.regions]
        flags = [np.empty(r.pages, np.uint8) for r in bench.memory.regions]
        bitmaps = random_bitmaps(bench.machine, 1.0, 0)
        bound = kernel = real = float("inf")
        for _ in range(rounds):  # interleaved: a drift of this shared machine hits all three
            bound = min(bound, best_s(
                lambda: [zero_pages(m, p, f) for m, p, f in zip(mems, all_pages, flags,
                                                                strict=True)],
                lambda: None, 1,
            ))  # fmt: skip
            kernel = min(kernel, kernel_s(bitmaps, mems, 1))
            seconds, writer = real_walk_s(bench, bitmaps, True, True, 1)
            real = min(real, seconds)
            assert writer.read == sum(r.pages for r in bench.memory.regions)
        gb = size / 1e9
        for label, t in (("zero_pages over all of it", bound),
                         ("walk_runs with the zero test", kernel),
                         ("the real first pass (DirtyPages)", real)):  # fmt: skip
            print(f"   {label:<38} {t * 1e3:8.1f} ms  {gb / t:5.1f} GB/s")
        # Both isolated loops read every byte once: the faster is the bandwidth bound.
        ceiling = min(bound, kernel)
        print(f"   the real first pass is {real / ceiling:.2f}x the bound, the faster of the "
              "two isolated loops (goal: 1.2x)")  # fmt: skip
    finally:
        bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="16 GiB and 2 GiB guests")
    parser.add_argument("--skip-populated", action="store_true", help="only part 1")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}")  # fmt: skip
    part_64g(args.rounds, args.quick)
    if not args.skip_populated:
        part_16g(args.rounds, args.quick)


if __name__ == "__main__":
    main()
