"""The secondary's COLO loop: receive a checkpoint whole, say so, apply it atomically, say
so, run on (or stay stopped while passive). The ORBIT branch's
colo_process_incoming_thread, with pyvmm's records (protocol.py has their order).

Before the secondary first runs (right after the migration's GO) `prepare` copies its RAM
into the RAM cache (ramcache.py) and opens its own dirty view: the pages it dirties
itself are the ones a checkpoint must put back. Then, per checkpoint:

1. CHECKPOINT_REQUEST[_PASSIVE](n): stop, unless a passive checkpoint left it stopped;
2. pages (pre-sent, then after VMSTATE_SEND) go into the cache, never into its RAM;
3. VMSTATE_SIZE and STATE: the machine state, buffered whole and parsed;
4. VMSTATE_RECEIVED(its COM2 output position at the stop): everything is here;
5. apply: finish half-done I/O, then copy from the cache every page the checkpoint
   brought or the secondary dirtied, then restore the vCPUs and devices (its COM2 output
   queue becomes the primary's: both send those bytes after they resume, so both
   output streams go on alike);
6. VMSTATE_LOADED(its vCPU time, us), and run again unless the checkpoint was passive.

A checkpoint cut off before step 4 changes nothing: the secondary stays where it was (its
own state in COLO mode, the last checkpoint in passive mode). One cut after step 4 is
still applied: the comparator may already have released the answers it commits.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyvmm.dirty.tracker import DirtyTracker, DirtyView
from pyvmm.machine.errors import MachineError
from pyvmm.machine.machine import Machine
from pyvmm.machine.state import MachineState, complete_pending_io, restore
from pyvmm.migration.colo.hybrid import COLO, PASSIVE
from pyvmm.migration.colo.protocol import ColoValidator
from pyvmm.migration.colo.ramcache import RamCache
from pyvmm.migration.colo.stats import ColoStats
from pyvmm.migration.colo.status import SECONDARY, ColoStatus, FailoverState
from pyvmm.migration.pagecheck import PageChecker
from pyvmm.migration.stream import (
    PAGE_HASH_BYTES,
    RUN,
    RUN_MAY_CHANGE,
    ZERO,
    RecordType,
    ReplyType,
    StreamConfig,
    StreamError,
    StreamReader,
    StreamWriter,
)

log = logging.getLogger(__name__)

EXIT_POLL_S = 0.2


@dataclass
class SecondaryHooks:
    """What the loop needs from the VMM; each runs on the control loop."""

    stop: Callable[[], None]  # stop the guest (run state colo, STOP)
    start: Callable[[], None]  # run it (running, RESUME)
    emit: Callable[[str, dict[str, Any] | None], None]
    set_status: Callable[[str], None]  # the incoming migration's status: colo, completed
    closing: Callable[[], bool] = lambda: False
    serialize: Callable[[Callable[[], Any]], Any] = lambda fn: fn()  # the control loop


def vcpu_seconds(machine: Machine) -> float:
    """CPU time the machine's vCPU threads have used (each thread's own clock)."""
    total = 0.0
    for vcpu in machine.vcpus:
        thread = vcpu.thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            with contextlib.suppress(OSError, ProcessLookupError):
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return total


class ColoSecondary:
    def __init__(
        self, machine: Machine, tracker: Callable[[], DirtyTracker], hooks: SecondaryHooks,
        status: ColoStatus, stats: ColoStats,
    ) -> None:  # fmt: skip
        """tracker: the machine's dirty tracker, asked for once COLO begins (a ring
        tracker needs the vCPUs, which the migration's HEADER creates)."""
        self.machine = machine
        self.tracker = tracker
        self.hooks = hooks
        self.status = status
        self.stats = stats
        self.cache: RamCache | None = None
        self._view: DirtyView | None = None
        self._sock: socket.socket | None = None
        self.running = False
        self.error: str | None = None
        self._start_tx = 0  # its COM2 output position when it first ran

    def lost_heartbeat(self) -> None:
        """x-colo-lost-heartbeat (on the control loop): unblock the loop. A checkpoint
        being applied is finished first (QEMU's FAILOVER_STATUS_RELAUNCH)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def expect(self) -> None:
        """COLO_ENABLE arrived, before the migration's state: the comparator feeds this
        VM's COM2 the same stream as the primary's, so restored queues line up with it
        (machine/uart.py)."""
        if self.machine.serial2 is not None:
            self.machine.serial2.aligned = True

    def wake(self) -> None:
        """The VMM is shutting down: unblock the loop."""
        self.lost_heartbeat()

    def prepare(self) -> None:
        """After the migration's state is loaded, before the guest first runs."""
        memory = self.machine.memory
        assert memory is not None
        self.hooks.serialize(lambda: self.status.enter(SECONDARY))
        self.stats.role = SECONDARY
        self.cache = RamCache(memory)
        self._start_tx = self._output_position()
        self._view = self.tracker().open_view("colo-secondary")
        # A fresh dirty log reads all dirty (KVM_DIRTY_LOG_INITIALLY_SET): take that now,
        # while the guest has not run, so only its own writes count from here on.
        self._view.sync()
        with self._view.lock:
            for bitmap in self._view.bitmaps:
                bitmap.fill(np.uint64(0))
        log.info("colo: secondary RAM cache of %d MiB", self.cache.size_bytes >> 20)

    def run(
        self, sock: socket.socket, reader: StreamReader, writer: StreamWriter,
        config: StreamConfig,
    ) -> None:  # fmt: skip
        """The COLO phase on the incoming connection, until failover; never raises."""
        self._sock = sock
        self.running = True
        self.stats.set_mode(COLO, time.monotonic())
        try:
            self.hooks.set_status("colo")
            # Where its output stood when it started from the primary's state: the
            # comparator reads what follows as the primary's, from the switchover on.
            writer.value(ReplyType.CHECKPOINT_READY, self._start_tx)
            self._loop(sock, reader, writer, config)
        except Exception as exc:  # every failure ends COLO the same way
            if not self.status.requested.is_set():
                self.error = str(exc) or type(exc).__name__
        self._finish()

    def _output_position(self) -> int:
        uart = self.machine.serial2
        return uart.stream_positions()["sent"] if uart is not None else 0

    def _loop(
        self, sock: socket.socket, reader: StreamReader, writer: StreamWriter,
        config: StreamConfig,
    ) -> None:  # fmt: skip
        validator = ColoValidator(config, reader.checksum)
        deadline = reader.deadline_s
        while True:
            reader.deadline_s = None  # the next request may be x-colo-max-time away
            sock.settimeout(None)
            rtype, _, length = reader.record()
            reader.deadline_s = deadline
            validator.check_record(rtype, length)
            if rtype is RecordType.ABANDON:
                raise StreamError(f"the primary left COLO: {reader.reason(length, 'ABANDON')}")
            number = reader.value(length, rtype.name)
            validator.check_number(number)
            passive = rtype is RecordType.CHECKPOINT_REQUEST_PASSIVE
            self._checkpoint(number, passive, reader, writer, validator, config)

    def _checkpoint(
        self, number: int, passive: bool, reader: StreamReader, writer: StreamWriter,
        validator: ColoValidator, config: StreamConfig,
    ) -> None:  # fmt: skip
        assert self.cache is not None and self._view is not None
        start = time.monotonic()
        if self.running:
            self.hooks.stop()
            self.running = False
        checker = None
        if reader.checksum:
            checker = PageChecker(self.cache.arrays)
        try:
            data = self._receive(reader, validator, checker)
            if checker is not None:
                checker.finish()
            state = self._parse(data, config)
        except Exception:
            self.cache.forget_received()
            raise
        finally:
            if checker is not None:
                checker.close()
        svm_tx = self._output_position()
        writer.value(ReplyType.VMSTATE_RECEIVED, svm_tx)
        restored = self._apply(state)
        stats = self.stats
        with stats.lock:
            stats.applied += 1
            stats.last_applied = number
            stats.last_applied_tx = svm_tx
        vcpu_s = vcpu_seconds(self.machine)
        stats.secondary_vcpu_s = vcpu_s
        log.info(
            "colo checkpoint applied number=%d mode=%s pages=%d ms=%.1f",
            number, PASSIVE if passive else COLO, restored, (time.monotonic() - start) * 1000,
        )  # fmt: skip
        writer.value(ReplyType.VMSTATE_LOADED, int(vcpu_s * 1e6))
        stats.set_mode(PASSIVE if passive else COLO, time.monotonic())
        if not passive:
            self.hooks.start()
            self.running = True

    def _receive(
        self, reader: StreamReader, validator: ColoValidator, checker: PageChecker | None
    ) -> bytearray:
        """Records up to the STATE; its payload."""
        assert self.cache is not None
        pages = validator.pages
        while True:
            rtype, arg, length = reader.record()
            validator.check_record(rtype, length)
            if checker is not None:
                checker.raise_error()
            if rtype is RecordType.ABANDON:
                raise StreamError(f"the primary left COLO: {reader.reason(length, 'ABANDON')}")
            if rtype is RecordType.RAM_RUN:
                slot, _, first = RUN.unpack(reader.read(RUN.size, "a RAM_RUN record"))
                npages = pages.run_pages(length)
                size = npages * PAGE_HASH_BYTES if reader.checksum else 0
                table = reader.read(size, "a page-hash table")
                reader.end_record("RAM_RUN")
                pages.check_pages(slot, first, npages)
                if checker is not None:
                    checker.before_write(slot, first, npages)
                reader.read_into(self.cache.target(slot, first, npages), "page data", False)
                if checker is not None:
                    changed = bool(arg & RUN_MAY_CHANGE)
                    checker.ram_run(reader.record_index, slot, first, table, changed)
            elif rtype is RecordType.ZERO_RUN:
                payload = reader.read(ZERO.size, "a ZERO_RUN record")
                reader.end_record("ZERO_RUN")
                slot, _, first, npages = ZERO.unpack(payload)
                pages.check_pages(slot, first, npages)
                if checker is not None:
                    checker.before_write(slot, first, npages)
                self.cache.zero(slot, first, npages)
                if checker is not None:
                    checker.zero_run(slot, first, npages)
            elif rtype is RecordType.VMSTATE_SEND:
                reader.end_record("VMSTATE_SEND")
            elif rtype is RecordType.VMSTATE_SIZE:
                validator.check_size(reader.value(length, "VMSTATE_SIZE"))
            else:  # STATE: the validator let nothing else through
                data = reader.read(length, "the STATE record")
                reader.end_record("STATE")
                return data

    @staticmethod
    def _parse(data: bytearray, config: StreamConfig) -> MachineState:
        try:
            return MachineState.from_bytes(data, vcpus=config.vcpus, irqchip=config.irqchip)
        except MachineError as exc:
            raise StreamError(f"bad machine state in the checkpoint: {exc}") from None

    def _apply(self, state: MachineState) -> int:
        """The atomic part: RAM from the cache, then vCPUs and devices; the guest is
        stopped throughout. Returns the pages copied."""
        assert self.cache is not None and self._view is not None
        machine, view = self.machine, self._view
        complete_pending_io(machine, "colo apply")
        view.sync()
        with view.lock:
            own = [b.copy() for b in view.bitmaps]
            for bitmap in view.bitmaps:
                bitmap.fill(np.uint64(0))
        restored = self.cache.apply(own)
        restore(machine, state)
        return restored

    def _finish(self) -> None:
        status, hooks = self.status, self.hooks
        reason = status.exit_reason()
        if self.error is not None:
            log.warning("colo ended on the secondary: %s", self.error)
        hooks.emit("COLO_EXIT", {"mode": SECONDARY, "reason": reason})
        while not status.requested.wait(EXIT_POLL_S):
            if hooks.closing():
                break
        hooks.serialize(lambda: status.set_failover(FailoverState.REQUIRE, FailoverState.ACTIVE))
        self.lost_heartbeat()
        if self._view is not None:
            self._view.close()
        self.cache = None
        if not self.running and not hooks.closing():
            hooks.start()  # QEMU: "-S" is ignored on the secondary side
            self.running = True

        def done() -> None:
            status.set_failover(FailoverState.ACTIVE, FailoverState.COMPLETED)
            status.leave()

        hooks.serialize(done)
        hooks.set_status("completed")
        log.info("colo failover done on the secondary: it serves now")
