"""The end of a migration, as a handshake with one commit point.

    source                                        destination
    stop the vCPUs (finish-migrate, status device)
    capture the machine state; final sync, the last dirty pages, STATE
    SWITCHOVER  ----------------------------->    load the state
                <-----------------------------    LOADED  (or ERROR: the source resumes)
    commit (on the control loop; a cancel that came first wins and resumes the source)
    GO          ----------------------------->    start the guest
                <-----------------------------    STARTED
    postmigrate, status completed

The rule: before the commit any failure resumes the source (and the destination, which
never got GO, does not run); after it the source never resumes, whatever happens. So at
most one guest runs, always. Each step is a request with an answer, in the manner of
Cloud Hypervisor's vm-migration protocol; ABANDON and ERROR end it from either side.
docs/migration.md has the failure table, step by step.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.machine.machine import Machine
from pyvmm.machine.state import capture
from pyvmm.migration.clock import Clock
from pyvmm.migration.precopy import Precopy, migration_track
from pyvmm.migration.stream import ReplyType, StreamError, StreamReader, StreamWriter
from pyvmm.timeline import Timeline

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 60.0  # LOADED and STARTED: the destination's restore, one round trip


class DestinationRefused(Exception):
    """The destination answered ERROR; the message is its reason."""


def expect_reply(
    reader: StreamReader, want: ReplyType, doing: str, peer: str,
    refused: type[Exception] = ConnectionError,
) -> int:  # fmt: skip
    """Wait for one reply from `peer` (within the reader's REPLY_TIMEOUT_S); returns its
    arg. ERROR raises `refused` with the peer's reason; anything else ConnectionError."""
    try:
        reply, arg, reason = reader.reply()
    except TimeoutError:
        raise ConnectionError(
            f"the {peer} did not answer within {REPLY_TIMEOUT_S:.0f} s while {doing}"
        ) from None
    except StreamError as exc:
        raise ConnectionError(f"while {doing}: {exc}") from None
    if reply is ReplyType.ERROR:
        raise refused(f"the {peer} failed {doing}: {reason}")
    if reply is not want:
        raise ConnectionError(f"the {peer} answered {reply.name} instead of {want.name}")
    return arg


@dataclass
class DowntimeParts:
    """Where the downtime went, in ms, measured on the source (docs/migration.md)."""

    stop_ms: float = 0.0  # pausing the vCPUs
    ram_ms: float = 0.0  # final sync and the last dirty pages
    state_ms: float = 0.0  # capturing and sending the machine state
    load_ms: float = 0.0  # SWITCHOVER to LOADED: the destination's restore + a round trip
    commit_ms: float = 0.0  # the commit on the control loop
    start_ms: float = 0.0  # GO to STARTED: starting the guest there + a round trip
    final_bytes: int = 0  # pages sent during the downtime
    state_bytes: int = 0
    pending_at_stop_bytes: int = 0  # dirty after the final sync: what the estimate was for

    def as_qmp(self) -> dict[str, float | int]:
        return {
            "stop": round(self.stop_ms, 2), "ram": round(self.ram_ms, 2),
            "state": round(self.state_ms, 2), "load": round(self.load_ms, 2),
            "commit": round(self.commit_ms, 2), "start": round(self.start_ms, 2),
            "final-bytes": self.final_bytes, "pending-at-stop-bytes": self.pending_at_stop_bytes,
        }  # fmt: skip


class Switchover:
    def __init__(
        self,
        machine: Machine,
        precopy: Precopy,
        sock: socket.socket,
        writer: StreamWriter,
        reader: StreamReader,
        clock: Clock,
        stop_guest: Callable[[], bool],
        commit: Callable[[], None],
    ) -> None:
        self.machine = machine
        self.precopy = precopy
        self.sock = sock
        self.writer = writer
        self.reader = reader
        self.clock = clock
        self._stop_guest = stop_guest  # on the control loop; returns "the guest was running"
        self._commit = commit  # on the control loop; raises if a cancel came first
        self.parts = DowntimeParts()
        self.committed = False
        self.started_running = False
        self.timeline: Timeline | None = precopy.timeline

    def run(self) -> None:
        clock, parts = self.clock, self.parts
        t = clock.now_ms()
        was_running = self._stop_guest()
        t, parts.stop_ms = self._lap(t, "stop vCPUs")
        # Capture before the final sync: capturing completes an I/O exit KVM left half done
        # (machine/state.py, _complete_pending_io), and an IN string instruction then writes
        # guest RAM. The final sync must see that write, or the page would never be sent.
        state = capture(self.machine).to_bytes()
        t, capture_ms = self._lap(t, "capture state")
        precopy = self.precopy
        before = self.writer.bytes_sent
        with precopy.lock:
            precopy.sync()
            parts.pending_at_stop_bytes = precopy.pages.remaining_bytes()
            while not precopy.send(float("inf"), limited=False):
                pass
            precopy.page_writer.finish()  # multifd: every channel synced and drained
        parts.final_bytes = self.writer.bytes_sent - before
        t, parts.ram_ms = self._lap(t, "final sync + pages")
        parts.state_bytes = len(state)
        self.writer.state(state)
        self.writer.switchover(was_running)
        t, send_ms = self._lap(t, "send state")
        parts.state_ms = capture_ms + send_ms
        self._expect(ReplyType.LOADED, "loading the state")
        t, parts.load_ms = self._lap(t, "SWITCHOVER -> LOADED")
        self._commit()
        self.committed = True  # from here on the source never resumes
        t, parts.commit_ms = self._lap(t, "commit")
        self.writer.go()
        self.started_running = bool(self._expect(ReplyType.STARTED, "starting the guest") & 1)
        t, parts.start_ms = self._lap(t, "GO -> STARTED")

    def _lap(self, t0: float, step: str) -> tuple[float, float]:
        t = self.clock.now_ms()
        tl = self.timeline
        if tl is not None:  # the step that just ended, as a span on the migration track
            now, dur_us = tl.now_us(), (t - t0) * 1000
            tl.complete(step, now - dur_us, dur_us, migration_track(tl),
                        cat="switchover")  # fmt: skip
        return t, t - t0

    def _expect(self, want: ReplyType, doing: str) -> int:
        return expect_reply(self.reader, want, doing, "destination", DestinationRefused)
