"""The destination's multifd channels: one receiver thread per connection.

After the main stream's MULTIFD record the destination accepts connections on its
listening address until every channel has sent its preamble and CHANNEL record (each on a
thread of its own, so a silent stray connection holds nothing up; one that sends nothing
is ignored, as before a migration), then answers CHANNELS_READY. From then on each
channel's thread reads its records and applies them as the main stream's are applied
(recv_into straight into guest RAM, after the same checks), with a page checker of its own
when records carry checksums. At each MULTIFD_SYNC it waits for the others (barrier.py);
the main stream's MULTIFD_SYNC takes part too, and its final one returns only when every
channel has received, applied and checked its last page, which is what the STATE waits for.

A channel that fails records the first error, aborts the barrier, shuts the other channels
down and interrupts the main stream's read, so the destination fails with the channel's
one line (and tells the source, on the main stream, in its ERROR reply).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvmm.migration import transport
from pyvmm.migration.incoming_pages import IncomingResult, load_ram_run, load_zero_run
from pyvmm.migration.multifd.barrier import SyncBarrier
from pyvmm.migration.multifd.wire import read_hello
from pyvmm.migration.pagecheck import PageChecker, UnconfirmedPages
from pyvmm.migration.stream import (
    SYNC_FINAL,
    Liveness,
    NothingReceived,
    RecordType,
    StreamConfig,
    StreamError,
    StreamReader,
    StreamValidator,
)

if TYPE_CHECKING:
    from pyvmm.machine.memory import GuestMemory

log = logging.getLogger(__name__)

ACCEPT_POLL_S = 0.2
JOIN_TIMEOUT_S = 10.0


class ChannelReceiver:
    def __init__(self, owner: MultifdReceiver, sock: socket.socket, peer: str) -> None:
        self.owner = owner
        self.sock = sock
        self.peer = peer
        self.index = -1  # known after its CHANNEL record
        self.result: IncomingResult = IncomingResult(False, 0, 0, 0, 0)
        self.thread = threading.Thread(target=self._run, name="multifdrecv", daemon=True)

    def _run(self) -> None:
        owner = self.owner
        reader = StreamReader(self.sock, owner.deadline_s, peer="source (a multifd channel)")
        try:
            try:
                index = read_hello(reader, owner.channels, owner.session, owner.checksum)
            except NothingReceived as exc:
                owner.stray(self, exc)
                return
            self.index = index
            self.thread.name = f"multifdrecv_{index}"
            reader.peer = f"source's multifd channel {index}"
            reader.liveness = owner.liveness
            owner.register(self)
            self._receive(reader)
        except Exception as exc:
            owner.fail(self, exc)

    def _receive(self, reader: StreamReader) -> None:
        owner = self.owner
        memory = owner.memory
        validator = StreamValidator(reader.checksum, channel=True)
        validator.config = owner.config
        checker = owner.new_checker(self.index)
        result = self.result
        try:
            while True:
                rtype, arg, length = reader.record()
                validator.check_record(rtype, length)
                if checker is not None:
                    checker.raise_error()
                if rtype is RecordType.RAM_RUN:
                    load_ram_run(memory, reader, validator, checker, arg, length, result)
                elif rtype is RecordType.ZERO_RUN:
                    load_zero_run(memory, reader, validator, checker, result)
                elif rtype is RecordType.MULTIFD_SYNC:
                    number = reader.value(length, "MULTIFD_SYNC")
                    if checker is not None:
                        checker.drain()  # checked before any page of the next iteration
                    owner.barrier.arrive(self.index, number)
                    if arg & SYNC_FINAL:
                        break
                elif rtype is RecordType.ABANDON:
                    reason = reader.reason(length, "ABANDON")
                    raise StreamError(f"the source abandoned the migration: {reason}")
            if checker is not None:
                result.changed_pages = checker.changed_pages
        except Exception:
            found = checker.first_failure() if checker is not None else None
            if found is not None:
                raise found from None
            raise
        finally:
            if checker is not None:
                checker.close()
            result.bytes_received = reader.bytes_received


class MultifdReceiver:
    """The channels of one incoming migration, from the MULTIFD record to the final sync."""

    def __init__(
        self, memory: GuestMemory, config: StreamConfig, channels: int, session: bytes,
        checksum: bool, deadline_s: float, main_sock: socket.socket,
        unconfirmed: UnconfirmedPages | None,
    ) -> None:  # fmt: skip
        self.memory = memory
        self.config = config
        self.channels = channels
        self.session = session
        self.checksum = checksum
        self.deadline_s = deadline_s
        self.main_sock = main_sock
        self.unconfirmed = unconfirmed
        self.liveness = Liveness()
        self.barrier = SyncBarrier(channels + 1)  # the channels, then the main stream
        self.receivers: list[ChannelReceiver] = []  # every accepted connection
        self.by_index: dict[int, ChannelReceiver] = {}
        self.strays = 0
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self._closed = False
        # Wakes accept()'s select when a channel registers or fails: without it the last
        # CHANNEL record waited out a whole ACCEPT_POLL_S (the setup took 200 ms longer).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # --- the main thread ----------------------------------------------------------------------

    def accept(
        self, listener: socket.socket | None, main_record: Callable[[], None],
        stopped: Callable[[], bool],
    ) -> None:  # fmt: skip
        """Accept connections until every channel has said CHANNEL, within the deadline.
        main_record reads one record of the main stream if it speaks meanwhile (only an
        ABANDON may come: it raises)."""
        if listener is None:
            raise StreamError("the source asks for multifd channels, but this destination "
                              "does not listen for them")  # fmt: skip
        deadline = time.monotonic() + self.deadline_s
        while True:
            with self._cond:
                if self.error is not None:
                    raise self.error
                if len(self.by_index) == self.channels:
                    return
                connected = len(self.by_index)
            if stopped():
                raise ConnectionError("stopped while the multifd channels connected")
            if time.monotonic() > deadline:
                raise StreamError(f"only {connected} of {self.channels} multifd channels "
                                  f"connected within {self.deadline_s:g} s")  # fmt: skip
            ready, _, _ = select.select(
                [listener, self.main_sock, self._wake_r], [], [], ACCEPT_POLL_S
            )
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
            if self.main_sock in ready:
                main_record()
            if listener in ready:
                try:
                    sock, address = listener.accept()
                except (BlockingIOError, TimeoutError):
                    continue
                sock.settimeout(transport.IDLE_TIMEOUT_S)
                transport.tune(sock)
                receiver = ChannelReceiver(self, sock, str(address))
                with self._cond:
                    self.receivers.append(receiver)
                receiver.thread.start()

    def main_sync(self, number: int, final: bool, result: IncomingResult) -> None:
        """The main stream's MULTIFD_SYNC: wait for every channel's. After the final one,
        every channel has ended: their counts join the migration's."""
        self.barrier.arrive(self.channels, number)
        if not final:
            return
        result.multifd_channels = self.channels
        for receiver in self.by_index.values():
            receiver.thread.join(JOIN_TIMEOUT_S)
            got = receiver.result
            result.pages_received += got.pages_received
            result.zero_pages += got.zero_pages
            result.zero_pages_read += got.zero_pages_read
            result.zero_pages_written += got.zero_pages_written
            result.changed_pages += got.changed_pages
            result.multifd_bytes += got.bytes_received
        if self.error is not None:
            raise self.error

    # --- the channel threads ------------------------------------------------------------------

    def new_checker(self, index: int) -> PageChecker | None:
        if self.unconfirmed is None:
            return None
        return PageChecker([r.array for r in self.memory.regions], self.unconfirmed,
                           name=f"page-check_{index}")  # fmt: skip

    def register(self, receiver: ChannelReceiver) -> None:
        with self._cond:
            if receiver.index in self.by_index:
                raise StreamError(f"two multifd channels say they are channel {receiver.index}")
            self.by_index[receiver.index] = receiver
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        with self._cond:  # not after close() gave the fd number back
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending
                    os.write(self._wake_w, b"w")

    def stray(self, receiver: ChannelReceiver, exc: Exception) -> None:
        with self._cond:
            self.strays += 1
        log.warning("incoming migration: a connection from %s ended before sending anything "
                    "(%s); still waiting for the multifd channels", receiver.peer, exc)  # fmt: skip

    def fail(self, receiver: ChannelReceiver, exc: Exception) -> None:
        """A channel failed: the first failure is the migration's."""
        if isinstance(exc, OSError) and not isinstance(exc, StreamError):
            exc = ConnectionError(exc.strerror or type(exc).__name__)
        name = f"multifd channel {receiver.index}" if receiver.index >= 0 else (
            f"a multifd channel connection from {receiver.peer}")  # fmt: skip
        error = StreamError(f"{name}: {exc}")
        with self._cond:
            first = self.error is None and not self._closed
            if first:
                self.error = error
            self._cond.notify_all()
        if not first:
            return
        self._wake()
        self.barrier.abort(error)
        self._shutdown_channels()
        with contextlib.suppress(OSError):  # the main thread's read ends: it reports this
            self.main_sock.shutdown(socket.SHUT_RD)

    # --- the end ------------------------------------------------------------------------------

    def _shutdown_channels(self) -> None:
        with self._cond:
            receivers = list(self.receivers)
        for receiver in receivers:
            with contextlib.suppress(OSError):
                receiver.sock.shutdown(socket.SHUT_RDWR)

    def abort(self, error: BaseException) -> None:
        """Stop every channel (the migration failed or was stopped elsewhere)."""
        with self._cond:
            if self.error is None:
                self.error = error
            self._closed = True
            self._cond.notify_all()
        self.barrier.abort(error)
        self._shutdown_channels()

    def close(self) -> None:
        """Join every channel thread and close every connection (safe to call twice)."""
        self.abort(ConnectionError("the incoming migration ended"))
        with self._cond:
            receivers = list(self.receivers)
        for receiver in receivers:
            receiver.thread.join(JOIN_TIMEOUT_S)
            receiver.sock.close()
        with self._cond:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
