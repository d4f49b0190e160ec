"""The multifd channel handshake, a request with a response in the manner of Cloud
Hypervisor's migration protocol (docs/migration-stream.md, "multifd channels"):

    source                                           destination
    main stream: MULTIFD(channels N, session)  --->  accept connections on the same address
    N connections: preamble "PYVMM-MC",
                   CHANNEL(index i, N, session) --->  check each (session, index, N)
    main stream:                               <---  CHANNELS_READY(arg N), or ERROR
    pages go over the channels from here on; ABANDON on the main stream ends it any time

The session is 16 random bytes the source draws per migration (QEMU's MultiFDInit_t
carries the VM's UUID for the same purpose): a channel of another migration is refused.
"""

from __future__ import annotations

import os

from pyvmm.migration.stream import (
    CHANNEL_MAGIC,
    MAX_CHANNELS,
    MULTIFD,
    RecordType,
    ReplyType,
    StreamError,
    StreamReader,
    StreamWriter,
)

SESSION_BYTES = 16


def new_session() -> bytes:
    return os.urandom(SESSION_BYTES)


def parse_request(payload: bytes | bytearray) -> tuple[int, bytes]:
    """A MULTIFD record's payload: (channels, session), checked."""
    channels, _, session = MULTIFD.unpack(payload)
    if not 1 <= channels <= MAX_CHANNELS:
        raise StreamError(f"MULTIFD record asks for {channels} channels (1..{MAX_CHANNELS})")
    return channels, bytes(session)


def send_hello(writer: StreamWriter, index: int, channels: int, session: bytes) -> None:
    """A channel's first bytes: its preamble and its CHANNEL record."""
    writer.preamble(CHANNEL_MAGIC)
    writer.record(RecordType.CHANNEL, MULTIFD.pack(index, channels, session))


def read_hello(reader: StreamReader, channels: int, session: bytes, checksum: bool) -> int:
    """Read a channel's preamble and CHANNEL record; returns its index. NothingReceived
    for a connection that sent nothing (a stray one: the caller ignores it)."""
    reader.preamble(CHANNEL_MAGIC)
    if reader.checksum != checksum:
        state = "on" if reader.checksum else "off"
        raise StreamError(f"a multifd channel has record checksums {state}, the main stream not")
    rtype, _, length = reader.record()
    if rtype is RecordType.ABANDON:
        raise StreamError(f"the source abandoned the migration: {reader.reason(length, 'ABANDON')}")
    if rtype is not RecordType.CHANNEL or length != MULTIFD.size:
        raise StreamError(f"{rtype.name} record of {length} bytes where a multifd channel's "
                          "CHANNEL record was expected")  # fmt: skip
    index, count, theirs = MULTIFD.unpack(reader.read(length, "the CHANNEL record"))
    reader.end_record("CHANNEL")
    if theirs != session:
        raise StreamError("a multifd channel of another migration connected (its session "
                          f"{bytes(theirs).hex()} is not {session.hex()})")  # fmt: skip
    if count != channels or index >= channels:
        raise StreamError(f"a multifd channel says it is channel {index} of {count}; the "
                          f"main stream announced {channels}")  # fmt: skip
    return index


def await_ready(reader: StreamReader, channels: int) -> None:
    """The source's side of the response: CHANNELS_READY for all channels, or the
    destination's ERROR (raised with its reason)."""
    try:
        reply, arg, reason = reader.reply()
    except TimeoutError:
        raise ConnectionError("the destination did not confirm the multifd channels") from None
    if reply is ReplyType.ERROR:
        raise StreamError(f"the destination refused the multifd channels: {reason}")
    if reply is not ReplyType.CHANNELS_READY or arg != channels:
        raise StreamError(f"the destination answered {reply.name} ({arg}) to MULTIFD, not "
                          f"CHANNELS_READY ({channels})")  # fmt: skip
