"""One COLO checkpoint, the primary's side: a sequence of requests and answers, in the
order of the ORBIT branch's colo_do_checkpoint_transaction (docs/colo.md has the picture):

    primary                                              secondary
    CHECKPOINT_REQUEST[_PASSIVE](n)  ------------------>  stops (unless already stopped)
    relax wait (after a miscompare); pre-send dirty RAM
    while more than x-colo-migrate-ram-threshold is dirty
    stop (run state colo); capture the machine state
    tell the comparator (checkpoint n, its stream positions); it acknowledges
    VMSTATE_SEND, the dirty pages (RAM_RUN, ZERO_RUN)  ->  into its RAM cache
    VMSTATE_SIZE(size), STATE  ------------------------>  buffered whole
                      <--------------------------------   VMSTATE_RECEIVED(its output position)
    the comparator releases the answers checkpoint n commits
                      <--------------------------------   VMSTATE_LOADED(its vCPU time), applied
    resume                                                resumes, unless passive

The comparator releases only after VMSTATE_RECEIVED: before it, a primary that died
would leave a secondary without the state those answers came from (the ORBIT code's
comment in colo_do_checkpoint_transaction says the same). Any failure raises; the loop
(primary.py) decides what happens to the VMs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pyvmm.machine.machine import Machine
from pyvmm.machine.state import capture
from pyvmm.migration.clock import Clock
from pyvmm.migration.colo.hybrid import COLO, PASSIVE
from pyvmm.migration.colo.notify import CompareLink
from pyvmm.migration.colo.stats import CheckpointRecord
from pyvmm.migration.dirtypages import DirtyPages
from pyvmm.migration.pagewriter import PageWriter
from pyvmm.migration.stream import (
    RecordType,
    ReplyType,
    StreamReader,
    StreamWriter,
)
from pyvmm.migration.switchover import expect_reply

log = logging.getLogger(__name__)

PRESEND_ITERATIONS = 3  # at most this many pre-send passes before the stop
REPLY_TIMEOUT_S = 60.0


class FailoverRequested(Exception):
    """x-colo-lost-heartbeat came while a checkpoint was being prepared."""


class Checkpoint:
    """The primary's side; one object for the whole COLO run (it keeps the counters)."""

    def __init__(
        self,
        machine: Machine,
        pages: DirtyPages,
        page_writer: PageWriter,
        writer: StreamWriter,
        reader: StreamReader,
        clock: Clock,
        link: CompareLink | None,
        stop: Callable[[], bool],
        resume: Callable[[bool], None],
        failover: threading.Event,
    ) -> None:
        self.machine = machine
        self.pages = pages
        self.page_writer = page_writer
        self.writer = writer
        self.reader = reader
        self.clock = clock
        self.link = link
        self._stop = stop  # on the control loop; returns "the guest was running"
        self._resume = resume  # on the control loop
        self.failover = failover
        self.stopped = False  # the primary is stopped by a checkpoint now
        self.was_running = True
        self.secondary_vcpu_us = 0  # from the last VMSTATE_LOADED

    def run(
        self, number: int, passive: bool, reason: str, length_ms: float, relax_ms: float,
        threshold_bytes: int,
    ) -> CheckpointRecord:  # fmt: skip
        clock, writer = self.clock, self.writer
        start_ms = clock.now_ms()
        bytes_before = writer.bytes_sent
        request = RecordType.CHECKPOINT_REQUEST
        if passive:
            request = RecordType.CHECKPOINT_REQUEST_PASSIVE
        writer.value(request, number)
        if relax_ms > 0 and clock.wait(self.failover, relax_ms / 1000):
            raise FailoverRequested
        presend = self._presend(threshold_bytes)
        if self.failover.is_set():
            raise FailoverRequested
        self.was_running = self._stop()
        self.stopped = True
        stop_ms = clock.now_ms()
        state = capture(self.machine)  # completes pending I/O first: before the sync
        data = state.to_bytes()
        if self.link is not None:
            pvm_tx, pvm_sent, pvm_rx = self._positions(state.devices.get("serial2"))
            mode = PASSIVE if passive else COLO
            self.link.checkpoint(number, mode, pvm_tx, pvm_sent, pvm_rx)
        writer.record(RecordType.VMSTATE_SEND)
        self.page_writer.in_downtime = True
        self.pages.sync()
        sent_pages = self.pages.count()
        self._send_all()
        writer.value(RecordType.VMSTATE_SIZE, len(data))
        writer.state(data)
        svm_tx = self._expect(ReplyType.VMSTATE_RECEIVED, "receiving the checkpoint")
        if self.link is not None:
            self.link.release(number, svm_tx)
        self.secondary_vcpu_us = self._expect(ReplyType.VMSTATE_LOADED, "loading the checkpoint")
        self._resume(self.was_running)
        self.stopped = False
        end_ms = clock.now_ms()
        return CheckpointRecord(
            number, PASSIVE if passive else COLO, reason, length_ms, end_ms - stop_ms,
            end_ms - start_ms, writer.bytes_sent - bytes_before, sent_pages, presend,
            time.monotonic(),
        )  # fmt: skip

    def _presend(self, threshold_bytes: int) -> int:
        """Derek Su's idea (x-colo-migrate-ram-threshold): while more than the threshold
        is dirty, send it with the guest running, so less is left for the stop."""
        sent = 0
        for _ in range(PRESEND_ITERATIONS):
            self.pages.sync()  # what is left stays queued for the stop
            if self.pages.remaining_bytes() <= threshold_bytes:
                break
            before = self.writer.bytes_sent
            self.page_writer.in_downtime = False
            self._send_all()
            sent += self.writer.bytes_sent - before
        return sent

    def _send_all(self) -> None:
        """Every page set in the view, read now (the walk clears what it takes)."""
        pages = self.pages
        while (table := pages.take()) is not None:
            self.page_writer.send(table)

    def _positions(self, serial2: dict | None) -> tuple[int, int, int]:
        """The primary's COM2 stream positions at its stop: output (every byte its guest
        wrote), the part of it already handed to the socket, and input (the end of the
        captured receive queue)."""
        uart = self.machine.serial2
        if uart is None or serial2 is None:
            return 0, 0, 0
        pos = uart.stream_positions()
        return pos["tx"], pos["sent"], int(serial2["rx_end"])

    def _expect(self, want: ReplyType, doing: str) -> int:
        expect_reply(self.reader, want, doing, "secondary")
        return self.reader.reply_value
