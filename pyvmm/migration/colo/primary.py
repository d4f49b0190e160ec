"""The primary's COLO loop: wait for a trigger, checkpoint in the mode hybrid.py decides,
again and again, until a failover request (x-colo-lost-heartbeat) or an error.

It runs on the migration thread right after the switchover handshake, on the same
connection, while the primary is still stopped: it opens its own dirty view (pages
dirtied since the last checkpoint), tells the comparator that the secondary now holds
the primary's state (checkpoint 0), waits for the secondary's CHECKPOINT_READY, and
resumes the primary. Then, as the ORBIT branch's colo_process_checkpoint does:

    trigger = a miscompare or an old answer's timeout (from the comparator), or none
              within x-colo-max-time (colo-passive-time while passive)
    record the length, decide the mode, run the checkpoint (checkpoint.py)

An error (the secondary or the comparator gone, a bad answer) ends the loop with
COLO_EXIT(error), and the primary waits, as QEMU's does (colo_exit_sem), for the
management's x-colo-lost-heartbeat; a stopped primary stays stopped until then, so no
answer goes out that no replica could reproduce. After the failover request it resumes,
tells the comparator that it serves alone, and the migration ends "completed".
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvmm.dirty.tracker import DirtyTracker, DirtyView
from pyvmm.machine.machine import Machine
from pyvmm.migration.clock import Clock
from pyvmm.migration.colo.checkpoint import Checkpoint, FailoverRequested
from pyvmm.migration.colo.hybrid import COLO, ColoTimes, HybridMode
from pyvmm.migration.colo.notify import CompareLink
from pyvmm.migration.colo.stats import ColoStats
from pyvmm.migration.colo.status import PRIMARY, ColoStatus, FailoverState
from pyvmm.migration.dirtypages import DirtyPages
from pyvmm.migration.pagewriter import PageWriter
from pyvmm.migration.params import MigrationSettings
from pyvmm.migration.stats import RamStats
from pyvmm.migration.stream import ReplyType, StreamError, StreamReader, StreamWriter

log = logging.getLogger(__name__)

EXIT_POLL_S = 0.2


@dataclass
class ColoSetup:
    """What a VMM hands a migration that may turn into COLO (the x-colo capability)."""

    status: ColoStatus
    stats: ColoStats
    compare_path: str | None  # the comparator's control socket, or None: no comparator
    stop: Callable[[], bool]  # as PrimaryHooks
    resume: Callable[[bool], None]
    closing: Callable[[], bool]
    on_session: Callable[[ColoPrimary | None], None]  # the VMM's handle for failover
    serialize: Callable[[Callable[[], Any]], Any] = lambda fn: fn()  # the control loop


@dataclass
class PrimaryHooks:
    """What the loop needs from the VMM; each runs on the control loop."""

    stop: Callable[[], bool]  # stop the guest (run state colo, STOP); was it running?
    resume: Callable[[bool], None]  # resume it if it was running (RESUME)
    emit: Callable[[str, dict[str, Any] | None], None]
    set_status: Callable[[str], None]  # the migration's status: colo, completed
    closing: Callable[[], bool] = lambda: False  # the process is shutting down
    serialize: Callable[[Callable[[], Any]], Any] = lambda fn: fn()  # the control loop


class Triggers:
    """Checkpoint requests from the comparator (and failover), for the loop to wait on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._pending: tuple[str, int] | None = None

    def post(self, reason: str, epoch: int) -> None:
        with self._lock:
            if self._pending is None or self._pending[1] < epoch:
                self._pending = (reason, epoch)
            self.event.set()

    def wake(self) -> None:
        self.event.set()

    def take(self, epoch: int) -> str | None:
        """The pending request for this epoch, if any (older ones came too late)."""
        with self._lock:
            pending, self._pending = self._pending, None
            self.event.clear()
        if pending is None or pending[1] < epoch:
            return None
        return pending[0]

    def wait(
        self, clock: Clock, timeout_ms: float, epoch: int, stop: Callable[[], bool]
    ) -> str | None:
        """The trigger that came within timeout_ms, or None (timeout, or stop())."""
        deadline = clock.now_ms() + timeout_ms
        while True:
            reason = self.take(epoch)
            if reason is not None or stop():
                return reason
            left = deadline - clock.now_ms()
            if left <= 0:
                return None
            clock.wait(self.event, left / 1000)


