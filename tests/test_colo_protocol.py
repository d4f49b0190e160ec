"""The order of a COLO checkpoint's records (migration/colo/protocol.py), checked by the
secondary before it acts on them; and the migration's own validator refusing COLO records
before its end (stream.py)."""

from __future__ import annotations

import re

import pytest

from pyvmm.migration.colo.protocol import ColoValidator, Phase
from pyvmm.migration.stream import RecordType as R
from pyvmm.migration.stream import StreamConfig, StreamError, StreamValidator

CONFIG = StreamConfig(16 << 20, [(0, 16 << 20)], 1, True, False, 0)


def test_a_checkpoint_in_order() -> None:
    v = ColoValidator(CONFIG, checksum=False)
    for number in (1, 2):
        v.check_record(R.CHECKPOINT_REQUEST_PASSIVE if number == 2 else R.CHECKPOINT_REQUEST, 8)
        v.check_number(number)
        v.check_record(R.RAM_RUN, 16 + 4096)  # pre-sent
        v.check_record(R.VMSTATE_SEND, 0)
        v.check_record(R.ZERO_RUN, 24)
        v.check_record(R.RAM_RUN, 16 + 2 * 4096)
        v.check_record(R.VMSTATE_SIZE, 8)
        v.check_size(100)
        v.check_record(R.STATE, 100)
        assert v.phase is Phase.IDLE
    v.check_record(R.ABANDON, 10)  # at any time


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([(R.VMSTATE_SEND, 0)], "VMSTATE_SEND record waiting for a checkpoint request"),
        ([(R.RAM_RUN, 4112)], "RAM_RUN record waiting for a checkpoint request"),
        ([(R.CHECKPOINT_REQUEST, 4)], "CHECKPOINT_REQUEST record of 4 bytes (expected 8)"),
        ([(R.CHECKPOINT_REQUEST, 8), (R.VMSTATE_SIZE, 8)],
         "VMSTATE_SIZE record after CHECKPOINT_REQUEST in a COLO checkpoint"),
        ([(R.CHECKPOINT_REQUEST, 8), (R.STATE, 10)],
         "STATE record after CHECKPOINT_REQUEST in a COLO checkpoint"),
        ([(R.CHECKPOINT_REQUEST, 8), (R.VMSTATE_SEND, 3)],
         "VMSTATE_SEND record with 3 bytes of payload"),
        ([(R.CHECKPOINT_REQUEST, 8), (R.VMSTATE_SEND, 0), (R.RAM_RUN, 100)],
         "not a whole page run"),
        ([(R.CHECKPOINT_REQUEST, 8), (R.VMSTATE_SEND, 0), (R.HEADER, 10)],
         "HEADER record after VMSTATE_SEND in a COLO checkpoint"),
        ([(R.CHECKPOINT_REQUEST, 8), (R.VMSTATE_SEND, 0), (R.CHECKPOINT_REQUEST, 8)],
         "CHECKPOINT_REQUEST record after VMSTATE_SEND"),
    ],
)  # fmt: skip
def test_out_of_order_records_end_colo(records: list, message: str) -> None:
    v = ColoValidator(CONFIG, checksum=False)
    with pytest.raises(StreamError, match=re.escape(message)):
        for rtype, length in records:
            v.check_record(rtype, length)


def test_numbers_and_sizes() -> None:
    v = ColoValidator(CONFIG, checksum=False)
    with pytest.raises(StreamError, match="checkpoint 2 where 1 was expected"):
        v.check_number(2)
    v.check_number(1)
    with pytest.raises(StreamError, match="checkpoint 1 where 2 was expected"):
        v.check_number(1)
    with pytest.raises(StreamError, match="VMSTATE_SIZE of 0 bytes"):
        v.check_size(0)
    v.check_size(10)
    v.phase = Phase.SIZED
    with pytest.raises(StreamError, match="STATE record of 9 bytes, VMSTATE_SIZE announced 10"):
        v.check_record(R.STATE, 9)


def test_the_migration_refuses_colo_records_before_its_end() -> None:
    v = StreamValidator()
    v.check_record(R.HEADER, 100)
    v.check_record(R.COLO_ENABLE, 0)
    with pytest.raises(StreamError, match="duplicate COLO_ENABLE record"):
        v.check_record(R.COLO_ENABLE, 0)
    with pytest.raises(StreamError, match="CHECKPOINT_REQUEST record before the migration's end"):
        v.check_record(R.CHECKPOINT_REQUEST, 8)
    v.check_record(R.STATE, 100)
    with pytest.raises(StreamError, match="COLO_ENABLE record after the STATE record"):
        v.check_record(R.COLO_ENABLE, 0)
