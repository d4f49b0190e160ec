"""The pyvmm migration stream, version 1 (documented record by record in
docs/migration-stream.md).

A stream is a 12-byte preamble (magic b"PYVMM-MG", u32 version) followed by
records. Every record is a 16-byte header, `<IIQ`: type, a type-specific
argument, and the payload length in bytes; then the payload. Little-endian.

  HEADER     once, first      JSON machine configuration (<= 64 KiB)
  RAM_RUN    any number       u32 slot, u32 0, u64 first_page, then npages x 4096 bytes
  ZERO_RUN   any number       u32 slot, u32 0, u64 first_page, u64 npages (no data)
  ITERATION  any number       u64 iteration number (end of a pre-copy pass)
  STATE      once             the machine state (pyvmm/machine/state.py's format)
  COMPLETE   once, last       empty; arg 1 if the guest was running; answered with ACK_MAGIC

The receiver checks every length, slot, page range and ordering rule before
it touches guest memory (StreamValidator), so a truncated, corrupted or
hostile stream ends with a StreamError, never a write outside guest RAM.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

PREAMBLE_MAGIC = b"PYVMM-MG"
STREAM_VERSION = 1
PREAMBLE = struct.Struct("<8sI")
RECORD = struct.Struct("<IIQ")
RUN = struct.Struct("<IIQ")  # slot, pad, first_page
ZERO = struct.Struct("<IIQQ")  # slot, pad, first_page, npages
ITERATION = struct.Struct("<Q")
ACK_MAGIC = b"PYVMM-OK"
PAGE_SIZE = 4096
MAX_HEADER_BYTES = 64 << 10
MAX_RUN_PAGES = 4096  # 16 MiB of data per RAM_RUN record
MAX_STATE_BYTES = 16 << 20  # what machine/state.py accepts


class RecordType(IntEnum):
    HEADER = 1
    RAM_RUN = 2
    ZERO_RUN = 3
    ITERATION = 4
    STATE = 5
    COMPLETE = 6


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
    def record_header(rtype: RecordType, length: int, arg: int = 0) -> bytes:
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

    def complete(self, guest_running: bool) -> None:
        """The end; the argument says whether the guest ran (the destination then starts it)."""
        self.send([self.record_header(RecordType.COMPLETE, 0, int(guest_running))])


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


class StreamValidator:
    """The ordering and size rules of the stream, checked before anything is applied."""

    def __init__(self) -> None:
        self.seen_header = False
        self.seen_state = False
        self.config: StreamConfig | None = None

    def check_record(self, rtype: RecordType, length: int) -> None:
        if not self.seen_header and rtype is not RecordType.HEADER:
            raise StreamError(f"{rtype.name} record before the HEADER record")
        if rtype is RecordType.HEADER:
            self._once(rtype, length, MAX_HEADER_BYTES, self.seen_header)
            self.seen_header = True
        elif rtype is RecordType.STATE:
            self._once(rtype, length, MAX_STATE_BYTES, self.seen_state)
            self.seen_state = True
        elif self.seen_state and rtype is not RecordType.COMPLETE:
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
        elif rtype is RecordType.COMPLETE:
            if length != 0:
                raise StreamError(f"COMPLETE record with {length} bytes of payload")
            if not self.seen_state:
                raise StreamError("COMPLETE record before the STATE record")

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