class ColoPrimary:
    def __init__(
        self,
        machine: Machine,
        tracker: DirtyTracker,
        sock: socket.socket,
        writer: StreamWriter,
        reader: StreamReader,
        settings: MigrationSettings,
        clock: Clock,
        hooks: PrimaryHooks,
        status: ColoStatus,
        stats: ColoStats,
        compare_path: str | None,
    ) -> None:
        self.machine = machine
        self.tracker = tracker
        self.sock = sock
        self.writer = writer
        self.reader = reader
        self.settings = settings
        self.clock = clock
        self.hooks = hooks
        self.status = status
        self.stats = stats
        self.mode = HybridMode()
        self.triggers = Triggers()
        self.link: CompareLink | None = None
        if compare_path is not None:
            self.link = CompareLink(compare_path, self.triggers.post, self._link_lost)
        self._view: DirtyView | None = None
        self.checkpoint: Checkpoint | None = None
        self.number = 0
        self.error: str | None = None
        self.link_lost: str | None = None
        self._was_running = True

    # --- called from the control loop ----------------------------------------------------------

    def lost_heartbeat(self) -> None:
        """x-colo-lost-heartbeat (already recorded in status): wake the loop and unblock
        a reply it may wait for, as QEMU's primary_vm_do_failover shuts its files down."""
        self.triggers.wake()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def wake(self) -> None:
        """The VMM is shutting down: stop waiting (the loop sees hooks.closing())."""
        self.triggers.wake()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _link_lost(self, why: str) -> None:
        self.link_lost = why
        self.triggers.wake()

    # --- the migration thread --------------------------------------------------------------------

    def open_view(self) -> None:
        """The primary's own dirty view: pages dirtied since the last checkpoint. Opened
        while the stopped primary's migration view is still open, so dirty logging
        never stops (a fresh start would report every page dirty)."""
        if self._view is None:
            self._view = self.tracker.open_view("colo")

    def start(self) -> None:
        """While the primary is stopped after the switchover: its own dirty view, and the
        comparator told that the secondary holds this state (checkpoint 0)."""
        self.hooks.serialize(lambda: self.status.enter(PRIMARY))
        self.stats.role = PRIMARY
        self.open_view()
        assert self._view is not None
        memory = self.machine.memory
        assert memory is not None
        pages = DirtyPages(self._view, memory)
        page_writer = PageWriter(memory, self.writer, RamStats())
        self.checkpoint = Checkpoint(
            self.machine, pages, page_writer, self.writer, self.reader, self.clock, self.link,
            self.hooks.stop, self.hooks.resume, self.status.requested,
        )  # fmt: skip
        self.checkpoint.stopped = True  # by the switchover
        if self.link is not None:
            self.link.connect()
            uart = self.machine.serial2
            pos = uart.stream_positions() if uart is not None else {"tx": 0, "sent": 0, "rx": 0}
            self.link.checkpoint(0, COLO, pos["tx"], pos["sent"], pos["rx"])

    def run(self, was_running: bool) -> None:
        """Until failover; never raises (an error ends COLO and waits for failover)."""
        self._was_running = was_running
        try:
            self.start()
            assert self.checkpoint is not None
            self.checkpoint.was_running = was_running
            self.stats.set_mode(COLO, time.monotonic())
            svm_tx = self._expect_ready()
            if self.link is not None:
                self.link.release(0, svm_tx)
            self.hooks.resume(was_running)
            self.checkpoint.stopped = False
            log.info("colo started: primary, checkpoints every %d ms at most",
                     self.settings["x-colo-max-time"])  # fmt: skip
            self._loop()
        except FailoverRequested:
            pass
        except Exception as exc:  # every failure ends COLO the same way
            if not self.status.requested.is_set():
                self.error = str(exc) or type(exc).__name__
        self._finish()

    def _interrupted(self) -> bool:
        return self.status.requested.is_set() or self.link_lost is not None or self.hooks.closing()

    def _expect_ready(self) -> int:
        try:
            reply, _, reason = self.reader.reply()
        except StreamError as exc:
            raise ConnectionError(f"waiting for CHECKPOINT_READY: {exc}") from None
        if reply is ReplyType.ERROR:
            raise ConnectionError(f"the secondary failed to start COLO: {reason}")
        if reply is not ReplyType.CHECKPOINT_READY:
            raise ConnectionError(f"the secondary answered {reply.name}, not CHECKPOINT_READY")
        return self.reader.reply_value

    def _loop(self) -> None:
        assert self.checkpoint is not None
        clock, mode, stats = self.clock, self.mode, self.stats
        checkpoint_time = clock.now_ms()
        requested = self.status.requested
        while True:
            if requested.is_set():
                raise FailoverRequested
            times = ColoTimes.from_settings(self.settings.values)
            limit = mode.limit_ms(times)
            was_passive = mode.passive
            left = limit - (clock.now_ms() - checkpoint_time)
            trigger = None
            if left > 0:
                trigger = self.triggers.wait(clock, left, self.number, self._interrupted)
            if requested.is_set():
                raise FailoverRequested
            if self.link_lost is not None:
                raise ConnectionError(self.link_lost)
            if self.hooks.closing():
                raise ConnectionError("the VMM is shutting down")
            length = clock.now_ms() - checkpoint_time
            if trigger == "miscompare":
                stats.miscompares += 1
                log.info("colo miscompare epoch=%d length-ms=%.1f", self.number, length)
            elif trigger == "timeout":
                stats.timeouts += 1
                log.info("colo old-answer timeout epoch=%d length-ms=%.1f", self.number, length)
            relax = mode.relax_ms(times, length, trigger is not None)
            mode.record(length)
            decision = mode.decide(times)
            if decision.change is not None:
                log.info(
                    "colo mode change to=%s mean-ms=%.1f limit-ms=%d passive-count=%d",
                    decision.mode, mode.mean_ms, times.passive_limit_ms, times.passive_count,
                )  # fmt: skip
            reason = trigger or ("passive-time" if was_passive else "max-time")
            self.number += 1
            threshold = int(self.settings["x-colo-migrate-ram-threshold"])
            record = self.checkpoint.run(
                self.number, decision.passive, reason, length, relax, threshold
            )
            stats.add(record)
            stats.mean_length_ms = mode.mean_ms
            stats.secondary_vcpu_s = self.checkpoint.secondary_vcpu_us / 1e6
            stats.set_mode(decision.mode, time.monotonic())
            log.info("%s", record.log_line())
            checkpoint_time = clock.now_ms()

    def _finish(self) -> None:
        """COLO_EXIT, then (after an error) wait for x-colo-lost-heartbeat, then failover:
        resume, tell the comparator, leave COLO."""
        status, hooks = self.status, self.hooks
        reason = status.exit_reason()
        if self.error is not None:
            log.warning("colo ended on the primary: %s", self.error)
        hooks.emit("COLO_EXIT", {"mode": PRIMARY, "reason": reason})
        while not status.requested.wait(EXIT_POLL_S):
            if hooks.closing():
                break
        hooks.serialize(lambda: status.set_failover(FailoverState.REQUIRE, FailoverState.ACTIVE))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        checkpoint = self.checkpoint
        if checkpoint is None:  # COLO never began: stopped since the switchover
            hooks.resume(self._was_running)
        elif checkpoint.stopped:
            hooks.resume(checkpoint.was_running)
            checkpoint.stopped = False
        if self.link is not None:
            self.link.exit("request")
            self.link.close()
        if self._view is not None:
            self._view.close()

        def done() -> None:
            status.set_failover(FailoverState.ACTIVE, FailoverState.COMPLETED)
            status.leave()

        hooks.serialize(done)
        hooks.set_status("completed")
        log.info("colo failover done on the primary: it serves alone")
