"""The destination's page checks (docs/migration-stream.md, "Checksums"), on a thread of
their own.

A RAM_RUN's pages go from the socket straight into guest RAM; with checksums, each must
then match its xxHash64 in the record's table. Hashing them is as much work per byte as
receiving them, so it runs on a second thread (page_hashes releases the GIL) while the
next records arrive: the receiving thread hands each run over and goes on. Two rules keep
that exact:

- a page is never overwritten while a check of it is pending: before a record writes
  pages, the receiving thread waits for pending checks of the same pages (pyvmm's own
  source sends a page at most once per pass, so this almost never waits);
- every check is done, and every failure raised, before the STATE is accepted, so the
  LOADED reply, and with it the commit, comes only after all of RAM was verified.

A failure is raised in the receiving thread at its next record (a mismatch in a run read
while the guest was stopped), or when the STATE comes (a page that changed while it was
sent and was never sent again: UnconfirmedPages).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pyvmm.dirty.scan import page_hashes
from pyvmm.migration.stream import StreamError

MAX_PENDING = 8  # runs handed over and not yet checked (pyvmm's source sends 2 MiB runs)


class UnconfirmedPages:
    """Pages whose hash failed in RAM_RUN records the source marked as read while its guest
    ran: the guest may have written such a page between the source's hash and its send,
    and then the migration's dirty tracking sends it again. Each must be overwritten by a
    page that matches its hash (or a ZERO_RUN) before the STATE is accepted; a page that
    never is was corrupted in transit."""

    def __init__(self, slot_pages: Sequence[int]) -> None:
        self._slot_pages = list(slot_pages)
        self._maps: list[np.ndarray | None] = [None] * len(self._slot_pages)
        self.first: str | None = None  # the first such record, for the error message
        self._lock = threading.Lock()  # multifd: one checker per channel shares this

    def mark(self, slot: int, pages: np.ndarray, record: str) -> None:
        with self._lock:
            bitmap = self._maps[slot]
            if bitmap is None:
                bitmap = self._maps[slot] = np.zeros(self._slot_pages[slot], dtype=bool)
            bitmap[pages] = True
            if self.first is None:
                self.first = record

    def confirm(self, slot: int, first: int, npages: int) -> None:
        with self._lock:
            bitmap = self._maps[slot]
            if bitmap is not None:
                bitmap[first : first + npages] = False

    def check(self) -> None:
        with self._lock:
            left = sum(int(m.sum()) for m in self._maps if m is not None)
        if left:
            raise StreamError(
                f"page checksum mismatch in {self.first}, and {left} such page(s) were never "
                "sent again: corrupted in transit"
            )


@dataclass
class _Job:
    record: int  # sequence number, for messages
    slot: int
    first: int
    npages: int
    table: np.ndarray | None  # the expected hashes; None: a ZERO_RUN (confirms its pages)
    may_change: bool

    def overlaps(self, slot: int, first: int, npages: int) -> bool:
        end = first + npages
        return slot == self.slot and first < self.first + self.npages and self.first < end


class PageChecker:
    """Checks received runs against their page hashes on its own thread, in order."""

    def __init__(
        self, memory: Sequence[np.ndarray], unconfirmed: UnconfirmedPages | None = None,
        name: str = "page-check",
    ) -> None:  # fmt: skip
        """unconfirmed: shared with other checkers (multifd: one checker per channel, and a
        page that changed in one channel's run may be sent again on another)."""
        self._memory = memory  # one uint8 array per slot (guest RAM)
        self._name = name
        self.unconfirmed = unconfirmed or UnconfirmedPages([len(m) // 4096 for m in memory])
        self.changed_pages = 0  # pages that differed while the guest could change them
        self._pending: deque[_Job] = deque()  # the head may be being checked
        self._cond = threading.Condition()
        self._error: StreamError | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- the receiving thread -----------------------------------------------------------------

    def ram_run(
        self, record: int, slot: int, first: int, table: bytes | bytearray, may_change: bool
    ) -> None:
        """Hand over a run whose pages are now in guest RAM."""
        expected = np.frombuffer(table, dtype=np.uint64)
        self._submit(_Job(record, slot, first, len(expected), expected, may_change))

    def zero_run(self, slot: int, first: int, npages: int) -> None:
        """These pages were just zeroed: they are final until written again."""
        self._submit(_Job(-1, slot, first, npages, None, False))

    def before_write(self, slot: int, first: int, npages: int) -> None:
        """Wait until no pending check covers these pages (they are about to change)."""
        with self._cond:
            while self._error is None and any(
                job.overlaps(slot, first, npages) for job in self._pending
            ):
                self._cond.wait()
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the first failure found so far, if any."""
        if self._error is not None:
            raise self._error

    def first_failure(self) -> StreamError | None:
        """After something else went wrong: let the pending checks end, and return the
        failure they found (it came first, so it is the one to report)."""
        with self._cond:
            while self._pending and self._error is None and not self._closing:
                self._cond.wait()
        return self._error

    def drain(self) -> None:
        """Every check handed over so far is done; raise the first failure (a multifd
        channel's sync point: no page of the next iteration may land before these checks)."""
        with self._cond:
            while self._pending and self._error is None and not self._closing:
                self._cond.wait()
        self.raise_error()

    def finish(self) -> None:
        """Every check done and passed, and no page left unconfirmed (before the STATE)."""
        with self._cond:
            while self._pending and self._error is None:
                self._cond.wait()
        self.close()
        self.raise_error()
        self.unconfirmed.check()

    def close(self) -> None:
        """Stop the thread (pending checks are dropped); safe to call twice."""
        with self._cond:
            self._closing = True
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _submit(self, job: _Job) -> None:
        self.raise_error()
        with self._cond:
            while len(self._pending) >= MAX_PENDING and self._error is None:
                self._cond.wait()
            self._pending.append(job)
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    # --- the checking thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._pending[0]
            try:
                if self._error is None:
                    self._check(job)
            except StreamError as exc:
                self._error = exc
            except Exception as exc:  # a bug of ours: the migration must still fail cleanly
                self._error = StreamError(f"page check failed: {exc!r}")
            with self._cond:
                if self._pending and self._pending[0] is job:
                    self._pending.popleft()
                self._cond.notify_all()

    def _check(self, job: _Job) -> None:
        if job.table is None:
            self.unconfirmed.confirm(job.slot, job.first, job.npages)
            return
        pages = np.arange(job.first, job.first + job.npages, dtype=np.uint64)
        got = np.empty(job.npages, dtype=np.uint64)
        page_hashes(self._memory[job.slot], pages, got)
        bad = pages[got != job.table]
        self.unconfirmed.confirm(job.slot, job.first, job.npages)
        if not len(bad):
            return
        where = f"RAM_RUN record #{job.record} (slot {job.slot}, page {int(bad[0])})"
        if not job.may_change:
            raise StreamError(
                f"page checksum mismatch in {where}: {len(bad)} of its {job.npages} pages "
                "differ from their hashes (corrupted in transit)"
            )
        self.unconfirmed.mark(job.slot, bad, f"{where}, read while the guest ran")
        self.changed_pages += len(bad)
