"""The migration receiver against hostile input: a kept corpus and a fuzzer.

The corpus is kept as code, tests/streamgen.py's HOSTILE table (name -> stream bytes), so
it is reviewed like code and never goes stale against the stream format.

Every malformed stream must end in a one-line StreamError or ConnectionError,
never another exception, a hang, or a write outside the pages it was allowed to fill.
"""

from __future__ import annotations

import io
import socket
import threading

import numpy as np
import pytest
import streamgen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.migration.destination import MigrationDestination
from pyvmm.migration.stream import StreamError

pytestmark = pytest.mark.kvm
EXPECTED_ERRORS = (StreamError, ConnectionError)


def feed(data: bytes) -> tuple[BaseException | None, np.ndarray]:
    """Run a destination on `data`; return the error it raised and a copy of guest RAM."""
    machine = Machine(MachineConfig(streamgen.MEM, 1), SerialConsole(io.StringIO()))
    dest = MigrationDestination(machine, "unix:/unused")
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)

    def writer() -> None:
        try:
            ours.sendall(data)
        except OSError:
            pass  # the receiver gave up early: expected for bad streams
        finally:
            ours.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    error: BaseException | None = None
    try:
        dest.receive_from(theirs, lambda running: running)
    except BaseException as exc:
        error = exc
    finally:
        theirs.close()
        thread.join(10)
        ram = machine.memory.regions[0].array.copy()
        machine.close()
    return error, ram


@pytest.mark.parametrize("name", sorted(streamgen.HOSTILE))
def test_corpus_streams_are_refused_cleanly(name: str) -> None:
    error, ram = feed(streamgen.HOSTILE[name])
    assert isinstance(error, EXPECTED_ERRORS), repr(error)
    assert "\n" not in str(error) and str(error)
    # Only pages named by records that passed validation may have been written: the valid
    # prefix's two pages, and the run whose data was cut short or failed its checksum (page
    # data goes straight into guest RAM; a failed destination discards its VM).
    allowed = {256, 257} | streamgen.WRITES_BEFORE_REFUSAL.get(name, set())
    written = np.flatnonzero(ram.reshape(-1, 4096).any(axis=1))
    assert set(written.tolist()) <= allowed, written[:10]


def test_messages_name_the_problem() -> None:
    cases = {
        "wrong-magic": "not a pyvmm migration stream",
        "wrong-version": "version 99 is not supported",
        "mem-mismatch": "memory size mismatch: the source VM has 32M of RAM, this one 16M",
        "vcpu-mismatch": "vCPU count mismatch: the source VM has 3 vCPUs, this one 1",
        "page-outside-ram": "outside slot 0",
        "duplicate-header": "duplicate HEADER",
        "truncated-mid-page": "stream ended early",
        "garbage-state": "bad machine state",
        "abandoned": "the source abandoned the migration: the source was cancelled",
        "go-before-switchover": "GO record before the SWITCHOVER record",
        "colo-request-before-the-end": "CHECKPOINT_REQUEST record before the migration's end",
        "colo-enable-unsupported": "the source asks for COLO, which this VM cannot do",
        "version-2": "version 2 is not supported (this pyvmm speaks version 5)",
        "multifd-zero-channels": "MULTIFD record asks for 0 channels (1..255)",
        "multifd-256-channels": "MULTIFD record asks for 256 channels (1..255)",
        "multifd-before-header": "MULTIFD record before the HEADER record",
        "multifd-after-pages": "MULTIFD record after the migration's pages began",
        "multifd-short": "MULTIFD record of 4 bytes (expected 24)",
        "multifd-without-listener": "the source asks for multifd channels, but this "
        "destination does not listen for them",
        "multifd-sync-without-multifd": "MULTIFD_SYNC record without a MULTIFD record",
        "channel-record-on-main-stream": "CHANNEL record on the main stream",
        "channel-preamble-on-main-connection": "a multifd channel connected where a migration "
        "stream began",
        "unknown-flags": "unknown stream flags 0x80",
        "header-slot-strings": "malformed HEADER record: slots[0] gpa: expected an integer, got "
        "string",
        "header-slot-floats": "slots[0] gpa: expected an integer, got float",
        "header-slot-booleans": "slots[0] gpa: expected an integer, got boolean",
        "header-slot-1e400": "slots[0] size: expected an integer, got float",
        "header-slot-infinity": "Infinity is not allowed",
        "header-tsc-nan": "NaN is not allowed",
        "header-tsc-2-to-80": "tsc_khz: a 81-bit number is out of range 0..2147483646",
        "header-tsc-above-kvm": "tsc_khz: 2147483647 is out of range 0..2147483646",
        "header-vcpus-boolean": "vcpus: expected an integer, got boolean",
        "header-irqchip-integer": "irqchip: expected true or false, got int",
        "header-unknown-key": "unknown key 'surprise'",
        "header-duplicate-key": "duplicate key 'vcpus'",
        "header-nested-65536": "up to 65537 JSON values, at most 256 (refused unparsed)",
        "header-nested-in-slots": "JSON nested too deeply (limit 3)",
        "header-too-many-slots": "slots: 17 entries, expected 1..16",
        "state-of-empty-lists": "bad machine state in the stream: machine state: input: up to",
        "flipped-bit-in-page-data": "page checksum mismatch in RAM_RUN record #4 (slot 0, "
        "page 21): 1 of its 2 pages differ from their hashes",
        "flipped-bit-in-run-header": "checksum mismatch in RAM_RUN record #4",
        "flipped-bit-in-page-hash": "checksum mismatch in RAM_RUN record #4",
        "flipped-bit-in-run-length": "RAM_RUN record of 12320 bytes is not a whole page run",
        "run-length-one-page-more": "checksum mismatch in RAM_RUN record #4",
        "changed-page-never-sent-again": "page checksum mismatch in RAM_RUN record #4 (slot 0, "
        "page 20), read while the guest ran, and 1 such page(s) were never sent again",
        "changed-page-sent-again": "bad machine state",
        "pages-sent-twice": "bad machine state",
        "flipped-bit-in-zero-run": "checksum mismatch in ZERO_RUN record #4",
        "flipped-bit-in-header-json": "checksum mismatch in HEADER record #0",
        "flipped-bit-in-record-arg": "checksum mismatch in ITERATION record #4",
        "flipped-checksum": "checksum mismatch in ITERATION record #4",
        "record-out-of-sequence": "checksum mismatch in ITERATION record #4",
        "checksum-missing": "checksum mismatch in ITERATION record #4",
        "checksum-without-flag": "HEADER record #0 carries a checksum, but the preamble "
        "announced none",
    }
    for name, needle in cases.items():
        error, _ = feed(streamgen.HOSTILE[name])
        assert needle in str(error), (name, str(error))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    cut=st.integers(0, 20000),
    flips=st.lists(st.tuples(st.integers(0, 20000), st.integers(1, 255)), max_size=8),
)
def test_fuzzed_streams_fail_cleanly(data: st.DataObject, cut: int, flips: list) -> None:
    base = bytearray(streamgen.valid_prefix() + data.draw(st.binary(max_size=64)))
    for pos, xor in flips:
        if pos < len(base):
            base[pos] ^= xor
    stream = bytes(base[: max(cut, 12)])
    error, _ = feed(stream)
    # Without a valid STATE, SWITCHOVER and GO no stream can succeed: it must fail, cleanly.
    assert isinstance(error, EXPECTED_ERRORS), repr(error)
