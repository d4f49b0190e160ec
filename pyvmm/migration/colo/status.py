"""query-colo-status, COLO_EXIT and x-colo-lost-heartbeat, as QEMU has them.

QEMU (migration/colo.c, migration/colo-failover.c, qapi/migration.json):
- COLOMode: none | primary | secondary; `mode` is the current one, `last-mode` the one
  COLO ran in (kept after it ends);
- FailoverStatus: none -> require (x-colo-lost-heartbeat) -> active (being handled) ->
  completed; relaunch when the request came while the secondary was loading a
  checkpoint (it is handled once the load has finished);
- query-colo-status's `reason` (COLOExitReason): none while failover is none, request
  once it completed, otherwise processing while the primary is still in COLO and error
  after (qmp_query_colo_status's switch);
- x-colo-lost-heartbeat: "VM is not in COLO mode" outside COLO (QEMU 8.0's text), "COLO
  failover is already actived" for a second request (failover_request_active).
"""

from __future__ import annotations

import threading
from enum import Enum
from typing import Any

NONE, PRIMARY, SECONDARY = "none", "primary", "secondary"


class FailoverState(Enum):
    NONE = "none"
    REQUIRE = "require"
    ACTIVE = "active"
    COMPLETED = "completed"
    RELAUNCH = "relaunch"


class ColoStatusError(RuntimeError):
    """x-colo-lost-heartbeat refused; the message is QEMU's."""


class ColoStatus:
    """One VM's COLO mode and failover state (thread-safe: QMP reads, threads change)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.mode = NONE
        self.last_mode = NONE
        self.failover = FailoverState.NONE
        self.exited = False  # the COLO loop has ended (error or failover)
        self.requested = threading.Event()  # x-colo-lost-heartbeat arrived

    def enter(self, mode: str) -> None:
        with self._lock:
            self.mode = self.last_mode = mode
            self.failover = FailoverState.NONE
            self.exited = False
            self.requested.clear()

    def request_failover(self) -> None:
        """x-colo-lost-heartbeat: NONE -> REQUIRE, once."""
        with self._lock:
            if self.mode == NONE:
                raise ColoStatusError("VM is not in COLO mode")
            if self.failover is not FailoverState.NONE:
                raise ColoStatusError("COLO failover is already actived")
            self.failover = FailoverState.REQUIRE
        self.requested.set()

    def set_failover(self, old: FailoverState, new: FailoverState) -> bool:
        """QEMU's failover_set_state: compare and swap; True if it was `old`."""
        with self._lock:
            if self.failover is not old:
                return False
            self.failover = new
            return True

    def leave(self) -> None:
        """COLO is over on this VM (failover done): mode none, last-mode kept."""
        with self._lock:
            self.mode = NONE

    def exit_reason(self) -> str:
        """COLO_EXIT's reason when the loop ends now."""
        with self._lock:
            return "request" if self.failover is not FailoverState.NONE else "error"

    def to_qmp(self) -> dict[str, Any]:
        with self._lock:
            if self.failover is FailoverState.NONE:
                reason = "none"
            elif self.failover is FailoverState.COMPLETED:
                reason = "request"
            elif self.mode == PRIMARY:
                reason = "processing"
            else:
                reason = "error"
            return {"mode": self.mode, "last-mode": self.last_mode, "reason": reason}
