"""Build migration streams (valid and hostile) for the receiver's tests and fuzz corpus.

Records are framed here independently of pyvmm's StreamWriter: the checksum comes from the
`xxhash` package, so every valid stream in the tests also checks pyvmm's own xxHash64
(docs/migration-stream.md gives the rule: seed = the record's sequence number, over the
header's first 16 bytes and then the payload)."""

from __future__ import annotations

import json

import xxhash

from pyvmm.migration.stream import (
    CHANNEL_MAGIC,
    CHECKSUM,
    FLAG_CHECKSUM,
    ITERATION,
    MULTIFD,
    PREAMBLE,
    PREAMBLE_MAGIC,
    RECORD_HASHED,
    RUN,
    RUN_MAY_CHANGE,
    STREAM_VERSION,
    SYNC_FINAL,
    VALUE,
    ZERO,
    RecordType,
    StreamConfig,
)

MEM = 16 << 20
SESSION = bytes(range(16))  # a multifd session id (the source draws 16 random bytes)


def config(mem: int = MEM, vcpus: int = 1, start_all: bool = True) -> StreamConfig:
    return StreamConfig(mem, [(0, mem)], vcpus, start_all, not start_all, 2_000_000)


def preamble(
    magic: bytes = PREAMBLE_MAGIC, version: int = STREAM_VERSION, flags: int = FLAG_CHECKSUM
) -> bytes:
    return PREAMBLE.pack(magic, version, flags)


def frame(
    seq: int, rtype: int, payload: bytes, arg: int = 0, length: int | None = None,
    checksum: bool | int = True,
) -> bytes:  # fmt: skip
    """One record: the 24-byte header (checksum: True computes it, False writes 0, an int
    is written as it is) and the payload."""
    head = RECORD_HASHED.pack(rtype, arg, len(payload) if length is None else length)
    value = xxhash.xxh64_intdigest(head + payload, seq) if checksum is True else int(checksum)
    return head + CHECKSUM.pack(value) + payload


class Stream:
    """A stream under construction; its records get sequence numbers 0, 1, 2 ... in order.

    Stream().header().ram_run(0, 256, 2).bytes() is a preamble, a HEADER and a RAM_RUN."""

    def __init__(self, checksum: bool = True, head: bytes | None = None) -> None:
        self.checksum = checksum
        flags = FLAG_CHECKSUM if checksum else 0
        self.data = bytearray(preamble(flags=flags) if head is None else head)
        self.seq = 0
        self._last = len(self.data)

    def record(
        self, rtype: int, payload: bytes = b"", arg: int = 0, length: int | None = None,
        checksum: bool | int | None = None, seq: int | None = None,
    ) -> Stream:  # fmt: skip
        value = self.checksum if checksum is None else checksum
        self._last = len(self.data)
        self.data += frame(self.seq if seq is None else seq, rtype, payload, arg, length, value)
        self.seq += 1
        return self

    def header(self, cfg: StreamConfig | None = None) -> Stream:
        return self.record(RecordType.HEADER, (cfg or config()).to_json())

    def header_json(self, text: str | bytes) -> Stream:
        return self.record(RecordType.HEADER, text.encode() if isinstance(text, str) else text)

    def ram_run(
        self, slot: int, first: int, npages: int, fill: int = 0xAB, may_change: bool = False
    ) -> Stream:
        """A RAM_RUN. With checksums its payload is the run header, the page-hash table
        (each page's xxHash64, seed 0) and the pages; the record's checksum covers the
        header's first 16 bytes, the run header and the table."""
        page = bytes([fill]) * 4096
        arg = RUN_MAY_CHANGE if may_change else 0
        run = RUN.pack(slot, 0, first)
        if not self.checksum:
            return self.record(RecordType.RAM_RUN, run + page * npages, arg)
        fixed = run + CHECKSUM.pack(xxhash.xxh64_intdigest(page)) * npages
        head = RECORD_HASHED.pack(RecordType.RAM_RUN, arg, len(fixed) + len(page) * npages)
        value = xxhash.xxh64_intdigest(head + fixed, self.seq)
        return self.record(RecordType.RAM_RUN, fixed + page * npages, arg, checksum=value)

    def zero_run(self, slot: int, first: int, npages: int) -> Stream:
        return self.record(RecordType.ZERO_RUN, ZERO.pack(slot, 0, first, npages))

    def iteration(self, n: int) -> Stream:
        return self.record(RecordType.ITERATION, ITERATION.pack(n))

    def state(self, data: bytes) -> Stream:
        return self.record(RecordType.STATE, data)

    def switchover(self, running: bool = True) -> Stream:
        return self.record(RecordType.SWITCHOVER, arg=int(running))

    def go(self) -> Stream:
        return self.record(RecordType.GO)

    # --- multifd (stream version 5) ---

    def multifd(self, channels: int, session: bytes = SESSION) -> Stream:
        """The main stream's MULTIFD record: channels, 0, the 16-byte session."""
        return self.record(RecordType.MULTIFD, MULTIFD.pack(channels, 0, session))

    def channel(self, index: int, channels: int, session: bytes = SESSION) -> Stream:
        """A channel's CHANNEL record (its first, after a CHANNEL_MAGIC preamble)."""
        return self.record(RecordType.CHANNEL, MULTIFD.pack(index, channels, session))

    def sync(self, number: int, final: bool = False) -> Stream:
        """MULTIFD_SYNC, on the main stream or a channel."""
        return self.record(RecordType.MULTIFD_SYNC, VALUE.pack(number), int(final) * SYNC_FINAL)

    def flip(self, offset: int, xor: int = 0x01) -> Stream:
        """Flip bits at `offset` bytes into the last record (header included), after its
        checksum was computed: what corruption in transit looks like."""
        self.data[self._last + offset] ^= xor
        return self

    def cut(self, keep: int) -> Stream:
        """Keep only the first `keep` bytes of the last record."""
        del self.data[self._last + keep :]
        return self

    def bytes(self) -> bytes:
        return bytes(self.data)


