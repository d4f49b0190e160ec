"""The order of a COLO checkpoint's records, checked by the secondary before it acts.

After the migration's handshake (STATE, SWITCHOVER, LOADED, GO, STARTED) and the
secondary's CHECKPOINT_READY, the stream is a sequence of checkpoints, each:

    CHECKPOINT_REQUEST or CHECKPOINT_REQUEST_PASSIVE (u64: its number, 1, 2, 3, ...)
    [RAM_RUN | ZERO_RUN ...]   pre-sent while the primary still runs (arg bit 0 set)
    VMSTATE_SEND               the primary has stopped
    [RAM_RUN | ZERO_RUN ...]   every page it dirtied since the last checkpoint
    VMSTATE_SIZE (u64: n)      then STATE, exactly n bytes: the machine state
                          <--  VMSTATE_RECEIVED (u64)   the secondary has all of it
                          <--  VMSTATE_LOADED (u64)     it has applied it

This is the ORBIT branch's order (colo_do_checkpoint_transaction), with pyvmm's records:
no CHECKPOINT_REPLY, and the comparator's release between RECEIVED and LOADED. ABANDON
may come at any point and ends COLO; so does anything out of order.
"""

from __future__ import annotations

from enum import Enum

from pyvmm.migration.stream import (
    MAX_STATE_BYTES,
    VALUE,
    RecordType,
    StreamConfig,
    StreamError,
    StreamValidator,
)

PAGE_RECORDS = (RecordType.RAM_RUN, RecordType.ZERO_RUN)
REQUESTS = (RecordType.CHECKPOINT_REQUEST, RecordType.CHECKPOINT_REQUEST_PASSIVE)


class Phase(Enum):
    IDLE = "waiting for a checkpoint request"
    REQUESTED = "after CHECKPOINT_REQUEST"
    SENDING = "after VMSTATE_SEND"
    SIZED = "after VMSTATE_SIZE"


class ColoValidator:
    """One checkpoint after another; the page records' own rules are StreamValidator's."""

    def __init__(self, config: StreamConfig, checksum: bool) -> None:
        self.pages = StreamValidator(checksum)
        self.pages.seen_header = True
        self.pages.config = config
        self.phase = Phase.IDLE
        self.number = 0  # the last checkpoint begun
        self.size = 0  # the STATE record's announced size

    def check_record(self, rtype: RecordType, length: int) -> None:
        if rtype is RecordType.ABANDON:
            return
        phase = self.phase
        if phase is Phase.IDLE and rtype in REQUESTS:
            self._value(rtype, length)
            self.phase = Phase.REQUESTED
        elif phase in (Phase.REQUESTED, Phase.SENDING) and rtype in PAGE_RECORDS:
            self.pages.check_record(rtype, length)
        elif phase is Phase.REQUESTED and rtype is RecordType.VMSTATE_SEND:
            if length:
                raise StreamError(f"VMSTATE_SEND record with {length} bytes of payload")
            self.phase = Phase.SENDING
        elif phase is Phase.SENDING and rtype is RecordType.VMSTATE_SIZE:
            self._value(rtype, length)
            self.phase = Phase.SIZED
        elif phase is Phase.SIZED and rtype is RecordType.STATE:
            if length != self.size:
                raise StreamError(
                    f"STATE record of {length} bytes, VMSTATE_SIZE announced {self.size}"
                )
            self.phase = Phase.IDLE
        else:
            raise StreamError(f"{rtype.name} record {phase.value} in a COLO checkpoint")

    @staticmethod
    def _value(rtype: RecordType, length: int) -> None:
        if length != VALUE.size:
            raise StreamError(f"{rtype.name} record of {length} bytes (expected {VALUE.size})")

    def check_number(self, number: int) -> None:
        if number != self.number + 1:
            raise StreamError(f"checkpoint {number} where {self.number + 1} was expected")
        self.number = number

    def check_size(self, size: int) -> None:
        if not 0 < size <= MAX_STATE_BYTES:
            raise StreamError(f"VMSTATE_SIZE of {size} bytes (limit {MAX_STATE_BYTES})")
        self.size = size
