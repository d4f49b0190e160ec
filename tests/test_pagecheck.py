"""The destination's page checks (pyvmm/migration/pagecheck.py), without KVM: guest RAM is a
numpy array, the hashes come from the xxhash package."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import xxhash

from pyvmm.migration import pagecheck
from pyvmm.migration.pagecheck import PageChecker
from pyvmm.migration.stream import StreamError

PAGE = 4096


def memory(pages: int = 16) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, pages * PAGE, dtype=np.uint8)


def table(mem: np.ndarray, first: int, npages: int) -> bytes:
    hashes = [xxhash.xxh64_intdigest(mem[p * PAGE : (p + 1) * PAGE].tobytes())
              for p in range(first, first + npages)]  # fmt: skip
    return np.array(hashes, dtype=np.uint64).tobytes()


def test_matching_pages_pass() -> None:
    mem = memory()
    checker = PageChecker([mem])
    checker.ram_run(4, 0, 2, table(mem, 2, 5), may_change=False)
    checker.finish()
    assert checker.changed_pages == 0


def test_a_mismatch_in_a_run_sent_while_the_guest_stood_still_fails() -> None:
    mem = memory()
    expected = table(mem, 2, 5)
    mem[3 * PAGE + 7] ^= 1
    checker = PageChecker([mem])
    checker.ram_run(4, 0, 2, expected, may_change=False)
    with pytest.raises(StreamError, match=r"RAM_RUN record #4 \(slot 0, page 3\): 1 of its 5"):
        checker.finish()


def test_a_changed_page_must_be_sent_again() -> None:
    mem = memory()
    expected = table(mem, 0, 4)
    mem[PAGE] ^= 0xFF  # the guest wrote page 1 after the source hashed it
    checker = PageChecker([mem])
    checker.ram_run(4, 0, 0, expected, may_change=True)
    with pytest.raises(StreamError, match="1 such page"):
        checker.finish()
    again = PageChecker([mem])
    again.ram_run(4, 0, 0, expected, may_change=True)
    again.before_write(0, 1, 1)
    again.ram_run(9, 0, 1, table(mem, 1, 1), may_change=False)  # its new copy
    again.finish()
    assert again.changed_pages == 1


def test_a_zero_run_confirms_a_changed_page() -> None:
    mem = memory()
    expected = table(mem, 0, 2)
    mem[PAGE : 2 * PAGE] = 0
    checker = PageChecker([mem])
    checker.ram_run(4, 0, 0, expected, may_change=True)
    checker.zero_run(0, 1, 1)
    checker.finish()


def test_pages_are_not_overwritten_while_their_check_is_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release, started = threading.Event(), threading.Event()
    real_check = PageChecker._check

    def held_check(self: PageChecker, job: object) -> None:
        started.set()
        assert release.wait(10)
        real_check(self, job)  # type: ignore[arg-type]

    monkeypatch.setattr(PageChecker, "_check", held_check)
    mem = memory()
    checker = PageChecker([mem])
    checker.ram_run(4, 0, 4, table(mem, 4, 4), may_change=False)
    assert started.wait(10)
    checker.before_write(0, 8, 4)  # other pages: no wait
    written = threading.Event()

    def overwrite() -> None:
        checker.before_write(0, 6, 4)  # pages 6..9 overlap the pending 4..7
        written.set()

    thread = threading.Thread(target=overwrite)
    thread.start()
    assert not written.wait(0.3), "the write did not wait for the pending check"
    release.set()
    assert written.wait(10)
    thread.join()
    checker.finish()


def test_at_most_max_pending_runs_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_check = PageChecker._check
    monkeypatch.setattr(
        PageChecker, "_check",
        lambda self, job: (release.wait(10), real_check(self, job)),
    )  # fmt: skip
    mem = memory(64)
    checker = PageChecker([mem])
    for page in range(pagecheck.MAX_PENDING):
        checker.ram_run(page, 0, page, table(mem, page, 1), may_change=False)
    queued = threading.Event()

    def one_more() -> None:
        checker.ram_run(99, 0, 40, table(mem, 40, 1), may_change=False)
        queued.set()

    thread = threading.Thread(target=one_more)
    thread.start()
    assert not queued.wait(0.3), "more than MAX_PENDING runs were accepted"
    release.set()
    assert queued.wait(10)
    thread.join()
    checker.finish()