def channel_stream(index: int, channels: int, checksum: bool = True) -> Stream:
    """A multifd channel's stream up to its CHANNEL record."""
    flags = FLAG_CHECKSUM if checksum else 0
    return Stream(checksum, head=preamble(CHANNEL_MAGIC, flags=flags)).channel(index, channels)


def prefix(checksum: bool = True) -> Stream:
    """A well-formed stream up to (not including) the STATE record."""
    return Stream(checksum).header().ram_run(0, 256, 2).zero_run(0, 300, 10).iteration(1)


def valid_prefix() -> bytes:
    return prefix().bytes()


def _header_with(**changes: object) -> str:
    doc = json.loads(config().to_json())
    doc.update(changes)
    return json.dumps(doc)


def _header_text(old: str, new: str) -> str:
    return config().to_json().decode().replace(old, new, 1)


# Where the bytes of a record's payload start (24-byte header), and a RAM_RUN's page data
# (after the 16-byte run header and 8 bytes of hash per page).
PAYLOAD = 24


def page_data(npages: int) -> int:
    return PAYLOAD + 16 + 8 * npages


# Pages a stream may have written before it was refused, beside the valid prefix's 256 and
# 257: page data goes straight into guest RAM at validated offsets, and a page's hash can only
# be compared once it is there (a failed destination never runs its VM).
WRITES_BEFORE_REFUSAL: dict[str, set[int]] = {
    "truncated-mid-page": {10, 11, 12, 13},
    "flipped-bit-in-page-data": {20, 21},
    "changed-page-never-sent-again": {20, 21},
    "changed-page-sent-again": {20, 21},
    "pages-sent-twice": {20, 21},
}

HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "wrong-magic": Stream(head=preamble(b"QEMU-MG!")).header().bytes(),
    "wrong-version": Stream(head=preamble(version=99)).header().bytes(),
    "version-2": Stream(head=preamble(version=2)[:12]).header().bytes(),
    "unknown-flags": Stream(head=preamble(flags=0x80)).header().bytes(),
    "truncated-preamble": preamble()[:5],
    "truncated-preamble-flags": preamble()[:13],
    "record-before-header": Stream().ram_run(0, 0, 1).bytes(),
    "duplicate-header": Stream().header().header().bytes(),
    "huge-header": Stream().record(RecordType.HEADER, b"{}", length=1 << 40).bytes(),
    "garbage-header": Stream().header_json(b"\xff\xfe not json").bytes(),
    "header-wrong-types": Stream()
    .header_json('{"mem_bytes": "x", "slots": 3, "vcpus": -1}').bytes(),
    # Item 12 of issue 12: HEADER values int() used to accept, and the parser's tracebacks.
    "header-slot-strings": Stream().header_json(_header_with(slots=[["0", "16777216"]])).bytes(),
    "header-slot-floats": Stream().header_json(_header_with(slots=[[0.0, 16777216.0]])).bytes(),
    "header-slot-booleans": Stream().header_json(_header_with(slots=[[False, 16777216]])).bytes(),
    "header-slot-1e400": Stream().header_json(_header_text("[[0, 16777216]]", "[[0, 1e400]]"))
    .bytes(),
    "header-slot-infinity": Stream()
    .header_json(_header_text("[[0, 16777216]]", "[[0, Infinity]]")).bytes(),
    "header-tsc-nan": Stream().header_json(_header_text("2000000", "NaN")).bytes(),
    "header-tsc-2-to-80": Stream().header_json(_header_with(tsc_khz=2**80)).bytes(),
    "header-tsc-above-kvm": Stream().header_json(_header_with(tsc_khz=0x7FFFFFFF)).bytes(),
    "header-vcpus-boolean": Stream().header_json(_header_with(vcpus=True)).bytes(),
    "header-vcpus-float": Stream().header_json(_header_with(vcpus=1.0)).bytes(),
    "header-mem-string": Stream().header_json(_header_with(mem_bytes="16777216")).bytes(),
    "header-irqchip-integer": Stream().header_json(_header_with(irqchip=0)).bytes(),
    "header-unknown-key": Stream().header_json(_header_with(surprise=1)).bytes(),
    "header-duplicate-key": Stream()
    .header_json(_header_text('"vcpus": 1', '"vcpus": 1, "vcpus": 2')).bytes(),
    "header-nested-65536": Stream().header_json(b"[" * 65536).bytes(),
    "header-nested-in-slots": Stream()
    .header_json(_header_with(slots=[[[[[[0]]]]], [0, 4096]])).bytes(),
    "header-not-an-object": Stream().header_json("[]").bytes(),
    "header-too-many-slots": Stream().header_json(_header_with(slots=[[0, 4096]] * 17)).bytes(),
    "mem-mismatch": Stream().header(config(mem=32 << 20)).bytes(),
    "vcpu-mismatch": Stream().header(config(vcpus=3)).bytes(),
    "page-outside-ram": prefix().ram_run(0, (MEM >> 12) - 1, 2).bytes(),
    "slot-outside-ram": prefix().ram_run(7, 0, 1).bytes(),
    "zero-run-outside-ram": prefix().zero_run(0, 1, 1 << 40).bytes(),
    "run-length-past-end": prefix().record(RecordType.RAM_RUN, RUN.pack(0, 0, 5) + b"\0" * 100,
                                           length=16 + 4096 * 3).bytes(),
    "run-not-whole-pages": prefix().record(RecordType.RAM_RUN, RUN.pack(0, 0, 5) + b"x").bytes(),
    "run-too-long": prefix().record(RecordType.RAM_RUN, b"", length=16 + 4096 * 5000).bytes(),
    "unknown-record": prefix().record(99, b"").bytes(),
    "garbage-state": prefix().state(b"\x00garbage\xff" * 10).bytes(),
    "huge-state": prefix().record(RecordType.STATE, b"", length=1 << 33).bytes(),
    "state-of-empty-lists": prefix().state(b"[" + b"[]," * 400_000 + b"[]]").bytes(),
    "switchover-before-state": prefix().switchover().bytes(),
    "go-before-switchover": prefix().go().bytes(),
    # COLO (stream version 4): its checkpoints only after the migration's end, and only a
    # destination that can be a secondary takes COLO_ENABLE (the corpus's cannot).
    "colo-request-before-the-end": prefix().record(RecordType.CHECKPOINT_REQUEST,
                                                   (1).to_bytes(8, "little")).bytes(),
    "colo-enable-unsupported": prefix().record(RecordType.COLO_ENABLE).bytes(),
    # multifd (stream version 5): the main stream's side; tests/test_multifd.py feeds
    # channels through a listening destination.
    "multifd-zero-channels": Stream().header().multifd(0).bytes(),
    "multifd-256-channels": Stream().header().multifd(256).bytes(),
    "multifd-before-header": Stream().multifd(2).bytes(),
    "multifd-after-pages": prefix().multifd(2).bytes(),
    "multifd-short": Stream().header().record(RecordType.MULTIFD, b"\x02\0\0\0").bytes(),
    "multifd-without-listener": Stream().header().multifd(2).bytes(),
    "multifd-sync-without-multifd": prefix().sync(1).bytes(),
    "channel-record-on-main-stream": Stream().header().channel(0, 2).bytes(),
    "channel-preamble-on-main-connection": channel_stream(0, 2).bytes(),
    "abandoned": prefix().record(RecordType.ABANDON, b"the source was cancelled").bytes(),
    "huge-abandon": prefix().record(RecordType.ABANDON, b"", length=1 << 30).bytes(),
    "truncated-mid-page": prefix().ram_run(0, 10, 4).cut(page_data(4) + 9000).bytes(),
    "truncated-after-prefix": valid_prefix(),
    # Item 17: format-legal corruption that only the checksum can see.
    "flipped-bit-in-page-data": prefix().ram_run(0, 20, 2).flip(page_data(2) + 5000, 0x10)
    .bytes(),
    "flipped-bit-in-run-header": prefix().ram_run(0, 20, 1).flip(PAYLOAD + 8, 0x01).bytes(),
    "flipped-bit-in-page-hash": prefix().ram_run(0, 20, 2).flip(PAYLOAD + 16 + 9, 0x04).bytes(),
    "flipped-bit-in-run-length": prefix().ram_run(0, 20, 2).flip(9, 0x10).bytes(),
    # 2 pages (16 + 2 x 4104 bytes) read as 3: a length that still looks valid.
    "run-length-one-page-more": prefix().ram_run(0, 20, 2).flip(8, 0x08).flip(9, 0x10).bytes(),
    # A page read while the guest ran may differ from its hash, if it is sent again; the
    # STATE is refused while one is still waiting.
    "changed-page-never-sent-again": prefix().ram_run(0, 20, 2, may_change=True)
    .flip(page_data(2) + 100, 0x01).state(b"{}").bytes(),
    # The same pages twice in a row: the second write must wait for the first one's check.
    "pages-sent-twice": prefix().ram_run(0, 20, 2).ram_run(0, 20, 2, fill=0xCD).state(b"{}")
    .bytes(),
    "changed-page-sent-again": prefix().ram_run(0, 20, 2, may_change=True)
    .flip(page_data(2) + 4096 + 100, 0x01).ram_run(0, 21, 1, fill=0xCD).state(b"{}").bytes(),
    "flipped-bit-in-zero-run": prefix().zero_run(0, 40, 4).flip(PAYLOAD + 8, 0x02).bytes(),
    "flipped-bit-in-header-json": Stream().header().flip(PAYLOAD + 16, 0x01).bytes(),
    "flipped-bit-in-record-arg": prefix().iteration(2).flip(4, 0x01).bytes(),
    "flipped-checksum": prefix().iteration(2).flip(16, 0x80).bytes(),
    "record-out-of-sequence": prefix().record(RecordType.ITERATION, ITERATION.pack(2), seq=9)
    .bytes(),
    "checksum-missing": prefix().record(RecordType.ITERATION, ITERATION.pack(2), checksum=0)
    .bytes(),
    "checksum-without-flag": Stream(head=preamble(flags=0)).record(
        RecordType.HEADER, config().to_json(), checksum=True).bytes(),
}  # fmt: skip
