"""The pyvmm migration stream, version 5 (documented byte by byte in docs/migration-stream.md).

A stream is a 16-byte preamble (magic b"PYVMM-MG", u32 version, u32 flags) followed by
records. Every record is a 24-byte header, `<IIQQ`: type, a type-specific argument, the
payload length in bytes and a checksum; then the payload. Little-endian.

The checksum (preamble flag bit 0; the source's x-record-checksum capability, off by
default) is xxHash64 of the header's first 16 bytes followed by the payload, seeded with
the record's sequence number in its direction (0 for the first record, so a lost, repeated
or reordered record fails too). A RAM_RUN's payload then carries a table of each page's
xxHash64 (seed 0) before the pages, and its checksum stops at the end of that table: a page
read while the guest ran may change before it is sent, and only that page is sent again.
Without the flag the field is 0 and there is no table.

Source to destination:
  HEADER      once, first     JSON machine configuration (<= 64 KiB)
  RAM_RUN     any number      u32 slot, u32 0, u64 first_page, [npages x u64 page hash],
                              then npages x 4096 bytes; arg bit 0: read while the guest ran
  ZERO_RUN    any number      u32 slot, u32 0, u64 first_page, u64 npages (no data)
  ITERATION   any number      u64 iteration number (end of a pre-copy pass)
  STATE       once            the machine state (pyvmm/machine/state.py's format)
  SWITCHOVER  once, after STATE   "everything is sent: load it and answer"; arg bit 0:
                              the guest was running
  GO          once, after LOADED  the source has committed: start the guest
  ABANDON     at any time     the source gives up (payload: UTF-8 reason); nothing runs here
  COLO_ENABLE once, after HEADER   COLO follows the migration (the x-colo capability)
  CHECKPOINT_REQUEST[_PASSIVE]     u64 checkpoint number: a COLO checkpoint begins
  VMSTATE_SEND                     the primary has stopped; the checkpoint's RAM follows
  VMSTATE_SIZE                     u64: the size of the STATE record that follows
  MULTIFD     at most once, after HEADER   u32 channels, u32 0, 16-byte session: RAM pages
                              travel over that many extra connections (the multifd capability)
  MULTIFD_SYNC                u64 sync number (1, 2, ...); arg bit 0: the final one

Destination to source (replies, same record layout and checksum rule):
  LOADED      to SWITCHOVER   the state is loaded and checked; waiting for GO
  STARTED     to GO           the guest is started (arg bit 0: running, 0: held by -S)
  ERROR       at any time     the destination gives up (payload: UTF-8 reason)
  CHECKPOINT_READY            u64: the secondary's COM2 output position; COLO may begin
  VMSTATE_RECEIVED            u64: likewise, at its stop; the checkpoint is all here
  VMSTATE_LOADED              u64: the secondary's vCPU time (us); the checkpoint is applied
The COLO records and their order are in docs/migration-stream.md ("COLO checkpoints")
and docs/colo.md.

A multifd channel is a connection of its own to the same address: a preamble with magic
b"PYVMM-MC", a CHANNEL record (u32 index, u32 channels, the session), then RAM_RUN,
ZERO_RUN and MULTIFD_SYNC records (migration/multifd/). The destination answers MULTIFD on
the main stream with CHANNELS_READY once every channel has said CHANNEL.

The receiver checks every length, slot, page range and ordering rule before it touches
guest memory (StreamValidator), and each record's checksum before it acts on the record,
so a truncated, corrupted or hostile stream ends with a StreamError, never a write outside
guest RAM. Each record must arrive within a deadline (RECORD_DEADLINE_S plus one second
per MiB of payload), so a trickling peer cannot hold the receiver.
The switchover is a handshake (docs/migration.md): the source commits only after
LOADED and never resumes its guest after sending GO; the destination runs only on GO.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from pyvmm.dirty.scan import Xxh64, page_hashes
from pyvmm.machine.state import MAX_TSC_KHZ, MAX_VCPUS
from pyvmm.machine.strictjson import JsonReader

PREAMBLE_MAGIC = b"PYVMM-MG"
STREAM_VERSION = 5  # 4: the COLO records and replies; 5: multifd
CHANNEL_MAGIC = b"PYVMM-MC"  # the first bytes of a multifd channel's connection
PREAMBLE = struct.Struct("<8sII")  # magic, version, flags
PREAMBLE_ID = struct.Struct("<8sI")  # what every version starts with: magic, version
FLAG_CHECKSUM = 1  # every record and reply carries its xxHash64
KNOWN_FLAGS = FLAG_CHECKSUM
RECORD = struct.Struct("<IIQQ")  # type, arg, length, checksum
RECORD_HASHED = struct.Struct("<IIQ")  # the part of the header the checksum covers
CHECKSUM = struct.Struct("<Q")
RUN = struct.Struct("<IIQ")  # slot, pad, first_page
PAGE_HASH_BYTES = 8  # with checksums, a RAM_RUN carries each page's xxHash64 (seed 0)
RUN_MAY_CHANGE = 1  # RAM_RUN arg bit 0: read while the guest could run (see below)
ZERO = struct.Struct("<IIQQ")  # slot, pad, first_page, npages
ITERATION = struct.Struct("<Q")
VALUE = struct.Struct("<Q")  # the u64 of a CHECKPOINT_REQUEST, VMSTATE_SIZE and value replies
MULTIFD = struct.Struct("<II16s")  # MULTIFD: channels, 0, session; CHANNEL: index, channels, ..
SYNC_FINAL = 1  # MULTIFD_SYNC arg bit 0: the last one; nothing follows on a channel
MAX_CHANNELS = 255  # QEMU's multifd-channels is a uint8
PAGE_SIZE = 4096
MAX_HEADER_BYTES = 64 << 10
MAX_RUN_PAGES = 4096  # 16 MiB of data per RAM_RUN record
MAX_STATE_BYTES = 16 << 20  # what machine/state.py accepts
MAX_REASON_BYTES = 4096  # ABANDON and ERROR texts
MAX_SLOTS = 16  # HEADER slots; pyvmm's VMs have 1 or 2
MAX_MEM_BYTES = (1 << 64) - 1

# Deadlines (docs/migration-stream.md, "Deadlines"): a record must be complete within
# RECORD_DEADLINE_S, plus one second per MIN_RATE_BYTES_PER_S of payload, of the moment
# its reader started waiting for it; the environment variable shortens or lengthens it.
RECORD_DEADLINE_S = 60.0
RECORD_DEADLINE_ENV = "PYVMM_RECORD_DEADLINE_S"
MIN_RATE_BYTES_PER_S = 1 << 20


def record_deadline_s() -> float:
    """RECORD_DEADLINE_S, or PYVMM_RECORD_DEADLINE_S when set (0.1 .. 3600 seconds)."""
    text = os.environ.get(RECORD_DEADLINE_ENV)
    if text is None:
        return RECORD_DEADLINE_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 3600:
        raise ValueError(
            f"{RECORD_DEADLINE_ENV}={text[:40]!r}: expected a number of seconds in 0.1..3600"
        )
    return value


class RecordType(IntEnum):
    HEADER = 1
    RAM_RUN = 2
    ZERO_RUN = 3
    ITERATION = 4
    STATE = 5
    SWITCHOVER = 6
    GO = 7
    ABANDON = 8
    # COLO (QEMU's COLOMessage, pyvmm's numbers; docs/migration-stream.md)
    COLO_ENABLE = 9
    CHECKPOINT_REQUEST = 10
    CHECKPOINT_REQUEST_PASSIVE = 11
    VMSTATE_SEND = 12
    VMSTATE_SIZE = 13
    # multifd (docs/migration-stream.md, "multifd channels")
    MULTIFD = 14
    MULTIFD_SYNC = 15
    CHANNEL = 16


COLO_RECORDS = frozenset(
    {
        RecordType.CHECKPOINT_REQUEST,
        RecordType.CHECKPOINT_REQUEST_PASSIVE,
        RecordType.VMSTATE_SEND,
        RecordType.VMSTATE_SIZE,
    }
)


class ReplyType(IntEnum):
    """Records the destination sends back on the same connection."""

    LOADED = 0x101
    STARTED = 0x102
    ERROR = 0x103
    CHECKPOINT_READY = 0x104
    VMSTATE_RECEIVED = 0x105
    VMSTATE_LOADED = 0x106
    CHANNELS_READY = 0x107  # to MULTIFD: every channel is connected (arg: how many)


VALUE_REPLIES = frozenset(
    {ReplyType.CHECKPOINT_READY, ReplyType.VMSTATE_RECEIVED, ReplyType.VMSTATE_LOADED}
)


class StreamError(RuntimeError):
    """The stream is malformed or does not match this VM; the message says how."""


class NothingReceived(StreamError):
    """The connection closed, or stayed silent past the deadline, before its first byte."""


class Liveness:
    """When any connection of one migration last delivered bytes. With multifd the main
    stream is silent while the channels carry a pass, and a channel while it waits at a
    sync point: a reader waiting for a record header then fails for silence only when no
    connection of the migration has delivered anything for a whole deadline."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


