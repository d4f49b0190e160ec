"""The source's multifd channels: one connection and one sender thread each.

The migration thread walks the bitmap as always (dirtypages.py) and hands each RangeTable
to a channel instead of sending it: MultifdPageWriter.send queues it on the next channel
with room (QEMU's multifd_send_pages picks the next idle channel the same way), and that
channel's thread frames it (hashing the pages with checksums on) and sends it with sendmsg
straight from guest RAM, the GIL released, while the migration thread walks on. Each
channel holds at most QUEUE_TABLES tables, so the walk runs at most that far ahead.

At every dirty sync (Precopy.sync, an iteration's end) sync_point queues a MULTIFD_SYNC on
every channel, writes one on the main stream and waits until the channels have sent
everything (QEMU's multifd_send_sync_main); at the
switchover, after the last pages, finish queues the final one, waits until every channel
has sent everything, and closes the channels, so the STATE on the main stream follows
every page. A channel that fails fails the migration at the migration thread's next
hand-over (ConnectionError naming the channel); migrate_cancel shuts every channel down.

Bytes count when a table is queued, as QEMU counts multifd-bytes in multifd_send_pages:
ram.multifd_bytes, and the main writer's bytes_sent (so transferred and the bandwidth the
convergence rules see include the channels).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from pyvmm.dirty.ranges import RangeTable
from pyvmm.machine.memory import PAGE_SIZE, GuestMemory
from pyvmm.migration import transport
from pyvmm.migration.multifd.wire import await_ready, new_session, send_hello
from pyvmm.migration.pagewriter import PageWriter, frame_table
from pyvmm.migration.precopy import MigrationCancelled
from pyvmm.migration.stats import RamStats
from pyvmm.migration.stream import (
    MAX_RUN_PAGES,
    MULTIFD,
    PAGE_HASH_BYTES,
    RECORD,
    RUN,
    SYNC_FINAL,
    VALUE,
    ZERO,
    RecordType,
    StreamReader,
    StreamWriter,
)

log = logging.getLogger(__name__)

QUEUE_TABLES = 2  # tables waiting per channel (a table is up to 16 MiB of data)
JOIN_TIMEOUT_S = 10.0
SYNC_BYTES = RECORD.size + VALUE.size


def table_bytes(table: RangeTable, checksum: bool) -> int:
    """The bytes frame_table will make of this table."""
    n = table.count
    zero = table.zero[:n].astype(bool)
    data_runs = table.npages[:n][~zero]
    records = int(np.sum((data_runs + (MAX_RUN_PAGES - 1)) // MAX_RUN_PAGES))
    page_bytes = PAGE_SIZE + (PAGE_HASH_BYTES if checksum else 0)
    return (
        int(zero.sum()) * (RECORD.size + ZERO.size)
        + records * (RECORD.size + RUN.size)
        + table.data_pages * page_bytes
    )


@dataclass
class _Job:
    table: RangeTable | None = None  # pages to send, or else a sync point
    may_change: bool = True
    sync: int = 0
    final: bool = False


class ChannelSender:
    def __init__(self, index: int, sock: socket.socket, checksum: bool) -> None:
        self.index = index
        self.sock = sock
        self.writer = StreamWriter(sock, checksum)
        self.queue: deque[_Job] = deque()
        self.busy = False  # its thread is sending a job
        self.thread: threading.Thread | None = None


class MultifdSender:
    def __init__(
        self, memory: GuestMemory, channels: int, checksum: bool, cancel: threading.Event
    ) -> None:
        self.memory = memory
        self.count = channels
        self.checksum = checksum
        self.cancel = cancel
        self.channels: list[ChannelSender] = []
        self._cond = threading.Condition()
        self._next = 0
        self._error: BaseException | None = None
        self._closing = False

    # --- setup: the handshake -----------------------------------------------------------------

    def connect(
        self, uri: transport.MigrationUri, main: StreamWriter, replies: StreamReader
    ) -> None:
        """Ask for the channels on the main stream, open them, and wait for the answer."""
        session = new_session()
        main.record(RecordType.MULTIFD, MULTIFD.pack(self.count, 0, session))
        for index in range(self.count):
            if self.cancel.is_set():
                raise MigrationCancelled
            sock = transport.connect(uri)
            channel = ChannelSender(index, sock, self.checksum)
            with self._cond:
                if self._closing:  # a cancel came meanwhile: close() no longer sees it
                    sock.close()
                    raise MigrationCancelled
                self.channels.append(channel)
            send_hello(channel.writer, index, self.count, session)
            main.bytes_sent += channel.writer.bytes_sent
        await_ready(replies, self.count)
        for channel in self.channels:
            channel.thread = threading.Thread(
                target=self._run, args=(channel,), name=f"multifdsend_{channel.index}",
                daemon=True,
            )  # fmt: skip
            channel.thread.start()
        log.info("multifd: %d channels connected", self.count)

    # --- the migration thread -----------------------------------------------------------------

    def _raise(self) -> None:
        if self.cancel.is_set():
            raise MigrationCancelled
        if self._error is not None:
            raise self._error
        if self._closing:
            raise ConnectionError("the multifd channels are closed")

    def queue_table(self, table: RangeTable, may_change: bool) -> None:
        """Hand a table to the next channel with room (waits while all are full)."""
        job = _Job(table, may_change)
        with self._cond:
            while True:
                self._raise()
                for step in range(self.count):
                    i = (self._next + step) % self.count
                    channel = self.channels[i]
                    if len(channel.queue) < QUEUE_TABLES:
                        channel.queue.append(job)
                        self._next = (i + 1) % self.count
                        self._cond.notify_all()
                        return
                self._cond.wait()

    def sync(self, number: int, final: bool) -> None:
        """A sync point on every channel, after what each already holds."""
        with self._cond:
            self._raise()
            for channel in self.channels:
                channel.queue.append(_Job(None, sync=number, final=final))
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every channel has sent everything queued."""
        with self._cond:
            while True:
                self._raise()
                if not any(c.queue or c.busy for c in self.channels):
                    return
                self._cond.wait()

    # --- the channel threads ------------------------------------------------------------------

    def _run(self, channel: ChannelSender) -> None:
        try:
            while True:
                with self._cond:
                    while not channel.queue and self._error is None and not self._closing:
                        self._cond.wait()
                    if self._error is not None or self._closing:
                        return
                    job = channel.queue.popleft()
                    channel.busy = True
                self._send(channel, job)
                with self._cond:
                    channel.busy = False
                    self._cond.notify_all()
                if job.final:
                    return
        except Exception as exc:
            self._fail(channel, exc)

    def _send(self, channel: ChannelSender, job: _Job) -> None:
        writer = channel.writer
        if job.table is None:
            writer.record(RecordType.MULTIFD_SYNC, VALUE.pack(job.sync),
                          arg=SYNC_FINAL if job.final else 0)  # fmt: skip
            return
        mem = memoryview(self.memory.regions[job.table.slot].mm)
        writer.send(frame_table(writer, mem, job.table, job.may_change))

    def _fail(self, channel: ChannelSender, exc: Exception) -> None:
        if isinstance(exc, OSError):
            what = exc.strerror or type(exc).__name__
        else:
            what = str(exc) or type(exc).__name__
        error = ConnectionError(f"multifd channel {channel.index} failed: {what}")
        with self._cond:
            first = self._error is None and not self._closing
            if first:
                self._error = error
            self._cond.notify_all()
        if first:
            log.warning("%s", error)
            self._shutdown()

    # --- the end ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        for channel in self.channels:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        """Stop every channel now (migrate_cancel, from any thread): blocked sends end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._shutdown()

    def close(self) -> None:
        """Stop the threads and close the connections (safe to call twice)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            channels = list(self.channels)
        for channel in channels:
            if channel.thread is not None and channel.thread.is_alive():
                with contextlib.suppress(OSError):
                    channel.sock.shutdown(socket.SHUT_RDWR)
        for channel in channels:
            if channel.thread is not None:
                channel.thread.join(JOIN_TIMEOUT_S)
            channel.sock.close()


class MultifdPageWriter(PageWriter):
    """PageWriter's interface over multifd channels: tables go to the channels, sync points
    to every channel and the main stream."""

    def __init__(
        self, memory: GuestMemory, writer: StreamWriter, ram: RamStats, sender: MultifdSender
    ) -> None:
        super().__init__(memory, writer, ram)
        self.sender = sender
        self.syncs = 0

    def send(self, table: RangeTable) -> int:
        nbytes = table_bytes(table, self.sender.checksum)
        self.sender.queue_table(table, not self.in_downtime)
        self._account(nbytes)
        self.count(table, nbytes)
        return nbytes

    def _account(self, nbytes: int) -> None:
        self.writer.bytes_sent += nbytes
        self.ram.multifd_bytes += nbytes
        self.ram.transferred = self.writer.bytes_sent

    def _sync(self, final: bool) -> None:
        self.syncs += 1
        self.sender.sync(self.syncs, final)
        self._account(SYNC_BYTES * self.sender.count)
        self.writer.record(RecordType.MULTIFD_SYNC, VALUE.pack(self.syncs),
                           arg=SYNC_FINAL if final else 0)  # fmt: skip

    def sync_point(self) -> None:
        """As QEMU's multifd_send_sync_main: the sync point goes out on every channel, and
        the migration waits until every channel has sent it, so what the sync left dirty
        is all that remains (the switchover's estimate counts no queued tables)."""
        self._sync(final=False)
        self.sender.drain()

    def finish(self) -> None:
        self._sync(final=True)
        self.sender.drain()
        self.sender.close()
