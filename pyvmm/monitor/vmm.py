"""One pyvmm process: a machine, its console, its QMP monitor, its migrations, and how it
ends.

This is the top of the library: `pyvmm run` only parses arguments into
RunOptions and calls Vmm.run(). Run states use QEMU's names (prelaunch,
running, paused, inmigrate, finish-migrate, postmigrate, shutdown,
internal-error), reported by query-status.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

from pyvmm.dirty.factory import make_tracker
from pyvmm.dirty.rate import DirtyRateMonitor
from pyvmm.dirty.ring_quirk import RingQuirk, decide_ring_quirk
from pyvmm.dirty.tracker import DirtyTracker
from pyvmm.kvm import Kvm
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.dirty_ring_setup import max_ring_entries
from pyvmm.machine.elf import load_pvh_image
from pyvmm.machine.errors import MachineError
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig, MachineExit
from pyvmm.migration.convergence import build_policies
from pyvmm.migration.convergence.dirtylimit import DirtyLimitController
from pyvmm.migration.destination import MigrationDestination
from pyvmm.migration.params import MigrationSettings
from pyvmm.migration.source import MigrationSource
from pyvmm.migration.stream import StreamError
from pyvmm.monitor.commands_dirty import register_dirty_commands
from pyvmm.monitor.commands_dirtylimit import register_dirtylimit_commands
from pyvmm.monitor.commands_machine import register_machine_commands
from pyvmm.monitor.commands_migration import register_migration_commands
from pyvmm.monitor.server import QmpServer

log = logging.getLogger(__name__)

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


class Vmm:
    def __init__(self, options: RunOptions, out: IO[str] | None = None) -> None:
        self.options = options
        self.out = out
        self.machine: Machine | None = None
        self.qmp: QmpServer | None = None
        self.run_state = "prelaunch"
        self.settings = MigrationSettings()
        self.migration: MigrationSource | None = None
        self.incoming: MigrationDestination | None = None
        self.incoming_status = "none"
        self._incoming_ready = threading.Event()
        self._serial_file: IO[str] | None = None
        self._shutdown_reason = "guest-shutdown"
        self._state_lock = threading.Lock()
        self._stopping = threading.Event()
        self._tracker: DirtyTracker | None = None
        self.ring_quirk: RingQuirk | None = None  # ring mode: does a full ring lose entries?
        self._dirty_rate: DirtyRateMonitor | None = None
        self._dirty_limit: DirtyLimitController | None = None

    # --- life cycle --------------------------------------------------------------------------

    def build(self) -> None:
        """Everything up to (not including) starting the vCPUs; errors leave nothing behind."""
        opts = self.options
        try:
            if opts.serial_path:
                self._serial_file = open(opts.serial_path, "w", buffering=1)  # noqa: SIM115
            serial = SerialConsole(self._serial_file or self.out)
            kvm = Kvm()
            ring = opts.dirty_ring_entries
            if ring == 0:
                ring = max_ring_entries(kvm)
            if ring:
                self.ring_quirk = decide_ring_quirk(ring, opts.dirty_ring_quirk)
            config = MachineConfig(opts.mem_bytes, opts.vcpus, opts.cmdline, None, ring)
            self.machine = Machine(config, serial, kvm)
            if opts.incoming is None:
                if opts.image is None:
                    raise MachineError("no guest image given (and no --incoming)")
                self.machine.boot(load_pvh_image(resolve_image(opts.image)))
            elif opts.incoming != "defer":
                self.listen_incoming(opts.incoming)
            if opts.qmp:
                self.qmp = QmpServer(opts.qmp, allow_remote=opts.qmp_allow_remote)
                register_machine_commands(self)
                register_dirty_commands(self)
                register_migration_commands(self)
                register_dirtylimit_commands(self)
                self.qmp.start()
        except BaseException:
            self.close()
            raise

    def run(self) -> MachineExit:
        """Build (unless done), start and wait for the end; SIGINT/SIGTERM end it cleanly."""
        if self.machine is None:
            self.build()
        self._install_signal_handlers()
        assert self.machine is not None
        try:
            if self.options.incoming is not None:
                failure = self._receive_incoming()
                if failure is not None:
                    return failure
            else:
                self.machine.start(paused=self.options.start_paused)
                self._set_state("paused" if self.options.start_paused else "running")
            result = self.machine.wait(self.options.time_limit_s)
            if result is None:
                self.machine.request_exit(0, f"time limit of {self.options.time_limit_s} s reached")
                self._shutdown_reason = "host-signal"
                result = self.machine.exit_status
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
            self.close()

    def close(self) -> None:
        self._stopping.set()
        if self.migration is not None:
            self.migration.cancel()
            self.migration.wait(10)
        if self.incoming is not None:
            self.incoming.stop()
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
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        if self._serial_file is not None:
            self._serial_file.close()
            self._serial_file = None

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            self._shutdown_reason = "host-signal"
            self._stopping.set()
            if self.incoming is not None:
                self.incoming.stop()
            if self.machine is not None:
                self.machine.request_exit(0, f"terminated by {name}")

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    # --- incoming migration ------------------------------------------------------------------

    def listen_incoming(self, uri: str) -> str:
        """Start listening (at build time, or for QMP migrate-incoming); returns the URI."""
        assert self.machine is not None
        self.incoming = MigrationDestination(self.machine, uri)
        bound = str(self.incoming.listen())
        print(f"pyvmm: waiting for an incoming migration on {bound}", file=sys.stderr)
        self._incoming_ready.set()
        return bound

    def _receive_incoming(self) -> MachineExit | None:
        assert self.machine is not None
        self._set_state("inmigrate")
        while not self._incoming_ready.wait(0.2):  # --incoming defer: wait for the URI
            if self._stopping.is_set():
                return self.machine.exit_status or MachineExit(0, "stopped before any migration")
        assert self.incoming is not None
        self.incoming_status = "active"
        try:
            result = self.incoming.receive()
        except (StreamError, ConnectionError, OSError, MachineError) as exc:
            self.incoming_status = "failed"
            if self._stopping.is_set() and self.machine.exit_status is not None:
                return self.machine.exit_status
            return MachineExit(1, f"incoming migration failed: {exc}", error=True)
        self.incoming_status = "completed"
        run = result.guest_running and not self.options.start_paused
        self.machine.start(paused=not run)
        self._set_state("running" if run else "paused")
        self.emit_event("RESUME" if run else "STOP")
        log.info(
            "incoming migration done: %d bytes, %d pages, %d zero pages",
            result.bytes_received, result.pages_received, result.zero_pages,
        )  # fmt: skip
        return None

    # --- outgoing migration ------------------------------------------------------------------

    def start_migration(self, uri: str) -> None:
        assert self.machine is not None
        self.migration = MigrationSource(
            self.machine,
            self.dirty_tracker,
            self.settings,
            self.emit_event,
            self._set_state,
            lambda: self.run_state == "running",
            build_policies(self.settings.caps, self.dirty_limit_controller()),
        )
        self.migration.start(uri)

    def dirty_limit_controller(self) -> DirtyLimitController | None:
        """The VM's dirty-limit controller (shared by QMP and migrations), or None."""
        machine = self.machine
        if self._dirty_limit is None and machine and machine.ring_bytes and machine.vcpus:
            # Created on first use, once the vCPUs (and their rings) exist; ring mode only.
            self._dirty_limit = DirtyLimitController(
                machine, self.dirty_tracker, self.settings, lambda: self.migration
            )
        return self._dirty_limit

    # --- dirty tracking, created on first use ------------------------------------------------

    @property
    def dirty_tracker(self) -> DirtyTracker:
        if self._tracker is None:
            assert self.machine is not None
            self._tracker = make_tracker(
                self.machine, self.ring_quirk, ring_reaper=self.options.dirty_ring_reaper
            )
        return self._tracker

    @property
    def dirty_rate(self) -> DirtyRateMonitor:
        if self._dirty_rate is None:
            assert self.machine is not None and self.machine.memory is not None
            self._dirty_rate = DirtyRateMonitor(self.machine.memory, self.dirty_tracker)
        return self._dirty_rate

    # --- control used by QMP -----------------------------------------------------------------

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        if self.qmp is not None:
            self.qmp.emit_event(name, data)

    def _set_state(self, state: str) -> None:
        with self._state_lock:
            self.run_state = state

    def pause_guest(self) -> None:
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

    def request_quit(self) -> None:
        self._shutdown_reason = "host-qmp-quit"
        self._stopping.set()
        if self.incoming is not None:
            self.incoming.stop()
        machine = self.machine
        if machine is not None:
            timer = threading.Timer(
                QUIT_REPLY_GRACE_S, machine.request_exit, (0, "quit requested over QMP")
            )
            timer.daemon = True
            timer.start()
