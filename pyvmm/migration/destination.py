"""The destination: accept one migration stream, build the VM it describes, fill guest RAM
straight from the socket, restore the machine state, confirm, and let the guest run.

Every record is validated (StreamValidator) before it is applied, and its checksum is
compared before it is acted on; page data is received with recv_into directly into guest
RAM, at offsets checked against the VM's slots first. Every record must arrive within its
deadline (stream.py). Any error is a StreamError or ConnectionError with one line naming
the problem; the caller ends the process with a non-zero exit code.

A connection that ends, or stays silent for a whole deadline, before sending its first
byte (a port scan, a health check, a load balancer's probe) is logged and the destination
goes back to waiting: only a connection that sent something can fail the migration.

With multifd (a MULTIFD record after the HEADER) the pages come over extra connections to
the same address, which migration/multifd/recv.py accepts and receives; this side learns
the channel count from that record unless multifd was set here by QMP, which then must
agree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvmm.machine.errors import MachineError
from pyvmm.machine.machine import Machine
from pyvmm.machine.memory import GuestMemory
from pyvmm.machine.state import MachineState, restore
from pyvmm.migration import transport
from pyvmm.migration.colo.secondary import ColoSecondary
from pyvmm.migration.incoming_pages import IncomingResult, load_ram_run, load_zero_run
from pyvmm.migration.pagecheck import PageChecker
from pyvmm.migration.stream import (
    ITERATION,
    SYNC_FINAL,
    NothingReceived,
    RecordType,
    ReplyType,
    StreamConfig,
    StreamError,
    StreamReader,
    StreamValidator,
    StreamWriter,
    record_deadline_s,
)

if TYPE_CHECKING:
    from pyvmm.migration.multifd.recv import MultifdReceiver

log = logging.getLogger(__name__)

ACCEPT_POLL_S = 0.2
# Records that may come before a MULTIFD one (multifd set here: anything else is late).
_BEFORE_MULTIFD = frozenset(
    {RecordType.HEADER, RecordType.COLO_ENABLE, RecordType.MULTIFD, RecordType.ABANDON}
)
LINGER_S = 1.0  # after an ERROR: how long to drain the source's data so it reads the ERROR

StartGuest = Callable[[bool], bool]


def _tell_source(sock: socket.socket, writer: StreamWriter, reason: str) -> None:
    """Send ERROR, then drain what the source still sends until it closes (or LINGER_S):
    closing with unread data would reset the connection and could discard the ERROR."""
    try:
        sock.settimeout(LINGER_S)
        writer.message(ReplyType.ERROR, reason)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        while time.monotonic() < deadline and sock.recv(1 << 20):
            pass
    except OSError:
        pass


def _peer_name(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "a local process"  # unix sockets have no peer address


def _mib(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n} bytes"


class MigrationDestination:
    def __init__(
        self, machine: Machine, uri: str, colo: ColoSecondary | None = None,
        multifd: Callable[[], int | None] = lambda: None,
    ) -> None:  # fmt: skip
        """colo: this VM's secondary, should the source ask for COLO (COLO_ENABLE).
        multifd: the channel count set here by QMP (the multifd capability), asked when the
        HEADER arrives; None: learn it from the stream."""
        self.machine = machine
        self.colo = colo
        self.colo_enabled = False  # a COLO_ENABLE came: the guest becomes a COLO secondary
        self.uri = transport.parse_uri(uri)
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._go_received = False
        self._stop_reason = "stopped"
        self._sock: socket.socket | None = None  # the accepted connection
        self.config: StreamConfig | None = None
        self.deadline_s = record_deadline_s()  # raises ValueError for a bad environment knob
        self.stray_connections = 0  # connections that ended before sending anything
        self._multifd_setting = multifd
        self._multifd: MultifdReceiver | None = None
        self.multifd_channels = 0  # the channels the stream asked for (MULTIFD)

    def listen(self) -> transport.MigrationUri:
        self._listener = transport.listen(self.uri)
        self.uri = transport.bound_uri(self._listener, self.uri)
        return self.uri

    def stop(self, reason: str = "stopped") -> None:
        """End a wait or a transfer in progress (from any thread)."""
        self._stop_reason = reason
        self._stop.set()
        multifd = self._multifd
        if multifd is not None:
            multifd.abort(ConnectionError(f"{reason} during the incoming migration"))
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.uri.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(self.uri.path)

    def _accept(self) -> tuple[socket.socket, str]:
        assert self._listener is not None
        self._listener.settimeout(ACCEPT_POLL_S)
        while not self._stop.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(transport.IDLE_TIMEOUT_S)
            transport.tune(sock)
            return sock, _peer_name(address)
        raise ConnectionError(f"{self._stop_reason} while waiting for the incoming migration")

    def receive(
        self, start_guest: StartGuest, on_active: Callable[[], None] | None = None
    ) -> IncomingResult:
        """Run one incoming migration to its end (blocking); start_guest(running) is called
        on GO and returns whether the guest now runs (False under -S); on_active once a
        source has sent a valid preamble. Connections that send nothing are skipped."""
        if self._listener is None:
            self.listen()
        try:
            while True:
                sock, peer = self._accept()
                self._sock = sock
                try:
                    if self._stop.is_set():  # stop() came between accept and here
                        raise ConnectionError(
                            f"{self._stop_reason} while waiting for the incoming migration"
                        )
                    return self.receive_from(sock, start_guest, on_active)
                except NothingReceived as exc:
                    if self._stop.is_set():
                        raise ConnectionError(
                            f"{self._stop_reason} while waiting for the incoming migration"
                        ) from None
                    self.stray_connections += 1
                    log.warning(
                        "incoming migration: a connection from %s ended before sending "
                        "anything (%s); still waiting for the source", peer, exc,
                    )  # fmt: skip
                except TimeoutError:
                    raise ConnectionError(
                        f"the source sent nothing for {transport.IDLE_TIMEOUT_S:.0f} s"
                    ) from None
                finally:
                    self._sock = None
                    sock.close()
        finally:
            self.close()

    def receive_from(
        self, sock: socket.socket, start_guest: StartGuest,
        on_active: Callable[[], None] | None = None,
    ) -> IncomingResult:  # fmt: skip
        """Receive one stream from a connected socket (the fuzz tests feed it directly).

        A failure of ours is told to the source in an ERROR reply before it is raised;
        NothingReceived (nobody to tell) is raised as it is."""
        writer = StreamWriter(sock, checksum=False)  # the preamble says which
        try:
            return self._receive(sock, writer, start_guest, on_active)
        except NothingReceived:
            raise
        except Exception as exc:  # a bug of ours too: the source must hear of it
            failure: Exception = exc
            if self._stop.is_set():
                failure = ConnectionError(f"{self._stop_reason} during the incoming migration")
            if not self._go_received:
                _tell_source(sock, writer, str(failure) or type(failure).__name__)
            raise failure from None

    def _receive(
        self, sock: socket.socket, writer: StreamWriter, start_guest: StartGuest,
        on_active: Callable[[], None] | None,
    ) -> IncomingResult:  # fmt: skip
        reader = StreamReader(sock, self.deadline_s)
        reader.preamble()
        validator = StreamValidator(reader.checksum)
        writer.checksum = reader.checksum  # replies follow the source's choice
        if on_active is not None:
            on_active()
        result = IncomingResult(False, 0, 0, 0, 0)
        memory = self._memory()
        checker: PageChecker | None = None  # with checksums, from the HEADER on
        expect_multifd: int | None = None  # channels set here by QMP, until checked
        try:
            while True:
                if self._stop.is_set():
                    raise ConnectionError(f"{self._stop_reason} during the incoming migration")
                rtype, arg, length = reader.record()
                validator.check_record(rtype, length)
                if checker is not None:
                    checker.raise_error()  # a page check that failed meanwhile
                if expect_multifd is not None and rtype not in _BEFORE_MULTIFD:
                    self._expected_multifd(expect_multifd, validator)
                    expect_multifd = None
                if rtype is RecordType.HEADER:
                    data = reader.read(length, "the HEADER record")
                    reader.end_record(rtype.name)
                    config = StreamConfig.from_json(data)
                    self._build(config)
                    validator.config = config
                    expect_multifd = self._multifd_setting()
                    if reader.checksum:
                        checker = PageChecker([r.array for r in memory.regions])
                elif rtype is RecordType.RAM_RUN:
                    load_ram_run(memory, reader, validator, checker, arg, length, result)
                elif rtype is RecordType.ZERO_RUN:
                    load_zero_run(memory, reader, validator, checker, result)
                elif rtype is RecordType.MULTIFD:
                    payload = reader.read(length, "the MULTIFD record")
                    reader.end_record(rtype.name)
                    self._start_multifd(sock, reader, writer, payload, checker, expect_multifd)
                    expect_multifd = None
                elif rtype is RecordType.MULTIFD_SYNC:
                    number = reader.value(length, rtype.name)
                    final = bool(arg & SYNC_FINAL)
                    validator.final_sync = final
                    assert self._multifd is not None
                    self._multifd.main_sync(number, final, result)
                elif rtype is RecordType.ITERATION:
                    payload = reader.read(length, "an ITERATION record")
                    reader.end_record(rtype.name)
                    (result.iterations,) = ITERATION.unpack(payload)
                elif rtype is RecordType.STATE:
                    data = reader.read(length, "the STATE record")
                    reader.end_record(rtype.name)
                    if checker is not None:
                        checker.finish()  # all of RAM is verified before the state loads
                        result.changed_pages = checker.changed_pages
                    if result.changed_pages:
                        log.info(
                            "%d pages changed while they were sent; all were sent again",
                            result.changed_pages,
                        )
                    self._load_state(data)
                elif rtype is RecordType.ABANDON:
                    reason = reader.reason(length, "ABANDON")
                    raise StreamError(f"the source abandoned the migration: {reason}")
                elif rtype is RecordType.COLO_ENABLE:
                    reader.end_record(rtype.name)
                    if self.colo is None:
                        raise StreamError("the source asks for COLO, which this VM cannot do")
                    self.colo_enabled = True
                    self.colo.expect()
                elif rtype is RecordType.SWITCHOVER:
                    reader.end_record(rtype.name)
                    result.guest_running = bool(arg & 1)
                    result.bytes_received = reader.bytes_received + result.multifd_bytes
                    self._reply(writer, ReplyType.LOADED)
                    self._await_go(reader)
                    self._go_received = True
                    if self.colo_enabled:
                        assert self.colo is not None and self.config is not None
                        self.colo.prepare()  # the RAM cache, before the guest runs
                    running = start_guest(result.guest_running)
                    self._reply(writer, ReplyType.STARTED, int(running))
                    if self.colo_enabled:
                        assert self.colo is not None and self.config is not None
                        if checker is not None:
                            checker.close()
                            checker = None
                        result.colo = True
                        self.colo.run(sock, reader, writer, self.config)
                    return result
        except Exception:
            found = checker.first_failure() if checker is not None else None
            if found is not None:  # a page that failed its hash came first: report that
                raise found from None
            multifd = self._multifd
            if multifd is not None and multifd.error is not None and not self._stop.is_set():
                raise multifd.error from None  # a channel failed first: report that
            raise
        finally:
            multifd, self._multifd = self._multifd, None
            if multifd is not None:
                multifd.close()
                self.stray_connections += multifd.strays
            if checker is not None:
                checker.close()

    # --- multifd (migration/multifd/) ---

    @staticmethod
    def _expected_multifd(channels: int, validator: StreamValidator) -> None:
        """multifd was set here by QMP: the source must have announced it first."""
        if not validator.multifd:
            raise StreamError(
                f"multifd is on here ({channels} channels), but the source sends its pages "
                "without it: set the multifd capability on both sides, or on neither"
            )

    def _start_multifd(
        self, sock: socket.socket, reader: StreamReader, writer: StreamWriter,
        payload: bytearray, checker: PageChecker | None, expected: int | None,
    ) -> None:  # fmt: skip
        """The destination's side of the channel handshake (multifd/wire.py)."""
        from pyvmm.migration.multifd.recv import MultifdReceiver
        from pyvmm.migration.multifd.wire import parse_request

        channels, session = parse_request(payload)
        if expected is not None and expected != channels:
            raise StreamError(
                f"the source uses {channels} multifd channels, this destination's "
                f"multifd-channels is {expected}: set the same number on both sides"
            )
        assert self.config is not None
        multifd = MultifdReceiver(
            self._memory(), self.config, channels, session, reader.checksum, self.deadline_s, sock,
            checker.unconfirmed if checker is not None else None,
        )  # fmt: skip
        self._multifd = multifd
        if self._stop.is_set():
            raise ConnectionError(f"{self._stop_reason} during the incoming migration")
        multifd.accept(self._listener, lambda: self._abandon_only(reader), self._stop.is_set)
        reader.liveness = multifd.liveness
        self._reply(writer, ReplyType.CHANNELS_READY, channels)
        self.multifd_channels = channels
        log.info("incoming migration: %d multifd channels connected", channels)

    @staticmethod
    def _abandon_only(reader: StreamReader) -> None:
        """The main stream spoke while the channels connect: only ABANDON may come."""
        rtype, _, length = reader.record()
        if rtype is RecordType.ABANDON:
            reason = reader.reason(length, "ABANDON")
            raise StreamError(f"the source abandoned the migration: {reason}")
        raise StreamError(f"{rtype.name} record before the multifd channels connected")

    def _load_state(self, data: bytearray) -> None:
        assert self.config is not None
        try:
            state = MachineState.from_bytes(
                data, vcpus=self.config.vcpus, irqchip=self.config.irqchip
            )
            restore(self.machine, state)
        except MachineError as exc:
            raise StreamError(f"bad machine state in the stream: {exc}") from None

    @staticmethod
    def _reply(writer: StreamWriter, reply: ReplyType, arg: int = 0) -> None:
        writer.sock.settimeout(transport.IDLE_TIMEOUT_S)  # not what a record's read left
        writer.reply(reply, arg)

    def _await_go(self, reader: StreamReader) -> None:
        """After LOADED: only GO starts the guest; ABANDON or silence end the migration."""
        try:
            rtype, _, length = reader.record()
        except StreamError as exc:
            raise StreamError(f"no GO from the source after the state was loaded: {exc}") from None
        if rtype is RecordType.ABANDON:
            raise StreamError(
                f"the source abandoned the migration: {reader.reason(length, 'ABANDON')}"
            )
        if rtype is not RecordType.GO or length:
            raise StreamError(f"{rtype.name} record where GO was expected")
        reader.end_record("GO")

    def _build(self, config: StreamConfig) -> None:
        memory = self.machine.memory
        assert memory is not None
        if config.mem_bytes != memory.size_bytes:
            raise StreamError(
                f"memory size mismatch: the source VM has {_mib(config.mem_bytes)} of RAM, "
                f"this one {_mib(memory.size_bytes)} (--mem)"
            )
        if config.vcpus != len(self.machine.vcpus) and self.machine.vcpus:
            raise StreamError("vCPUs already exist on the destination")
        if config.vcpus != self.machine.config.vcpus:
            raise StreamError(
                f"vCPU count mismatch: the source VM has {config.vcpus} vCPUs, "
                f"this one {self.machine.config.vcpus} (--vcpus)"
            )
        slots = [(r.gpa, r.size_bytes) for r in memory.regions]
        if config.slots != slots:
            raise StreamError(f"memory layout mismatch: source {config.slots}, here {slots}")
        self.machine.create_vcpus(config.start_all_vcpus)
        self.config = config
        log.info(
            "incoming migration: %s, %d vCPUs, %s start",
            _mib(config.mem_bytes), config.vcpus,
            "all-vCPU" if config.start_all_vcpus else "standard",
        )  # fmt: skip

    def _memory(self) -> GuestMemory:
        memory = self.machine.memory
        assert memory is not None  # the VM has its RAM before the first record
        return memory
