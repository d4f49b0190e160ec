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
    # prefix's two pages, and the run whose data the truncated stream cut short (page data
    # goes straight into guest RAM; a failed destination discards its VM).
    allowed = {256, 257} | ({10, 11, 12, 13} if name == "truncated-mid-page" else set())
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
