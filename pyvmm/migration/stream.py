"""The pyvmm migration stream, version 2 (documented record by record in
docs/migration-stream.md).

A stream is a 12-byte preamble (magic b"PYVMM-MG", u32 version) followed by
records. Every record is a 16-byte header, `<IIQ`: type, a type-specific
argument, and the payload length in bytes; then the payload. Little-endian.

Source to destination:
  HEADER      once, first     JSON machine configuration (<= 64 KiB)
  RAM_RUN     any number      u32 slot, u32 0, u64 first_page, then npages x 4096 bytes
  ZERO_RUN    any number      u32 slot, u32 0, u64 first_page, u64 npages (no data)
  ITERATION   any number      u64 iteration number (end of a pre-copy pass)
  STATE       once            the machine state (pyvmm/machine/state.py's format)
  SWITCHOVER  once, after STATE   "everything is sent: load it and answer"; arg bit 0:
                              the guest was running
  GO          once, after LOADED  the source has committed: start the guest
  ABANDON     at any time     the source gives up (payload: UTF-8 reason); nothing runs here

Destination to source (replies, same record layout):
  LOADED      to SWITCHOVER   the state is loaded and checked; waiting for GO
  STARTED     to GO           the guest is started (arg bit 0: running, 0: held by -S)
  ERROR       at any time     the destination gives up (payload: UTF-8 reason)

The receiver checks every length, slot, page range and ordering rule before
it touches guest memory (StreamValidator), so a truncated, corrupted or
hostile stream ends with a StreamError, never a write outside guest RAM.
The switchover is a handshake (docs/migration.md): the source commits only after
LOADED and never resumes its guest after sending GO; the destination runs only on GO.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

PREAMBLE_MAGIC = b"PYVMM-MG"
STREAM_VERSION = 2
PREAMBLE = struct.Struct("<8sI")
RECORD = struct.Struct("<IIQ")
RUN = struct.Struct("<IIQ")  # slot, pad, first_page
ZERO = struct.Struct("<IIQQ")  # slot, pad, first_page, npages
ITERATION = struct.Struct("<Q")
PAGE_SIZE = 4096
MAX_HEADER_BYTES = 64 << 10
MAX_RUN_PAGES = 4096  # 16 MiB of data per RAM_RUN record
MAX_STATE_BYTES = 16 << 20  # what machine/state.py accepts
MAX_REASON_BYTES = 4096  # ABANDON and ERROR texts


class RecordType(IntEnum):
    HEADER = 1
    RAM_RUN = 2
    ZERO_RUN = 3
    ITERATION = 4
    STATE = 5
    SWITCHOVER = 6
    GO = 7
    ABANDON = 8


class ReplyType(IntEnum):
    """Records the destination sends back on the same connection."""

    LOADED = 0x101
    STARTED = 0x102
    ERROR = 0x103


class StreamError(RuntimeError):
    """The stream is malformed or does not match this VM; the message says how."""


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
    def from_json(cls, data: bytes) -> StreamConfig:
        try:
            obj: Any = json.loads(data)
            slots = [(int(g), int(s)) for g, s in obj["slots"]]
            config = cls(
                _int(obj["mem_bytes"]),
                slots,
                _int(obj["vcpus"]),
                _bool(obj["start_all_vcpus"]),
                _bool(obj["irqchip"]),
                _int(obj["tsc_khz"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamError(f"malformed HEADER record: {exc}") from None
        if config.start_all_vcpus == config.irqchip:
            raise StreamError("malformed HEADER record: start mode and irqchip disagree")
        return config


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected a boolean, got {value!r}")
    return value


# --- writing -----------------------------------------------------------------------------------


class StreamWriter:
    """Sends records with sendmsg straight from guest memory (no copy in user space)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bytes_sent = 0
        self._iov_max = 512

    def send(self, parts: list[bytes | memoryview]) -> None:
        """Send every buffer in order, resuming after partial sends."""
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            batch = views[: self._iov_max]
            sent = self.sock.sendmsg(batch)
            self.bytes_sent += sent
            # Drop what went out, keep the rest (including a partly sent buffer).
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
            while views and len(views[0]) == 0:
                views.pop(0)

    def preamble(self) -> None:
        self.send([PREAMBLE.pack(PREAMBLE_MAGIC, STREAM_VERSION)])

    @staticmethod
    def record_header(rtype: RecordType | ReplyType, length: int, arg: int = 0) -> bytes:
        return RECORD.pack(rtype, arg, length)

    def header(self, config: StreamConfig) -> None:
        payload = config.to_json()
        self.send([self.record_header(RecordType.HEADER, len(payload)), payload])

    @staticmethod
    def ram_run_parts(slot: int, first_page: int, data: memoryview) -> list[bytes | memoryview]:
        """A RAM_RUN record as buffers (header, guest memory) for one sendmsg."""
        head = RECORD.pack(RecordType.RAM_RUN, 0, RUN.size + len(data))
        return [head + RUN.pack(slot, 0, first_page), data]

    @staticmethod
    def zero_run(slot: int, first_page: int, npages: int) -> bytes:
        return RECORD.pack(RecordType.ZERO_RUN, 0, ZERO.size) + ZERO.pack(
            slot, 0, first_page, npages
        )

    def iteration(self, number: int) -> None:
        self.send([self.record_header(RecordType.ITERATION, 8), ITERATION.pack(number)])

    def state(self, data: bytes) -> None:
        self.send([self.record_header(RecordType.STATE, len(data)), data])

    def switchover(self, guest_running: bool) -> None:
        """Everything is sent; arg bit 0 says whether the guest ran (then it runs there)."""
        self.send([self.record_header(RecordType.SWITCHOVER, 0, int(guest_running))])

    def go(self) -> None:
        self.send([self.record_header(RecordType.GO, 0)])

    def abandon(self, reason: str) -> None:
        self.message(RecordType.ABANDON, reason)

    def reply(self, rtype: ReplyType, arg: int = 0) -> None:
        self.send([self.record_header(rtype, 0, arg)])

    def message(self, rtype: RecordType | ReplyType, reason: str) -> None:
        """A record whose payload is a one-line reason (ABANDON, ERROR)."""
        text = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES] or b"?"
        self.send([RECORD.pack(rtype, 0, len(text)), text])