# --- HEADER ------------------------------------------------------------------------------------

_HEADER_KEYS = frozenset({"mem_bytes", "slots", "vcpus", "start_all_vcpus", "irqchip", "tsc_khz"})
# The HEADER is one object holding one array of [gpa, size] pairs: 3 levels. Its items
# (strictjson's count of , : [ {) are about 25 plus 3 per slot.
_HEADER_JSON = JsonReader(
    StreamError, "malformed HEADER record", max_bytes=MAX_HEADER_BYTES, max_items=256,
    max_depth=3,
)  # fmt: skip


@dataclass(frozen=True)
class StreamConfig:
    """What the destination needs to build a VM the state fits into."""

    mem_bytes: int
    slots: list[tuple[int, int]]  # (gpa, size) per KVM slot
    vcpus: int
    start_all_vcpus: bool
    irqchip: bool
    tsc_khz: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "mem_bytes": self.mem_bytes,
                "slots": [list(s) for s in self.slots],
                "vcpus": self.vcpus,
                "start_all_vcpus": self.start_all_vcpus,
                "irqchip": self.irqchip,
                "tsc_khz": self.tsc_khz,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | bytearray) -> StreamConfig:
        """Parse a HEADER payload with the machine state's guards (strictjson.py): exact
        keys and types, no NaN/Infinity, bounded size, item count and depth."""
        j = _HEADER_JSON
        doc = j.object(j.parse(data), "top level", _HEADER_KEYS)
        slots = []
        for i, pair in enumerate(j.array(doc["slots"], "slots", 1, MAX_SLOTS)):
            where = f"slots[{i}]"
            gpa, size = j.array(pair, where, 2, 2)
            slots.append(
                (j.integer(gpa, f"{where} gpa", 0, MAX_MEM_BYTES),
                 j.integer(size, f"{where} size", 1, MAX_MEM_BYTES))
            )  # fmt: skip
        config = cls(
            j.integer(doc["mem_bytes"], "mem_bytes", 1, MAX_MEM_BYTES),
            slots,
            j.integer(doc["vcpus"], "vcpus", 1, MAX_VCPUS),
            j.boolean(doc["start_all_vcpus"], "start_all_vcpus"),
            j.boolean(doc["irqchip"], "irqchip"),
            j.integer(doc["tsc_khz"], "tsc_khz", 0, MAX_TSC_KHZ),
        )
        if config.start_all_vcpus == config.irqchip:
            raise StreamError("malformed HEADER record: start mode and irqchip disagree")
        return config


