"""Build migration streams (valid and hostile) for the receiver's tests and fuzz corpus."""

from __future__ import annotations

from pyvmm.migration.stream import (
    ITERATION,
    PREAMBLE,
    PREAMBLE_MAGIC,
    RECORD,
    RUN,
    STREAM_VERSION,
    ZERO,
    RecordType,
    StreamConfig,
)

MEM = 16 << 20


def config(mem: int = MEM, vcpus: int = 1, start_all: bool = True) -> StreamConfig:
    return StreamConfig(mem, [(0, mem)], vcpus, start_all, not start_all, 2_000_000)


def preamble(magic: bytes = PREAMBLE_MAGIC, version: int = STREAM_VERSION) -> bytes:
    return PREAMBLE.pack(magic, version)


def record(rtype: int, payload: bytes, arg: int = 0, length: int | None = None) -> bytes:
    return RECORD.pack(rtype, arg, len(payload) if length is None else length) + payload


def header(cfg: StreamConfig | None = None) -> bytes:
    return record(RecordType.HEADER, (cfg or config()).to_json())


def ram_run(slot: int, first: int, npages: int, fill: int = 0xAB) -> bytes:
    return record(RecordType.RAM_RUN, RUN.pack(slot, 0, first) + bytes([fill]) * 4096 * npages)


def zero_run(slot: int, first: int, npages: int) -> bytes:
    return record(RecordType.ZERO_RUN, ZERO.pack(slot, 0, first, npages))


def iteration(n: int) -> bytes:
    return record(RecordType.ITERATION, ITERATION.pack(n))


def valid_prefix() -> bytes:
    """A well-formed stream up to (not including) the STATE record."""
    return preamble() + header() + ram_run(0, 256, 2) + zero_run(0, 300, 10) + iteration(1)


HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "wrong-magic": preamble(b"QEMU-MG!") + header(),
    "wrong-version": preamble(version=99) + header(),
    "truncated-preamble": preamble()[:5],
    "record-before-header": preamble() + ram_run(0, 0, 1),
    "duplicate-header": preamble() + header() + header(),
    "huge-header": preamble() + record(RecordType.HEADER, b"{}", length=1 << 40),
    "garbage-header": preamble() + record(RecordType.HEADER, b"\xff\xfe not json"),
    "header-wrong-types": preamble()
    + record(RecordType.HEADER, b'{"mem_bytes": "x", "slots": 3, "vcpus": -1}'),
    "mem-mismatch": preamble() + header(config(mem=32 << 20)),
    "vcpu-mismatch": preamble() + header(config(vcpus=3)),
    "page-outside-ram": valid_prefix() + ram_run(0, (MEM >> 12) - 1, 2),
    "slot-outside-ram": valid_prefix() + ram_run(7, 0, 1),
    "zero-run-outside-ram": valid_prefix() + zero_run(0, 1, 1 << 40),
    "run-length-past-end": valid_prefix() + record(RecordType.RAM_RUN, RUN.pack(0, 0, 5)
                                                   + b"\0" * 100, length=16 + 4096 * 3),
    "run-not-whole-pages": valid_prefix() + record(RecordType.RAM_RUN, RUN.pack(0, 0, 5) + b"x"),
    "run-too-long": valid_prefix() + record(RecordType.RAM_RUN, b"", length=16 + 4096 * 5000),
    "unknown-record": valid_prefix() + record(99, b""),
    "garbage-state": valid_prefix() + record(RecordType.STATE, b"\x00garbage\xff" * 10),
    "huge-state": valid_prefix() + record(RecordType.STATE, b"", length=1 << 33),
    "switchover-before-state": valid_prefix() + record(RecordType.SWITCHOVER, b""),
    "go-before-switchover": valid_prefix() + record(RecordType.GO, b""),
    "abandoned": valid_prefix() + record(RecordType.ABANDON, b"the source was cancelled"),
    "huge-abandon": valid_prefix() + record(RecordType.ABANDON, b"", length=1 << 30),
    "truncated-mid-page": valid_prefix() + ram_run(0, 10, 4)[:9000],
    "truncated-after-prefix": valid_prefix(),
}  # fmt: skip
