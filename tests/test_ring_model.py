"""What QEMU's dirty rings would count (pyvmm/dirty/ring_model.py), fed page sequences.

QEMU's per-vCPU dirty rate is the number of ring entries reaped for the vCPU
(kvm_dirty_ring_reap_one: cpu->dirty_pages += count), and a page written again after its
ring was reaped is a new entry. These tests feed the model writes in order, as the real
rings report them, and reap it where QEMU would; no VM, no sleeps. The last ones compare
the dirty limit's decisions (adjust_throttle) on entry counts with the decisions the old
distinct-page counts led to.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from pyvmm.dirty.ring_model import RingModel
from pyvmm.dirty.scan import ring_entry_pages, ring_model_push
from pyvmm.migration.convergence.dirtylimit import RingFullTime, adjust_throttle, vcpu_rates

U64 = np.uint64
MIB_PAGES = 256  # 4 KiB pages per MiB


def pages(*ranges: range) -> np.ndarray:
    return np.concatenate([np.arange(r.start, r.stop, r.step or 1, dtype=U64) for r in ranges])


def test_an_entry_per_first_write_since_the_page_was_reaped() -> None:
    model = RingModel(1, [1024], 256)  # soft limit 192
    assert model.push(0, pages(range(10), range(10), range(5)), reap_all_on_full=False) == 0
    assert model.dirty_pages() == [0]  # counted when reaped, as cpu->dirty_pages
    assert model.reap(0) == 10
    assert model.dirty_pages() == [10]
    model.push(0, pages(range(5), range(5)), reap_all_on_full=False)
    model.reap(None)
    assert model.dirty_pages() == [15]  # rewritten after the reap: new entries


def test_a_page_another_vcpu_already_dirtied_is_no_entry() -> None:
    """Write protection is per page: whoever writes it first after a reap gets the entry."""
    model = RingModel(2, [512], 256)
    model.push(1, pages(range(100)), reap_all_on_full=False)
    model.push(0, pages(range(50, 150)), reap_all_on_full=False)
    model.reap(None)
    assert model.dirty_pages() == [50, 100]


def test_a_full_ring_is_reaped_alone_under_a_limit_and_with_the_others_without() -> None:
    for limited, other in ((True, 0), (False, 7)):
        model = RingModel(2, [4096], 256)  # soft limit 192
        model.push(1, pages(range(3000, 3007)), reap_all_on_full=not limited)
        fulls = model.push(0, pages(range(200)), reap_all_on_full=not limited)
        assert fulls == 1 and model.fulls == [1, 0]
        assert model.dirty_pages() == [192, other]  # kvm_cpu_exec: reap(cpu) or reap(NULL)
        assert int(model.fill[0]) == 8


def test_a_hot_set_larger_than_the_ring_counts_every_write() -> None:
    """The issue's case: a 4096-entry ring (16 MiB), a vCPU rewriting a 24 MiB hot set. Every
    write comes after the ring that held the page's last entry was reaped, so each counts."""
    hot = 24 * MIB_PAGES
    model = RingModel(1, [64 * MIB_PAGES], 4096)
    writes = 4 * hot
    seq = pages(range(hot))
    fulls = sum(model.push(0, seq, reap_all_on_full=False) for _ in range(4))
    model.reap(None)
    assert model.dirty_pages() == [writes]
    assert fulls == writes // model.soft_limit  # 4032 entries per ring-full


def test_a_hot_set_smaller_than_the_ring_counts_once_per_reap() -> None:
    hot = 2048
    model = RingModel(1, [hot], 4096)
    for _ in range(10):  # ten rewrites between two syncs: one entry per page
        model.push(0, pages(range(hot)), reap_all_on_full=True)
    model.reap(None)
    assert model.dirty_pages() == [hot]
    for _ in range(3):  # three reaps (QEMU's reaper, syncs) between rewrites: three entries
        model.push(0, pages(range(hot)), reap_all_on_full=True)
        model.reap(None)
    assert model.dirty_pages() == [4 * hot]


def test_clear_drops_without_counting_and_resize_reaps_first() -> None:
    model = RingModel(1, [1024], 256)
    model.push(0, pages(range(100)), reap_all_on_full=False)
    model.resize(512)
    assert model.dirty_pages() == [100] and model.entries == 512 and model.soft_limit == 448
    model.push(0, pages(range(100)), reap_all_on_full=False)
    model.clear()  # logging restarted: everything write-protected, nothing reaped
    model.push(0, pages(range(100)), reap_all_on_full=False)
    model.reap(None)
    assert model.dirty_pages() == [200]
    with pytest.raises(ValueError, match="power of two from 256 to 65536"):
        model.resize(128)


