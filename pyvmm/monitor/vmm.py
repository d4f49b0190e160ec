"""One pyvmm process: a machine, its console, its QMP monitor, its migrations, and how it
ends.

The process's main thread runs the control loop (control.py): every state change (a
QMP command that is not a query, a migration's status change, a signal) is one piece of
work on that loop, so they never interleave. Run states use QEMU's names (prelaunch,
running, paused, inmigrate, finish-migrate, postmigrate, shutdown, internal-error),
reported by query-status. The QMP commands themselves live in commands_*.py; process.py
puts the pieces together.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar

from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.elf import load_pvh_image
from pyvmm.machine.errors import MachineError
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig, MachineExit
from pyvmm.machine.uart import ServiceUart
from pyvmm.machine.uartsock import UartSocket, parse_uart_address
from pyvmm.machine.vcpu import install_kick_handler
from pyvmm.migration.colo.stats import ColoStats
from pyvmm.migration.colo.status import ColoStatus
from pyvmm.migration.params import MigrationSettings
from pyvmm.monitor.control import ControlLoop, LoopClosed

# Dirty tracking, migrations and their numpy are imported where they are first used, so
# that a VM that never migrates or measures starts without them (docs/machine.md,
# "Start-up").
if TYPE_CHECKING:
    from pyvmm.dirty.rate import DirtyRateMonitor
    from pyvmm.dirty.ring_quirk import RingQuirk
    from pyvmm.dirty.tracker import DirtyTracker
    from pyvmm.migration.colo.primary import ColoPrimary, ColoSetup
    from pyvmm.migration.colo.secondary import ColoSecondary, SecondaryHooks
    from pyvmm.migration.convergence.dirtylimit import DirtyLimitController
    from pyvmm.migration.destination import MigrationDestination
    from pyvmm.migration.source import MigrationSource
    from pyvmm.migration.transport import MigrationUri
    from pyvmm.monitor.recording import Recording
    from pyvmm.monitor.server import QmpServer

log = logging.getLogger(__name__)

T = TypeVar("T")
QUIT_REPLY_GRACE_S = 0.1  # let the `quit` reply reach the client before the socket closes


@dataclass
class RunOptions:
    image: str | None = None
    mem_bytes: int = 256 << 20
    vcpus: int = 1
    cmdline: str = ""
    serial_path: str | None = None
    qmp: str | None = None
    qmp_allow_remote: bool = False
    time_limit_s: float | None = None
    dirty_ring_entries: int | None = None  # None: bitmap mode; 0: the largest ring KVM offers
    dirty_ring_quirk: str = "auto"  # auto (probe) | lossy | reliable: dirty/ring_quirk.py
    dirty_ring_reaper: bool = True  # False: harvest only at syncs and ring-full exits
    incoming: str | None = None  # tcp:HOST:PORT, unix:PATH or "defer"
    start_paused: bool = False  # QEMU's -S
    serial2: str | None = None  # COM2's host side: unix:PATH[,server] or tcp:HOST:PORT[,server]
    colo_compare: str | None = None  # a COLO primary's comparator control socket (unix:PATH)


@dataclass
class IncomingStatus:
    """The destination's side of query-migrate."""

    status: str = "none"  # none | setup | active | completed | failed
    error_desc: str | None = None
    exit_on_error: bool = True  # QEMU's migrate-incoming exit-on-error (default true)
    uri: MigrationUri | None = None  # where we listen, with the real port for tcp port 0
    multifd_channels: int = 0  # the pages came over this many multifd channels

    def to_qmp(self) -> dict[str, Any]:
        if self.status == "none":
            return {}
        out: dict[str, Any] = {"status": self.status}
        if self.status == "setup" and self.uri is not None:  # QEMU's socket-address
            uri = self.uri
            if uri.kind == "tcp":
                address = {"type": "inet", "host": uri.host, "port": str(uri.port)}
            else:
                address = {"type": "unix", "path": uri.path}
            out["socket-address"] = [address]
        if self.multifd_channels:  # pyvmm's own: what the stream asked for
            out["x-multifd-channels"] = self.multifd_channels
        if self.error_desc is not None:
            out["error-desc"] = self.error_desc
        return out