# --- checksums ---------------------------------------------------------------------------------

_PAGE_INDEX = np.arange(MAX_RUN_PAGES, dtype=np.uint64)  # page numbers 0..n-1 of a run


def checksum(seq: int, head: bytes, payload: Sequence[bytes | bytearray | memoryview]) -> int:
    """A record's checksum: xxHash64, seed = its sequence number, over the header's first 16
    bytes and then the payload (for a RAM_RUN: up to the end of its page-hash table), hashed
    where the buffers lie (no copy)."""
    hasher = Xxh64(seq).update(head)
    for part in payload:
        hasher.update(part)
    return int(hasher.intdigest())


# --- writing -----------------------------------------------------------------------------------


class StreamWriter:
    """Sends records with sendmsg straight from guest memory (no copy in user space).

    Every record (or reply) it frames gets the next sequence number of this direction; the
    checksum is computed when the record is framed, before it is sent, so framed records
    must go out in the order they were framed."""

    def __init__(self, sock: socket.socket, checksum: bool = True) -> None:
        self.sock = sock
        self.checksum = checksum
        self.bytes_sent = 0
        self.records_framed = 0
        self._iov_max = 512

    def send(self, parts: list[bytes | memoryview]) -> None:
        """Send every buffer in order, resuming after partial sends."""
        views = [memoryview(p).cast("B") for p in parts]
        i, n = 0, len(views)  # an index, not pop(0): a step can have thousands of parts
        while i < n:
            sent = self.sock.sendmsg(views[i : i + self._iov_max])
            self.bytes_sent += sent
            # Skip what went out, keep the rest (including a partly sent buffer).
            while sent and i < n:
                if sent >= len(views[i]):
                    sent -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
            while i < n and len(views[i]) == 0:
                i += 1

    def preamble(self, magic: bytes = PREAMBLE_MAGIC) -> None:
        """The 16-byte preamble; magic CHANNEL_MAGIC starts a multifd channel."""
        flags = FLAG_CHECKSUM if self.checksum else 0
        self.send([PREAMBLE.pack(magic, STREAM_VERSION, flags)])

    def frame(
        self, rtype: RecordType | ReplyType, arg: int,
        payload: Sequence[bytes | bytearray | memoryview] = (), unhashed_bytes: int = 0,
    ) -> bytes:  # fmt: skip
        """The 24-byte header of the next record, whose payload is these buffers in order,
        then unhashed_bytes more that the checksum does not cover (RAM_RUN page data)."""
        length = sum(len(p) for p in payload) + unhashed_bytes
        head = RECORD_HASHED.pack(rtype, arg, length)
        seq = self.records_framed
        self.records_framed += 1
        return head + CHECKSUM.pack(checksum(seq, head, payload) if self.checksum else 0)

    def record(self, rtype: RecordType | ReplyType, payload: bytes = b"", arg: int = 0) -> None:
        self.send([self.frame(rtype, arg, (payload,)), payload])

    def header(self, config: StreamConfig) -> None:
        self.record(RecordType.HEADER, config.to_json())

    def ram_run_parts(
        self, slot: int, first_page: int, data: memoryview, may_change: bool = False
    ) -> list[bytes | memoryview]:
        """A RAM_RUN record as buffers (header, guest memory) for one sendmsg.

        With checksums, each page is hashed in place here, before the send, into the
        record's page-hash table. may_change: the guest may write the pages until sendmsg
        has copied them (pre-copy); a page that then fails its hash at the destination is
        one the migration sends again, so the destination waits for that copy."""
        arg = RUN_MAY_CHANGE if may_change else 0
        fixed = RUN.pack(slot, 0, first_page)
        if self.checksum:
            table = np.empty(len(data) // PAGE_SIZE, np.uint64)
            page_hashes(data, _PAGE_INDEX[: len(table)], table)
            fixed += table.tobytes()
        return [self.frame(RecordType.RAM_RUN, arg, (fixed,), len(data)) + fixed, data]

    def zero_run(self, slot: int, first_page: int, npages: int) -> bytes:
        payload = ZERO.pack(slot, 0, first_page, npages)
        return self.frame(RecordType.ZERO_RUN, 0, (payload,)) + payload

    def iteration(self, number: int) -> None:
        self.record(RecordType.ITERATION, ITERATION.pack(number))

    def state(self, data: bytes) -> None:
        self.record(RecordType.STATE, data)

    def switchover(self, guest_running: bool) -> None:
        """Everything is sent; arg bit 0 says whether the guest ran (then it runs there)."""
        self.record(RecordType.SWITCHOVER, arg=int(guest_running))

    def go(self) -> None:
        self.record(RecordType.GO)

    def value(self, rtype: RecordType | ReplyType, value: int) -> None:
        """A record or reply whose payload is one u64 (COLO's numbered messages)."""
        self.record(rtype, VALUE.pack(value))

    def abandon(self, reason: str) -> None:
        self.message(RecordType.ABANDON, reason)

    def reply(self, rtype: ReplyType, arg: int = 0) -> None:
        self.record(rtype, arg=arg)

    def message(self, rtype: RecordType | ReplyType, reason: str) -> None:
        """A record whose payload is a one-line reason (ABANDON, ERROR)."""
        text = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES] or b"?"
        self.record(rtype, text)