def test_entries_are_read_from_a_real_ring_in_ring_order() -> None:
    """ring_entry_pages: slot and offset of harvested entries, wrapping, unknown ones skipped."""
    n = 8
    ring = np.zeros(2 * n, U64)  # 16-byte entries: {u32 flags, u32 slot}, u64 offset
    layout = [(1, 3), (0, 9), (0, 10), (5, 0), (1, 70), (1, 2), (0, 1), (1, 0)]
    for i, (slot, offset) in enumerate(layout):
        ring[2 * i] = np.uint64(2 | (slot << 32))  # flags RESET (harvested): not looked at
        ring[2 * i + 1] = offset
    out = np.zeros(n, U64)
    first_page, slot_pages = np.array([0, 64], U64), np.array([64, 64], U64)
    got = ring_entry_pages(ring, n, 6, 5, first_page, slot_pages, out)
    # Entries 6, 7, 0, 1, 2: (0,1) (1,0) (1,3) (0,9) (0,10).
    assert out[:got].tolist() == [1, 64, 67, 9, 10]
    got = ring_entry_pages(ring, n, 3, 2, first_page, slot_pages, out)
    assert out[:got].tolist() == []  # slot 5 unknown, offset 70 past slot 1's end
    with pytest.raises(ValueError, match="count = 9 is out of range"):
        ring_entry_pages(ring, n, 0, 9, first_page, slot_pages, np.zeros(9, U64))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"vcpu": 2}, "vcpu = 2 is out of range"),
        ({"soft_limit": 0}, "soft_limit = 0 is outside"),
        ({"pages": np.array([640], U64)}, "pages[0] = 640 is outside armed"),
        ({"fill": np.array([9, 0], np.int64)}, "fill[0] = 9 is outside"),
    ],
)
def test_model_push_bad_arguments(args: dict, message: str) -> None:
    call = {
        "pages": np.array([1], U64),
        "armed": np.zeros(10, U64),
        "rings": np.zeros((2, 8), U64),
        "fill": np.zeros(2, np.int64),
        "reaped": np.zeros(2, U64),
        "vcpu": 0,
        "soft_limit": 4,
        "reap_all_on_full": False,
    }
    call.update(args)
    with pytest.raises(ValueError, match=re.escape(message)):
        ring_model_push(**call)


# --- the dirty limit's view: rates per period and the decisions they lead to ---------------


def steady_writer(
    model: RingModel, hot_pages: int, mib_s: float, period_ms: int, periods: int
) -> tuple[list[int], list[int]]:
    """A vCPU rewriting a hot set at a steady pace, fed to the model in 5 ms harvests, with a
    sync (reap every ring) at the end of each period, as the dirty limit's stat thread does.
    Returns the per-period rates from the entry counts (QEMU's) and from distinct pages."""
    per_ms = mib_s * MIB_PAGES / 1000
    written = 0.0
    cursor = 0
    entry_rates, distinct_rates = [], []
    for _ in range(periods):
        before = model.dirty_pages()
        distinct: set[int] = set()
        for _ in range(period_ms // 5):
            written += per_ms * 5
            n = int(written)
            written -= n
            seq = (np.arange(cursor, cursor + n, dtype=U64)) % U64(hot_pages)
            cursor = (cursor + n) % hot_pages
            distinct.update(seq.tolist())
            model.push(0, seq, reap_all_on_full=False)  # a limit is in service
        model.reap(None)  # the period's sync
        entry_rates += vcpu_rates(before, model.dirty_pages(), period_ms)
        distinct_rates += vcpu_rates([0], [len(distinct)], period_ms)
    return entry_rates, distinct_rates


def test_the_issue_case_is_penalised_on_entries_and_was_not_on_distinct_pages() -> None:
    """4096-entry ring (16 MiB), a 24 MiB hot set rewritten at 100 MiB/s, limit 32 MB/s,
    period 1000 ms: distinct pages per period (24 MiB) stay under the limit, entries do not."""
    model = RingModel(1, [64 * MIB_PAGES], 4096)
    entries, distinct = steady_writer(model, 24 * MIB_PAGES, 100, 1000, 3)
    assert distinct == [24, 24, 24]
    assert all(99 <= rate <= 100 for rate in entries), entries
    rft = RingFullTime()
    on_entries = adjust_throttle(0, 32, entries[-1], lambda rate: rft(rate, 4096))
    on_distinct = adjust_throttle(0, 32, distinct[-1], lambda rate: rft(rate, 4096))
    assert on_distinct.rule == "tolerance" and on_distinct.new_us == 0
    assert on_entries.rule == "far-up" and on_entries.new_us > 0
    # 16 MiB at 100 MB/s fills in 160 ms; 68 % too fast: 160 ms x 68 / 32 per ring-full.
    assert on_entries.new_us == int(160_000 * 68 / 32)


@pytest.mark.parametrize("hot_mib", [24, 256])
def test_the_measured_rate_does_not_depend_on_the_period(hot_mib: int) -> None:
    """A steady writer (100 MiB/s over a hot set larger than the ring) measures the same at
    every x-vcpu-dirty-limit-period; distinct pages measured less at long periods."""
    measured = {}
    for period_ms in (1000, 500, 250, 100):
        model = RingModel(1, [hot_mib * MIB_PAGES], 4096)
        entries, distinct = steady_writer(model, hot_mib * MIB_PAGES, 100, period_ms, 4)
        measured[period_ms] = sum(entries) / len(entries)
        if hot_mib == 24 and period_ms == 1000:
            assert sum(distinct) / len(distinct) == 24  # the old count: the hot set per period
    assert all(abs(rate - 100) <= 10 for rate in measured.values()), measured