class Vmm:
    def __init__(
        self,
        options: RunOptions,
        out: IO[str] | None = None,
        register_commands: Callable[[Vmm], None] | None = None,
        loop: ControlLoop | None = None,
    ) -> None:
        self.options = options
        self.out = out
        self.loop = loop or ControlLoop()
        self._register_commands = register_commands
        self.machine: Machine | None = None
        self.qmp: QmpServer | None = None
        self.run_state = "prelaunch"
        self.settings = MigrationSettings()
        self.migration: MigrationSource | None = None
        self.incoming: MigrationDestination | None = None
        self.incoming_status = IncomingStatus()
        self._incoming_thread: threading.Thread | None = None
        self._serial_file: IO[str] | None = None
        self._serial2: UartSocket | None = None
        self._shutdown_reason = "guest-shutdown"
        self._stopping = False
        self._late_lock = threading.RLock()  # serialises work once the loop has closed
        self._tracker: DirtyTracker | None = None
        self.ring_quirk: RingQuirk | None = None  # ring mode: does a full ring lose entries?
        self._dirty_rate: DirtyRateMonitor | None = None
        self._dirty_limit: DirtyLimitController | None = None
        self.recording: Recording | None = None  # timeline recording (x-pyvmm-timeline-*)
        self.colo_status = ColoStatus()  # query-colo-status, x-colo-lost-heartbeat
        self.colo_stats = ColoStats()  # x-query-colo-stats
        self.colo_session: ColoPrimary | ColoSecondary | None = None
        self.loop.on_signal = self.on_signal

    # --- life cycle --------------------------------------------------------------------------

    def build(self) -> None:
        """Everything up to (not including) starting the vCPUs; errors leave nothing behind."""
        opts = self.options
        try:
            if opts.serial_path:
                self._serial_file = open(opts.serial_path, "w", buffering=1)  # noqa: SIM115
            serial = SerialConsole(self._serial_file or self.out)
            install_kick_handler()  # here, on the main thread: vCPUs may be made elsewhere
            ring = opts.dirty_ring_entries  # 0: the machine picks KVM's largest ring
            config = MachineConfig(opts.mem_bytes, opts.vcpus, opts.cmdline, None, ring)
            self.machine = Machine(config, serial)  # it opens and owns /dev/kvm
            if opts.serial2:
                uart = ServiceUart()
                self.machine.attach_serial2(uart)
                self._serial2 = UartSocket(uart, parse_uart_address(opts.serial2))
                self._serial2.start()
            ring = self.machine.config.dirty_ring_entries  # 0 resolved to KVM's largest
            if ring:
                from pyvmm.dirty.ring_quirk import decide_ring_quirk

                self.ring_quirk = decide_ring_quirk(ring, opts.dirty_ring_quirk)
            if opts.incoming is None:
                if opts.image is None:
                    raise MachineError("no guest image given (and no --incoming)")
                self.machine.boot(load_pvh_image(resolve_image(opts.image)))
            elif opts.incoming != "defer":
                self.listen_incoming(opts.incoming)
            if opts.qmp:
                from pyvmm.monitor.server import QmpServer

                self.qmp = QmpServer(
                    opts.qmp, allow_remote=opts.qmp_allow_remote, executor=self.serialize
                )
                if self._register_commands is not None:
                    self._register_commands(self)
                self.qmp.listen()  # a bad address fails here, before a vCPU runs
        except BaseException:
            self.close()
            raise

    def run(self) -> MachineExit:
        """Build (unless done), start, serve the control loop until the VM ends."""
        if threading.current_thread() is threading.main_thread():
            self.loop.install_signal_handlers()
        try:
            if self.machine is None:
                self.build()
            assert self.machine is not None
            if self.options.incoming is not None:
                self._set_state("inmigrate")
                if self.incoming is not None:
                    self._start_incoming_thread()
            else:
                self.machine.start(paused=self.options.start_paused)
                self._set_state("paused" if self.options.start_paused else "running")
            if self.qmp is not None and not self.qmp.started:
                # Served only now, as QEMU's monitor answers only from its main loop: the
                # first query-status of a VM started without -S says "running".
                self.qmp.start()
            machine = self.machine
            limit_s = self.options.time_limit_s
            machine.on_exit = self.loop.stop  # the loop ends at once, not at its next poll
            ended = self.loop.run(lambda: machine.exit_status is not None, limit_s)
            if not ended:
                self._shutdown_reason = "host-signal"
                machine.request_exit(0, f"time limit of {self.options.time_limit_s} s reached")
            result = machine.exit_status
            assert result is not None
            self._set_state("internal-error" if result.error else "shutdown")
            self.emit_event(
                "SHUTDOWN",
                {
                    "guest": self._shutdown_reason == "guest-shutdown",
                    "reason": self._shutdown_reason,
                },
            )
            return result
        finally:
            self.loop.close()
            self.close()

    def close(self) -> None:
        self._stopping = True
        if self.recording is not None:
            self.recording.stop()  # gives the convergence logger back
        if self.colo_session is not None:  # a COLO loop waits for checkpoints or failover
            self.colo_session.wake()
        if self.migration is not None:
            self.migration.cancel()
            self.migration.wait(10)
        if self.incoming is not None:
            self.incoming.stop()
        if self._incoming_thread is not None:
            self._incoming_thread.join(10)
            self._incoming_thread = None
        if self.incoming is not None:
            self.incoming.close()
        if self._dirty_limit is not None:
            self._dirty_limit.close()
            self._dirty_limit = None
        if self._dirty_rate is not None:
            self._dirty_rate.close()
            self._dirty_rate = None
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self._serial2 is not None:
            self._serial2.close()
            self._serial2 = None
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        if self._serial_file is not None:
            self._serial_file.close()
            self._serial_file = None

    def serialize(self, fn: Callable[[], T]) -> T:
        """Run fn on the control loop (or, once it has closed, under one lock)."""
        try:
            return self.loop.call(fn)
        except LoopClosed:
            with self._late_lock:
                return fn()

    # --- events the loop acts on -------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        """SIGINT/SIGTERM, on the loop: end the VM (once; later signals change nothing)."""
        name = signal.Signals(signum).name
        if self._stopping:
            return
        self._stopping = True
        self._shutdown_reason = "host-signal"
        if self.incoming is not None:
            self.incoming.stop()
        if self.machine is not None:
            self.machine.request_exit(0, f"terminated by {name}")

    def request_quit(self) -> None:
        self._shutdown_reason = "host-qmp-quit"
        self._stopping = True
        if self.incoming is not None:
            self.incoming.stop()
        machine = self.machine
        if machine is not None:
            timer = threading.Timer(
                QUIT_REPLY_GRACE_S, machine.request_exit, (0, "quit requested over QMP")
            )
            timer.daemon = True
            timer.start()

    # --- incoming migration ------------------------------------------------------------------

    def listen_incoming(self, uri: str, exit_on_error: bool = True) -> str:
        """Start listening (at build time, or for QMP migrate-incoming); returns the URI."""
        assert self.machine is not None
        from pyvmm.migration.colo.secondary import ColoSecondary
        from pyvmm.migration.destination import MigrationDestination

        secondary = ColoSecondary(
            self.machine, lambda: self.dirty_tracker, self._secondary_hooks(),
            self.colo_status, self.colo_stats,
        )  # fmt: skip
        self.colo_session = secondary
        self.incoming = MigrationDestination(
            self.machine, uri, colo=secondary, multifd=self._incoming_multifd
        )
        bound = self.incoming.listen()
        self.incoming_status = IncomingStatus("setup", exit_on_error=exit_on_error, uri=bound)
        print(f"pyvmm: waiting for an incoming migration on {bound}", file=sys.stderr)
        if self.loop.on_loop_thread:  # migrate-incoming: the loop is already running
            self._start_incoming_thread()
        return str(bound)

    def _incoming_multifd(self) -> int | None:
        """multifd set here by QMP: the channels the source must use (None: learn them)."""
        if not self.settings.caps.get("multifd"):
            return None
        return int(self.settings["multifd-channels"])

    def _start_incoming_thread(self) -> None:
        self._incoming_thread = threading.Thread(
            target=self._receive_incoming, name="incoming-migration", daemon=True
        )
        self._incoming_thread.start()

    def _receive_incoming(self) -> None:
        """The incoming thread: receive, then report to the loop."""
        assert self.incoming is not None
        from pyvmm.migration.stream import StreamError

        try:
            result = self.incoming.receive(
                lambda running: self.serialize(lambda: self._start_incoming_guest(running)),
                lambda: self.serialize(self._incoming_active),
            )
        except (StreamError, ConnectionError, OSError, MachineError, LoopClosed) as exc:
            message = str(exc) or type(exc).__name__
            self.serialize(lambda: self._incoming_failed(message))
            return
        except Exception as exc:  # a bug: still one line for the user, the trace in the log
            log.exception("incoming migration: unexpected error")
            message = f"internal error: {exc!r}"
            self.serialize(lambda: self._incoming_failed(message))
            return
        log.info(
            "incoming migration done: %d bytes, %d pages, %d zero pages",
            result.bytes_received, result.pages_received, result.zero_pages,
        )  # fmt: skip

    def _incoming_active(self) -> None:
        if self.incoming_status.status == "setup":
            self.incoming_status.status = "active"
            self.record_event("incoming: the stream began (HEADER)")

    def _start_incoming_guest(self, running: bool) -> bool:
        """On GO, on the loop: start the vCPUs (held under -S); returns whether they run."""
        assert self.machine is not None
        if self._stopping:
            raise MachineError("the destination is shutting down")
        colo = self.incoming is not None and self.incoming.colo_enabled
        run = running and (not self.options.start_paused or colo)  # QEMU: -S ignored there
        self.machine.start(paused=not run)
        self._set_state("running" if run else "paused")
        self.incoming_status.status = "completed"
        if self.incoming is not None:
            self.incoming_status.multifd_channels = self.incoming.multifd_channels
        self.emit_event("RESUME" if run else "STOP")
        self.record_event("incoming: GO, vCPUs " + ("started" if run else "held (-S)"))
        return run

    def _incoming_failed(self, message: str) -> None:
        status = self.incoming_status
        status.status, status.error_desc = "failed", message
        log.warning("incoming migration failed: %s", message)
        self.record_event("incoming: failed", {"error": message})
        if self._stopping or self.machine is None:
            return
        if status.exit_on_error:
            self.machine.request_exit(1, f"incoming migration failed: {message}", error=True)

    def cancel_incoming(self) -> None:
        """migrate_cancel on a destination: fail the incoming migration in progress."""
        if self.incoming is not None and self.incoming_status.status in ("setup", "active"):
            self.incoming.stop("cancelled on the destination")

    # --- outgoing migration ------------------------------------------------------------------

    def start_migration(self, uri: str) -> None:
        assert self.machine is not None
        from pyvmm.migration.convergence import build_policies
        from pyvmm.migration.source import MigrationSource

        self.migration = MigrationSource(
            self.machine,
            self.dirty_tracker,
            self.settings,
            self.emit_event,
            self._set_state,
            lambda: self.run_state == "running",
            build_policies(self.settings.caps, self.dirty_limit_controller()),
            serialize=self.serialize,
            colo=self._colo_setup(),
        )
        if self.recording is not None and self.recording.active:
            self.recording.attach_migration(self.migration)
        self.migration.start(uri)

    # --- COLO (migration/colo/) ----------------------------------------------------------------

    def _colo_setup(self) -> ColoSetup:
        from pyvmm.migration.colo.primary import ColoSetup

        return ColoSetup(
            self.colo_status, self.colo_stats, self._compare_path(),
            lambda: self.serialize(self._colo_stop),
            lambda running: self.serialize(lambda: self._colo_resume(running)),
            lambda: self._stopping, self._set_colo_session, self.serialize,
        )  # fmt: skip

    def _compare_path(self) -> str | None:
        address = self.options.colo_compare
        return address[len("unix:") :] if address else None

    def _set_colo_session(self, session: ColoPrimary | None) -> None:
        self.colo_session = session

    def _colo_stop(self) -> bool:
        """A checkpoint stops this guest (QEMU's RUN_STATE_COLO); was it running?"""
        assert self.machine is not None
        was_running = self.run_state == "running"
        if was_running:
            self.machine.pause()
        self._set_state("colo")
        self.emit_event("STOP")
        return was_running

    def _colo_resume(self, was_running: bool) -> None:
        assert self.machine is not None
        if not was_running:
            self._set_state("paused")
            return
        self.machine.resume()
        self._set_state("running")
        self.emit_event("RESUME")

    def _secondary_hooks(self) -> SecondaryHooks:
        def set_status(status: str) -> None:
            self.incoming_status.status = status

        from pyvmm.migration.colo.secondary import SecondaryHooks

        return SecondaryHooks(
            lambda: self.serialize(self._colo_stop),
            lambda: self.serialize(lambda: self._colo_resume(True)),
            self.emit_event,
            lambda status: self.serialize(lambda: set_status(status)),
            lambda: self._stopping,
            self.serialize,
        )

    def dirty_limit_controller(self) -> DirtyLimitController | None:
        """The VM's dirty-limit controller (shared by QMP and migrations), or None."""
        machine = self.machine
        if self._dirty_limit is None and machine and machine.ring_bytes and machine.vcpus:
            # Created on first use, once the vCPUs (and their rings) exist; ring mode only.
            from pyvmm.migration.convergence.dirtylimit import DirtyLimitController

            self._dirty_limit = DirtyLimitController(
                machine, self.dirty_tracker, self.settings, lambda: self.migration
            )
        return self._dirty_limit

    # --- dirty tracking, created on first use ------------------------------------------------

    @property
    def dirty_tracker(self) -> DirtyTracker:
        if self._tracker is None:
            assert self.machine is not None
            from pyvmm.dirty.factory import make_tracker

            self._tracker = make_tracker(
                self.machine, self.ring_quirk, ring_reaper=self.options.dirty_ring_reaper
            )
        return self._tracker

    @property
    def dirty_rate(self) -> DirtyRateMonitor:
        if self._dirty_rate is None:
            assert self.machine is not None and self.machine.memory is not None
            from pyvmm.dirty.rate import DirtyRateMonitor

            self._dirty_rate = DirtyRateMonitor(self.machine.memory, self.dirty_tracker)
        return self._dirty_rate

    # --- run states (on the loop) ------------------------------------------------------------

    def record_event(self, name: str, args: dict[str, Any] | None = None) -> None:
        """An instant on the timeline when one is being recorded (else nothing)."""
        if self.recording is not None:
            self.recording.event(name, args)

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        if self.qmp is not None:
            self.qmp.emit_event(name, data)

    def _set_state(self, state: str) -> None:
        self.run_state = state

    def pause_guest(self) -> None:
        """QMP stop. During a switchover that has not committed, it decides the run state
        a failed migration goes back to."""
        migration = self.migration
        if self.run_state == "finish-migrate" and migration is not None:
            if not migration.committed:
                migration.resume_state = "paused"
            return
        if self.run_state != "running" or self.machine is None:
            return
        self.machine.pause()
        self._set_state("paused")
        self.emit_event("STOP")

    def resume_guest(self) -> None:
        if self.run_state != "paused" or self.machine is None:
            return
        self.machine.resume()
        self._set_state("running")
        self.emit_event("RESUME")