# --- reading -----------------------------------------------------------------------------------


class StreamReader:
    """Reads exactly what is asked for, straight into the caller's buffer, record by record.

    record()/reply() read a header and start the record: its deadline and its checksum;
    read()/read_into() read its payload, hashing each piece as it arrives; end_record()
    compares the checksum, and must come before the record is acted on.
    deadline_s: a record must be complete within deadline_s + 1 s per MiB of payload of
    the record()/reply() call (None: only the socket's own timeout applies); peer names the
    other side in messages."""

    def __init__(
        self, sock: socket.socket, deadline_s: float | None = None, checksum: bool = False,
        peer: str = "source",
    ) -> None:  # fmt: skip
        self.sock = sock
        self.deadline_s = deadline_s
        self.checksum = checksum
        self.peer = peer
        self.bytes_received = 0
        self.records_received = 0
        self._deadline: float | None = None  # monotonic time the current record must end by
        self._allowed_s = 0.0
        self._hasher: Xxh64 | None = None
        self._expected = 0
        self._head16 = b""
        self._in_head = False  # waiting for a header: silence is "sent nothing"
        self.liveness: Liveness | None = None  # multifd: silence counts across connections

    # --- bytes, within the deadline ---

    def _recv_into(self, view: memoryview, what: str, total: int, before: int) -> int:
        """One recv_into within the record's deadline; 0 at the end of the stream."""
        live = self.liveness
        while True:
            if self._deadline is None:
                n = self.sock.recv_into(view)
                break
            left = self._deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                n = self.sock.recv_into(view)
                break
            except TimeoutError:
                # Between records, while another connection of the migration still
                # speaks, the wait goes on (Liveness).
                resume = live.last + self._allowed_s if live is not None else 0.0
                if before == 0 and self._in_head and resume > time.monotonic():
                    self._deadline = resume
                    continue
                self._too_slow(what, total, before)
        if live is not None:
            live.touch()
        return n

    def _too_slow(self, what: str, total: int, before: int) -> None:
        if before == 0 and self._in_head:
            raise StreamError(f"the {self.peer} sent nothing for {self._allowed_s:g} s") from None
        raise StreamError(
            f"the {self.peer} is too slow: {what} had {before} of {total} bytes after "
            f"{self._allowed_s:g} s (each record must arrive within "
            f"{self.deadline_s:g} s + 1 s per MiB)"
        ) from None

    def read_into(self, view: memoryview, what: str, hashed: bool = True, done: int = 0) -> None:
        """Fill view (its first `done` bytes are there already); hashed: part of what the
        record's checksum covers (RAM_RUN page data is not: its pages have their own)."""
        got = done
        total = len(view)
        while got < total:
            n = self._recv_into(view[got:], what, total, got)
            if n == 0:
                raise StreamError(
                    f"stream ended early: {what} needed {total} bytes, got {got} "
                    f"(the {self.peer} closed the connection or died)"
                )
            if hashed and self._hasher is not None:
                self._hasher.update(view[got : got + n])
            got += n
        self.bytes_received += total - done

    def read(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        self.read_into(memoryview(buf), what)
        return buf

    # --- the preamble ---

    def preamble(self, magic: bytes = PREAMBLE_MAGIC) -> int:
        """Read and check the preamble; returns its flags (and sets self.checksum).
        NothingReceived if the connection ends or stays silent before its first byte.
        magic: what this connection must be (CHANNEL_MAGIC: a multifd channel)."""
        self._start_deadline()
        buf = memoryview(bytearray(PREAMBLE.size))
        try:
            n = self._recv_into(buf, "the stream preamble", PREAMBLE.size, 0)
        except StreamError:
            raise NothingReceived("the connection sent nothing") from None
        except ConnectionResetError:
            raise NothingReceived("the connection was reset before it sent anything") from None
        if n == 0:
            raise NothingReceived("the connection closed without sending anything")
        self.bytes_received += n
        if n < PREAMBLE_ID.size:
            self.read_into(buf[: PREAMBLE_ID.size], "the stream preamble", done=n)
            n = PREAMBLE_ID.size
        got, version = PREAMBLE_ID.unpack(buf[: PREAMBLE_ID.size])
        if got != magic:
            if got == CHANNEL_MAGIC:
                raise StreamError("a multifd channel connected where a migration stream began")
            if got == PREAMBLE_MAGIC:
                raise StreamError("a second migration stream connected where a multifd "
                                  "channel was expected")  # fmt: skip
            raise StreamError(f"not a pyvmm migration stream (magic {bytes(got)!r})")
        if version != STREAM_VERSION:
            raise StreamError(
                f"migration stream version {version} is not supported (this pyvmm speaks "
                f"version {STREAM_VERSION})"
            )
        if n < PREAMBLE.size:
            self.read_into(buf, "the stream preamble", done=n)
        _, _, flags = PREAMBLE.unpack(buf)
        if flags & ~KNOWN_FLAGS:
            raise StreamError(
                f"unknown stream flags 0x{flags:x} in the preamble (this pyvmm knows "
                f"0x{KNOWN_FLAGS:x})"
            )
        self.checksum = bool(flags & FLAG_CHECKSUM)
        self._deadline = None
        return flags

    # --- records ---

    def _start_deadline(self) -> None:
        """A record (or the preamble) is awaited from now on."""
        if self.deadline_s is not None:
            self._allowed_s = self.deadline_s
            self._deadline = time.monotonic() + self._allowed_s

    def _head(self, what: str) -> tuple[int, int, int]:
        """Read a record header and start its checksum; extends the deadline by its length."""
        self._start_deadline()
        self._hasher = None
        self._in_head = True
        try:
            head = self.read(RECORD.size, what)
        finally:
            self._in_head = False
        rtype, arg, length, value = RECORD.unpack(head)
        if self.deadline_s is not None and self._deadline is not None:
            extra = length / MIN_RATE_BYTES_PER_S
            self._allowed_s += extra
            self._deadline += extra
        self._expected = value
        self._head16 = bytes(head[:16])
        if self.checksum:
            self._hasher = Xxh64(self.records_received).update(self._head16)
        self.records_received += 1
        return rtype, arg, length

    @property
    def record_index(self) -> int:
        """The sequence number of the record being read."""
        return self.records_received - 1

    def end_record(self, name: str) -> None:
        """Compare the record's checksum with what arrived (call before acting on it)."""
        hasher, self._hasher = self._hasher, None
        if hasher is None:
            if self._expected:
                raise StreamError(
                    f"{name} record #{self.record_index} carries a checksum, but the "
                    "preamble announced none"
                )
            return
        got = int(hasher.intdigest())
        if got != self._expected:
            raise StreamError(
                f"checksum mismatch in {name} record #{self.record_index}: it says "
                f"0x{self._expected:016x}, the bytes give 0x{got:016x} (corrupted in transit)"
            )

    def record(self) -> tuple[RecordType, int, int]:
        rtype, arg, length = self._head("a record header")
        try:
            return RecordType(rtype), arg, length
        except ValueError:
            raise StreamError(f"unknown record type {rtype} in the migration stream") from None

    reply_value = 0

    def value(self, length: int, what: str) -> int:
        """The payload of a record or reply that carries one u64 (checked)."""
        if length != VALUE.size:
            raise StreamError(f"{what} record of {length} bytes (expected {VALUE.size})")
        (value,) = VALUE.unpack(self.read(VALUE.size, f"the {what} record"))
        self.end_record(what)
        return int(value)

    def reason(self, length: int, what: str) -> str:
        """The payload of an ABANDON or ERROR record, as one printable line (checked)."""
        if not 0 < length <= MAX_REASON_BYTES:
            raise StreamError(f"{what} record of {length} bytes (limit {MAX_REASON_BYTES})")
        data = self.read(length, f"the {what} record")
        self.end_record(what)
        text = data.decode("utf-8", "replace")
        return "".join(c if c.isprintable() else "?" for c in text)

    def reply(self) -> tuple[ReplyType, int, str]:
        """One reply from the destination: (type, arg, reason for ERROR else ""). A value
        reply (VALUE_REPLIES) leaves its u64 in self.reply_value."""
        rtype, arg, length = self._head("a reply")
        try:
            reply = ReplyType(rtype)
        except ValueError:
            raise StreamError(f"the destination sent an unknown reply type {rtype}") from None
        if reply is ReplyType.ERROR:
            return reply, arg, self.reason(length, "ERROR")
        if reply in VALUE_REPLIES:
            self.reply_value = self.value(length, reply.name)
            return reply, arg, ""
        if length:
            raise StreamError(f"{reply.name} reply with {length} bytes of payload")
        self.end_record(reply.name)
        return reply, arg, ""


class StreamValidator:
    """The ordering and size rules of the stream, checked before anything is applied.

    channel: the rules of a multifd channel (after its CHANNEL record: page runs and sync
    points only), instead of the main stream's."""

    def __init__(self, checksum: bool = False, channel: bool = False) -> None:
        self.seen_header = channel
        self.seen_state = False
        self.colo = False  # a COLO_ENABLE came: COLO checkpoints follow the handshake
        self.channel = channel
        self.multifd = False  # a MULTIFD came: pages go over channels until the final sync
        self.seen_pages = False
        self.final_sync = False  # the final MULTIFD_SYNC came
        self.config: StreamConfig | None = None
        # A RAM_RUN page is 4096 bytes of data, plus its 8-byte hash with checksums.
        self.page_bytes = PAGE_SIZE + (PAGE_HASH_BYTES if checksum else 0)

    def run_pages(self, length: int) -> int:
        """Pages in a RAM_RUN record of this (checked) length."""
        return (length - RUN.size) // self.page_bytes

    def check_record(self, rtype: RecordType, length: int) -> None:
        if rtype is RecordType.ABANDON:
            return  # allowed at any point; its length is checked when it is read
        if self.channel:
            self._check_channel(rtype, length)
            return
        if rtype in (RecordType.RAM_RUN, RecordType.ZERO_RUN):
            if self.multifd and not self.final_sync:
                raise StreamError(
                    f"{rtype.name} record on the main stream of a multifd migration (its "
                    "pages go over the channels)"
                )
            self.seen_pages = True
        if rtype is RecordType.MULTIFD:
            if not self.seen_header:
                raise StreamError("MULTIFD record before the HEADER record")
            if self.multifd:
                raise StreamError("duplicate MULTIFD record")
            if self.seen_pages or self.seen_state:
                raise StreamError("MULTIFD record after the migration's pages began")
            if length != MULTIFD.size:
                raise StreamError(f"MULTIFD record of {length} bytes (expected {MULTIFD.size})")
            self.multifd = True
            return
        if rtype is RecordType.MULTIFD_SYNC:
            self._check_sync(length)
            if not self.multifd:
                raise StreamError("MULTIFD_SYNC record without a MULTIFD record")
            return
        if rtype is RecordType.CHANNEL:
            raise StreamError("CHANNEL record on the main stream (it starts a multifd channel)")
        if rtype is RecordType.STATE and self.multifd and not self.final_sync:
            raise StreamError("STATE record before the final MULTIFD_SYNC record")
        if not self.seen_header and rtype is not RecordType.HEADER:
            raise StreamError(f"{rtype.name} record before the HEADER record")
        if rtype is RecordType.HEADER:
            self._once(rtype, length, MAX_HEADER_BYTES, self.seen_header)
            self.seen_header = True
        elif rtype is RecordType.STATE:
            self._once(rtype, length, MAX_STATE_BYTES, self.seen_state)
            self.seen_state = True
        elif self.seen_state and rtype is not RecordType.SWITCHOVER:
            raise StreamError(f"{rtype.name} record after the STATE record")
        elif rtype in (RecordType.RAM_RUN, RecordType.ZERO_RUN):
            self._check_run(rtype, length)
        elif rtype is RecordType.ITERATION and length != ITERATION.size:
            raise StreamError(f"ITERATION record of {length} bytes (expected 8)")
        elif rtype is RecordType.SWITCHOVER:
            if length != 0:
                raise StreamError(f"SWITCHOVER record with {length} bytes of payload")
            if not self.seen_state:
                raise StreamError("SWITCHOVER record before the STATE record")
        elif rtype is RecordType.GO:
            raise StreamError("GO record before the SWITCHOVER record")
        elif rtype is RecordType.COLO_ENABLE:
            if length:
                raise StreamError(f"COLO_ENABLE record with {length} bytes of payload")
            if self.colo:
                raise StreamError("duplicate COLO_ENABLE record")
            self.colo = True
        elif rtype in COLO_RECORDS:
            raise StreamError(f"{rtype.name} record before the migration's end")

    def _check_sync(self, length: int) -> None:
        if length != VALUE.size:
            raise StreamError(f"MULTIFD_SYNC record of {length} bytes (expected {VALUE.size})")
        if self.final_sync:
            raise StreamError("MULTIFD_SYNC record after the final one")

    def _check_channel(self, rtype: RecordType, length: int) -> None:
        """A multifd channel carries page runs and sync points, and nothing after its
        final sync point."""
        if rtype is RecordType.MULTIFD_SYNC:
            self._check_sync(length)
        elif self.final_sync:
            raise StreamError(f"{rtype.name} record after the final MULTIFD_SYNC record")
        elif rtype in (RecordType.RAM_RUN, RecordType.ZERO_RUN):
            self._check_run(rtype, length)
        else:
            raise StreamError(f"{rtype.name} record on a multifd channel")

    def _check_run(self, rtype: RecordType, length: int) -> None:
        if rtype is RecordType.RAM_RUN:
            pages = length - RUN.size
            if length < RUN.size + self.page_bytes or pages % self.page_bytes:
                raise StreamError(f"RAM_RUN record of {length} bytes is not a whole page run")
            if pages // self.page_bytes > MAX_RUN_PAGES:
                raise StreamError(f"RAM_RUN record of {pages // self.page_bytes} pages is too long")
        elif length != ZERO.size:
            raise StreamError(f"ZERO_RUN record of {length} bytes (expected {ZERO.size})")

    @staticmethod
    def _once(rtype: RecordType, length: int, limit: int, seen: bool) -> None:
        """A record that appears once, with a payload of 1..limit bytes."""
        if seen:
            raise StreamError(f"duplicate {rtype.name} record")
        if not 0 < length <= limit:
            raise StreamError(f"{rtype.name} record of {length} bytes (limit {limit})")

    def check_pages(self, slot: int, first_page: int, npages: int) -> None:
        assert self.config is not None
        if not 0 <= slot < len(self.config.slots):
            raise StreamError(f"page run names slot {slot}; this VM has {len(self.config.slots)}")
        slot_pages = self.config.slots[slot][1] // PAGE_SIZE
        if npages == 0 or first_page >= slot_pages or npages > slot_pages - first_page:
            raise StreamError(
                f"page run {first_page}+{npages} is outside slot {slot} ({slot_pages} pages)"
            )
