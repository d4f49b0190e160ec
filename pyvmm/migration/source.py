"""One outgoing migration, phase by phase: setup, pre-copy, switchover.

MigrationSource runs the phases in order on its own thread ("live_migration") and owns
what they share: the connection, the migration's dirty view, the statistics, the
status. Each phase is its own piece: setup here, the pass loop in precopy.py, the
handshake in switchover.py; which pages move is dirtypages.py, how they move
pagewriter.py.

Every change of status or run state goes through `serialize`, which the VMM points at
its control loop (monitor/control.py): a cancel, a `stop` and the migration's own
commit are therefore ordered, never interleaved. The rule at the end: before the commit
a failure resumes the source; after it the source never resumes (switchover.py).

With `timeline` (and `heatmap`) set before start (monitor/recording.py sets them), each
phase records itself: setup and switchover spans and status instants here, the pass
loop's spans and counters in precopy.py, the handshake's steps in switchover.py.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pyvmm.dirty.heatmap import Heatmap
from pyvmm.dirty.tracker import DirtyTracker, DirtyView
from pyvmm.machine.machine import Machine
from pyvmm.migration import transport
from pyvmm.migration.clock import WALL_CLOCK, Clock
from pyvmm.migration.colo.primary import ColoPrimary, ColoSetup, PrimaryHooks
from pyvmm.migration.dirtypages import DirtyPages
from pyvmm.migration.pagewriter import PageWriter
from pyvmm.migration.params import MigrationSettings
from pyvmm.migration.policy import SYNC_FORCED, ConvergencePolicy
from pyvmm.migration.precopy import MIGRATION_THREAD, MigrationCancelled, Precopy, migration_track
from pyvmm.migration.stats import ACTIVE_STATES, MigrationStats
from pyvmm.migration.stream import (
    RecordType,
    ReplyType,
    StreamConfig,
    StreamError,
    StreamReader,
    StreamWriter,
)
from pyvmm.migration.switchover import REPLY_TIMEOUT_S, Switchover
from pyvmm.timeline import Timeline

if TYPE_CHECKING:
    from pyvmm.migration.multifd.send import MultifdSender

log = logging.getLogger(__name__)

T = TypeVar("T")
ABANDON_TIMEOUT_S = 2.0  # telling the destination we give up is best effort
PEER_ERROR_WAIT_S = 0.2  # after a failure: is the destination's ERROR already there?


def _direct(fn: Callable[[], T]) -> T:
    return fn()


class MigrationSource:
    def __init__(
        self,
        machine: Machine,
        tracker: DirtyTracker,
        settings: MigrationSettings,
        emit_event: Callable[[str, dict[str, Any] | None], None],
        set_run_state: Callable[[str], None],
        guest_running: Callable[[], bool],
        policies: list[ConvergencePolicy] | None = None,
        serialize: Callable[[Callable[[], Any]], Any] = _direct,
        clock: Clock = WALL_CLOCK,
        colo: ColoSetup | None = None,
    ) -> None:
        self.machine = machine
        self.tracker = tracker
        self.settings = settings
        self._emit = emit_event
        self._set_run_state = set_run_state
        self._guest_running = guest_running
        self._serialize = serialize
        self.clock = clock
        self.policies = policies or []
        self.stats = MigrationStats()
        self.thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._sock: socket.socket | None = None
        self._writer: StreamWriter | None = None
        self._reader: StreamReader | None = None  # the destination's replies
        self._view: DirtyView | None = None
        self.pages: DirtyPages | None = None
        self.precopy: Precopy | None = None
        self.switchover: Switchover | None = None
        self.committed = False  # the switchover's commit point has passed
        self._in_downtime = False
        self._we_paused = False
        self.resume_state: str | None = None  # the run state to go back to before the commit
        self.timeline: Timeline | None = None  # recording (docs/timeline.md)
        self.heatmap: Heatmap | None = None
        self.colo_setup = colo  # with the x-colo capability: COLO follows the switchover
        self.colo: ColoPrimary | None = None
        self._multifd: MultifdSender | None = None  # the multifd capability's channels

    # --- what QMP and the policies see --------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.stats.status in ACTIVE_STATES

    @property
    def in_downtime(self) -> bool:
        return self._in_downtime

    @property
    def in_colo(self) -> bool:
        """The switchover is done and COLO runs (QEMU's MIGRATION_STATUS_COLO)."""
        return self.stats.status == "colo"

    @property
    def wants_colo(self) -> bool:
        return self.colo_setup is not None and bool(self.settings.caps.get("x-colo"))

    def start(self, uri: str) -> None:
        """Begin migrating to `uri` in a background thread (returns at once)."""
        parsed = transport.parse_uri(uri)
        self.stats = MigrationStats(status="setup", start_ms=self.clock.now_ms())
        self._emit_status("setup")
        if self.timeline is not None:
            self.timeline.instant("status setup", 0, scope="p", cat="migration")
        self.thread = threading.Thread(target=self._run, args=(parsed,), name=MIGRATION_THREAD)
        self.thread.daemon = True
        self.thread.start()

    def cancel(self) -> bool:
        """migrate_cancel (on the control loop). Returns whether it took effect: not once
        the migration has ended, and not once the switchover is committed, when the
        guest may already run at the destination."""
        if not self.active or self.stats.status == "cancelling":
            return False
        if self.committed:
            log.info("migrate_cancel ignored: the switchover is already committed")
            return False
        self._cancel.set()
        self._set_status("cancelling")
        if self._multifd is not None:  # stop the channel threads' sends
            self._multifd.abort()
        sock = self._sock
        if sock is not None:  # unblock a send or a reply wait
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return True

    def wait(self, timeout_s: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout_s)

    def query(self) -> dict[str, Any]:
        precopy, pages = self.precopy, self.pages
        if self.active and precopy is not None and pages is not None:
            with precopy.lock:
                self.stats.ram.remaining = pages.remaining_bytes()
        return self.stats.to_qmp(self.clock.now_ms())

    @property
    def period_start_ms(self) -> float:
        precopy = self.precopy
        return precopy.period_start_ms if precopy is not None else 0.0

    def force_sync(self, kind: str = SYNC_FORCED) -> bool:
        """A sync asked for from outside the loop (9.2's timer, the 2024 series' background
        syncs); kind is SYNC_FORCED or SYNC_BACKGROUND (policy.py).

        Decided under the bitmap lock: once the switchover has begun the stream carries
        the final pages and the state, and a sync's ITERATION record must not interleave
        with them. Returns whether it synced."""
        precopy = self.precopy
        if precopy is None:
            return False
        with precopy.lock:
            if self.stats.status != "active" or self._in_downtime:
                return False
            precopy.sync(kind)
            return True

    # --- status and run state, always on the control loop -------------------------------------

    def _emit_status(self, status: str) -> None:
        if self.settings.caps.get("events"):
            self._emit("MIGRATION", {"status": status})

    def _set_status(self, status: str) -> None:
        # The event first: a client's events and answers leave in order, so one that sees
        # the new status in query-migrate has its MIGRATION event already (under QEMU's
        # big lock a query cannot come between the two either).
        self._emit_status(status)
        self.stats.status = status
        tl = self.timeline
        if tl is not None:  # a line across the whole process
            tl.instant(f"status {status}", 0, scope="p", cat="migration")

    def _status(self, status: str) -> None:
        self._serialize(lambda: self._set_status(status))

    def _stop_guest(self) -> bool:
        """Switchover step 1, on the control loop: finish-migrate, vCPUs stopped."""
        if self._cancel.is_set():
            raise MigrationCancelled
        was_running = self._guest_running()
        self.resume_state = "running" if was_running else "paused"
        self._set_run_state("finish-migrate")
        self._in_downtime = True
        if self.precopy is not None:
            self.precopy.page_writer.in_downtime = True
        if was_running:
            self._we_paused = True  # before pause(): a pause failing half-way is undone too
            self.machine.pause()
        self._set_status("device")
        return was_running

    def _commit(self) -> None:
        """The commit point, on the control loop: a cancel that was served first wins."""
        if self._cancel.is_set():
            raise MigrationCancelled
        self.committed = True

    # --- the migration thread -----------------------------------------------------------------

    def _run(self, uri: transport.MigrationUri) -> None:
        try:
            self._setup(uri)
            assert self.precopy is not None
            tl = self.timeline
            t0_us = tl.now_us() if tl is not None else 0.0
            self.precopy.run()
            if tl is not None:
                tl.complete("pre-copy", t0_us, tl.now_us() - t0_us,
                            migration_track(tl), cat="migration")  # fmt: skip
            self._switch_over()
            if self.wants_colo:
                self._run_colo()
        except MigrationCancelled:
            self._end_failed("cancelled", None)
        except Exception as exc:  # any failure: the source keeps running (if not committed)
            message = self._describe(exc)
            if self._cancel.is_set() and not self.committed:
                self._end_failed("cancelled", None)
            else:
                log.warning("migration failed: %s", message)
                self._abandon(message)
                self._end_failed("failed", message)
        finally:
            self._teardown()

    def _setup(self, uri: transport.MigrationUri) -> None:
        memory = self.machine.memory
        assert memory is not None
        tl = self.timeline
        t0_us = tl.now_us() if tl is not None else 0.0
        self.stats.ram.total = memory.size_bytes
        self._sock = transport.connect(uri)
        if self._cancel.is_set():
            raise MigrationCancelled
        checksum = bool(self.settings.caps.get("x-record-checksum"))
        self._writer = StreamWriter(self._sock, checksum)
        self._reader = StreamReader(self._sock, REPLY_TIMEOUT_S, checksum, peer="destination")
        # Every page must be sent once: the view starts all dirty; the migration re-arms
        # tracking chunk by chunk just before it copies (get, clear, copy).
        self._view = self.tracker.open_view("migration", defer_clear=True, initially_dirty=True)
        self.pages = DirtyPages(self._view, memory)
        page_writer = self._page_writer(checksum)
        self.precopy = Precopy(
            self.pages, page_writer, self._writer, self.stats, self.settings, self.clock,
            self._cancel, self.policies, self, self._emit,
        )  # fmt: skip
        self.precopy.timeline, self.precopy.heatmap = self.timeline, self.heatmap
        self.precopy.sync()
        config = StreamConfig(
            memory.size_bytes,
            [(r.gpa, r.size_bytes) for r in memory.regions],
            len(self.machine.vcpus),
            bool(self.machine.config.start_all_vcpus),
            self.machine.irqchip,
            self.machine.tsc_khz,
        )
        self._writer.preamble()
        self._writer.header(config)
        if self.wants_colo:  # QEMU sends ENABLE_COLO right after its header too
            self._writer.record(RecordType.COLO_ENABLE)
        if self._multifd is not None:  # the channel handshake (multifd/wire.py)
            self._multifd.connect(uri, self._writer, self._reader)
        self.precopy.header_sent = True
        for policy in self.policies:
            policy.on_setup(self)
        self.precopy.start_periods()
        self.stats.setup_time_ms = self.clock.now_ms() - self.stats.start_ms
        tl = self.timeline
        if tl is not None:
            tl.complete("setup", t0_us, tl.now_us() - t0_us, migration_track(tl),
                        cat="migration")  # fmt: skip
        self._serialize(self._enter_active)

    def _page_writer(self, checksum: bool) -> PageWriter:
        """The main stream's page writer, or with the multifd capability the channels'."""
        memory = self.machine.memory
        assert memory is not None and self._writer is not None
        if not self.settings.caps.get("multifd"):
            return PageWriter(memory, self._writer, self.stats.ram)
        from pyvmm.migration.multifd.send import MultifdPageWriter, MultifdSender

        channels = int(self.settings["multifd-channels"])
        self._multifd = MultifdSender(memory, channels, checksum, self._cancel)
        return MultifdPageWriter(memory, self._writer, self.stats.ram, self._multifd)

    def _enter_active(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled
        self._set_status("active")

    def _switch_over(self) -> None:
        assert self._sock is not None and self._writer is not None and self.precopy is not None
        assert self.pages is not None and self._reader is not None
        bw = self.precopy.threshold_bytes() / max(self.settings["downtime-limit"], 1)
        pending = self.pages.remaining_bytes()
        expected_ms = pending / bw if bw > 0 else 0.0
        self.switchover = Switchover(
            self.machine, self.precopy, self._sock, self._writer, self._reader,
            self.clock, lambda: self._serialize(self._stop_guest),
            lambda: self._serialize(self._commit),
        )  # fmt: skip
        tl = self.timeline
        t0_us = tl.now_us() if tl is not None else 0.0
        start = self.clock.now_ms()
        self.switchover.run()
        end = self.clock.now_ms()
        if tl is not None:
            tl.complete("switchover", t0_us, tl.now_us() - t0_us,
                        migration_track(tl), cat="switchover",
                        args=self.switchover.parts.as_qmp())  # fmt: skip
        self._serialize(lambda: self._end_completed(start, end, expected_ms, bw, pending))

    def _run_colo(self) -> None:
        """COLO on this connection, from the stopped primary on (colo/primary.py). The
        migration's own view and its convergence policies end here: COLO has its own
        view, and a throttle must not outlive the migration."""
        setup = self.colo_setup
        assert setup is not None and self._sock is not None
        assert self._writer is not None and self._reader is not None
        self._end_policies()
        hooks = PrimaryHooks(
            setup.stop, setup.resume, self._emit, self._status, setup.closing, setup.serialize
        )
        self.colo = ColoPrimary(
            self.machine, self.tracker, self._sock, self._writer, self._reader, self.settings,
            self.clock, hooks, setup.status, setup.stats, setup.compare_path,
        )  # fmt: skip
        self.colo.open_view()
        if self._view is not None:
            self._view.close()
            self._view = None
        setup.on_session(self.colo)
        try:
            self.colo.run(self.resume_state == "running")
        finally:
            setup.on_session(None)

    def _end_completed(
        self, start_ms: float, end_ms: float, expected_ms: float, bw_bytes_per_ms: float,
        pending_bytes: int,
    ) -> None:  # fmt: skip
        assert self._writer is not None and self.switchover is not None
        stats, ram = self.stats, self.stats.ram
        stats.end_ms = end_ms
        stats.downtime_ms = end_ms - start_ms
        ram.transferred = self._writer.bytes_sent
        ram.remaining = 0
        active_ms = end_ms - stats.start_ms - stats.setup_time_ms
        ram.mbps = ram.transferred * 8 / (active_ms / 1000) / 1e6 if active_ms > 0 else 0.0
        parts = self.switchover.parts
        stats.extra["x-downtime-parts"] = {
            "expected": round(expected_ms, 2),
            "bandwidth-bytes-per-ms": round(bw_bytes_per_ms, 1),
            "pending-at-check-bytes": pending_bytes,
            "syncs": self.stats.ram.dirty_sync_count,
            **parts.as_qmp(),
        }
        self._we_paused = False  # the guest lives on at the destination now
        if self.wants_colo:  # both go on: COLO resumes this side (colo/primary.py)
            self._set_run_state("colo")
            self._set_status("colo")
            return
        self._set_run_state("postmigrate")
        self._set_status("completed")
        log.info(
            "migration completed: %d bytes in %.0f ms; downtime %.0f ms, expected %.0f ms "
            "(stop %.1f, ram %.1f for %d bytes, state %.1f for %d bytes, load %.1f, commit %.1f, "
            "start %.1f)",
            ram.transferred, end_ms - stats.start_ms, stats.downtime_ms, expected_ms,
            parts.stop_ms, parts.ram_ms, parts.final_bytes, parts.state_ms, parts.state_bytes,
            parts.load_ms, parts.commit_ms, parts.start_ms,
        )  # fmt: skip

    def _describe(self, exc: Exception) -> str:
        """One line for error-desc; the destination's own reason when it sent one."""
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError | StreamError) and not self.committed:
            reason = self._peer_error()
            if reason:
                message = f"the destination refused the migration: {reason}"
        if self.committed:
            message = (
                f"{message}; the switchover was committed, so this side stays paused: the "
                "guest runs at the destination if it received GO"
            )
        return message

    def _peer_error(self) -> str | None:
        """An ERROR the destination sent before it closed, if one is waiting to be read."""
        reader = self._reader
        if self._sock is None or reader is None:
            return None
        try:
            reader.deadline_s = PEER_ERROR_WAIT_S
            reply, _, reason = reader.reply()
        except (OSError, StreamError):
            return None
        return reason if reply is ReplyType.ERROR else None

    def _abandon(self, reason: str) -> None:
        """Tell the destination we give up (best effort; it fails without GO anyway)."""
        if self.committed or self._writer is None or self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.settimeout(ABANDON_TIMEOUT_S)
            self._writer.abandon(reason)

    def _end_failed(self, status: str, message: str | None) -> None:
        def end() -> None:
            self.stats.end_ms = self.clock.now_ms()
            self.stats.error_desc = message
            if not self.committed:
                if self._we_paused:
                    self.machine.resume()
                    self._we_paused = False
                if self.resume_state is not None:  # we had entered finish-migrate
                    self._set_run_state(self.resume_state)
            else:
                self._set_run_state("postmigrate")
            self._set_status(status)

        self._serialize(end)

    def _end_policies(self) -> None:
        policies, self.policies = self.policies, []
        for policy in policies:
            try:
                policy.on_end(self)
            except Exception:
                log.exception("convergence policy cleanup failed")

    def _teardown(self) -> None:
        self._in_downtime = False
        self._end_policies()
        if self._multifd is not None:
            self._multifd.close()
        if self._view is not None:
            self._view.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
