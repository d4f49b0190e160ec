"""The ordering rule of multifd, at the destination (docs/migration-stream.md, "multifd
channels"): no connection applies a record that follows its k-th MULTIFD_SYNC before every
connection (each channel, and the main stream) has reached its own k-th MULTIFD_SYNC, and
has applied, and with checksums checked, everything before it.

Between two sync points the source sends a page at most once (the walk clears its bit;
only a dirty sync sets it again, and each dirty sync is a sync point), so the channels may
apply records of one iteration in any order among themselves; across a sync point they may
not, or a page of iteration n could land after the same page of iteration n+1. QEMU's
multifd_recv_sync_main and the MULTIFD_FLAG_SYNC packet do the same.

SyncState is the rule alone (deterministic, tested without threads); SyncBarrier makes
threads wait for it.
"""

from __future__ import annotations

import threading

from pyvmm.migration.stream import StreamError


class SyncState:
    """Where each party (channels 0..n-1, then the main stream) stands: the number of the
    last sync point it reached. Sync points are numbered 1, 2, ... on every connection."""

    def __init__(self, parties: int) -> None:
        self.reached = [0] * parties

    def arrive(self, party: int, number: int) -> None:
        expected = self.reached[party] + 1
        if number != expected:
            raise StreamError(f"MULTIFD_SYNC {number} where {expected} was expected")
        self.reached[party] = number

    def may_pass(self, party: int) -> bool:
        """May this party apply what follows its last sync point?"""
        return self.reached[party] <= min(self.reached)


class SyncBarrier:
    def __init__(self, parties: int) -> None:
        self.state = SyncState(parties)
        self._cond = threading.Condition()
        self._error: BaseException | None = None

    def arrive(self, party: int, number: int) -> None:
        """Record the sync point and wait until every party has reached it (or an abort)."""
        with self._cond:
            if self._error is not None:
                raise self._error
            self.state.arrive(party, number)
            self._cond.notify_all()
            while not self.state.may_pass(party) and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def abort(self, error: BaseException) -> None:
        """Wake every waiter with this error (the first abort's error stays)."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()