# --- reading -----------------------------------------------------------------------------------


class StreamReader:
    """Reads exactly what is asked for, straight into the caller's buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bytes_received = 0

    def read_into(self, view: memoryview, what: str) -> None:
        got = 0
        total = len(view)
        while got < total:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise StreamError(
                    f"stream ended early: {what} needed {total} bytes, got {got} "
                    "(the source closed the connection or died)"
                )
            got += n
        self.bytes_received += total

    def read(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf), what)
        return bytes(buf)

    def preamble(self) -> None:
        magic, version = PREAMBLE.unpack(self.read(PREAMBLE.size, "the stream preamble"))
        if magic != PREAMBLE_MAGIC:
            raise StreamError(f"not a pyvmm migration stream (magic {magic!r})")
        if version != STREAM_VERSION:
            raise StreamError(
                f"migration stream version {version} is not supported (this pyvmm speaks "
                f"version {STREAM_VERSION})"
            )

    def record(self) -> tuple[RecordType, int, int]:
        rtype, arg, length = RECORD.unpack(self.read(RECORD.size, "a record header"))
        try:
            return RecordType(rtype), arg, length
        except ValueError:
            raise StreamError(f"unknown record type {rtype} in the migration stream") from None

    def reason(self, length: int, what: str) -> str:
        """The payload of an ABANDON or ERROR record, as one printable line."""
        if not 0 < length <= MAX_REASON_BYTES:
            raise StreamError(f"{what} record of {length} bytes (limit {MAX_REASON_BYTES})")
        text = self.read(length, f"the {what} record").decode("utf-8", "replace")
        return "".join(c if c.isprintable() else "?" for c in text)

    def reply(self) -> tuple[ReplyType, int, str]:
        """One reply from the destination: (type, arg, reason for ERROR else "")."""
        rtype, arg, length = RECORD.unpack(self.read(RECORD.size, "a reply"))
        try:
            reply = ReplyType(rtype)
        except ValueError:
            raise StreamError(f"the destination sent an unknown reply type {rtype}") from None
        if reply is ReplyType.ERROR:
            return reply, arg, self.reason(length, "ERROR")
        if length:
            raise StreamError(f"{reply.name} reply with {length} bytes of payload")
        return reply, arg, ""


class StreamValidator:
    """The ordering and size rules of the stream, checked before anything is applied."""

    def __init__(self) -> None:
        self.seen_header = False
        self.seen_state = False
        self.config: StreamConfig | None = None

    def check_record(self, rtype: RecordType, length: int) -> None:
        if rtype is RecordType.ABANDON:
            return  # allowed at any point; its length is checked when it is read
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
        elif rtype is RecordType.RAM_RUN:
            data = length - RUN.size
            if length < RUN.size + PAGE_SIZE or data % PAGE_SIZE:
                raise StreamError(f"RAM_RUN record of {length} bytes is not a whole page run")
            if data // PAGE_SIZE > MAX_RUN_PAGES:
                raise StreamError(f"RAM_RUN record of {data // PAGE_SIZE} pages is too long")
        elif rtype is RecordType.ZERO_RUN and length != ZERO.size:
            raise StreamError(f"ZERO_RUN record of {length} bytes (expected {ZERO.size})")
        elif rtype is RecordType.ITERATION and length != ITERATION.size:
            raise StreamError(f"ITERATION record of {length} bytes (expected 8)")
        elif rtype is RecordType.SWITCHOVER:
            if length != 0:
                raise StreamError(f"SWITCHOVER record with {length} bytes of payload")
            if not self.seen_state:
                raise StreamError("SWITCHOVER record before the STATE record")
        elif rtype is RecordType.GO:
            raise StreamError("GO record before the SWITCHOVER record")

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
