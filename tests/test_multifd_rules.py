"""multifd's decision logic without processes: the ordering rule at sync points (a state
machine, checked against a model of the destination's memory) and the channel handshake
over socketpairs, both deterministic, without sleeps."""

from __future__ import annotations

import socket
import threading

import pytest
import streamgen
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.migration.multifd.barrier import SyncBarrier, SyncState
from pyvmm.migration.multifd.wire import await_ready, read_hello, send_hello
from pyvmm.migration.stream import (
    CHANNEL_MAGIC,
    NothingReceived,
    ReplyType,
    StreamError,
    StreamReader,
    StreamWriter,
)

SESSION = streamgen.SESSION

# --- the ordering rule -------------------------------------------------------------------------


def test_a_party_waits_at_a_sync_point_for_every_other() -> None:
    state = SyncState(3)  # channels 0, 1 and the main stream
    state.arrive(0, 1)
    assert not state.may_pass(0)
    assert state.may_pass(1) and state.may_pass(2)  # they have not reached it yet
    state.arrive(1, 1)
    assert not state.may_pass(0) and not state.may_pass(1)
    state.arrive(2, 1)
    assert all(state.may_pass(p) for p in range(3))


def test_sync_points_are_numbered_one_by_one() -> None:
    state = SyncState(2)
    state.arrive(0, 1)
    with pytest.raises(StreamError, match="MULTIFD_SYNC 3 where 2 was expected"):
        state.arrive(0, 3)
    with pytest.raises(StreamError, match="MULTIFD_SYNC 1 where 2 was expected"):
        state.arrive(0, 1)


def _apply(
    plan: list[list[tuple[int, int] | None]], schedule: list[int], keep_rule: bool
) -> tuple[dict[int, int], bool]:
    """Run channels' record lists (a record: (page, iteration); None: a sync point) in the
    order `schedule` picks channels, as the destination would; returns the memory (page ->
    iteration of the copy applied last) and whether a page of an older iteration ever
    overwrote a newer one. keep_rule=False ignores the barrier (what must go wrong)."""
    channels = len(plan)
    state = SyncState(channels)
    position = [0] * channels
    memory: dict[int, int] = {}
    regressed = False
    for pick in schedule:
        movable = [
            c for c in range(channels)
            if position[c] < len(plan[c]) and (not keep_rule or state.may_pass(c))
        ]  # fmt: skip
        if not movable:
            break
        c = movable[pick % len(movable)]
        record = plan[c][position[c]]
        position[c] += 1
        if record is None:
            state.arrive(c, state.reached[c] + 1)
            continue
        page, iteration = record
        regressed |= memory.get(page, 0) > iteration
        memory[page] = iteration
    return memory, regressed


@st.composite
def _plans(draw: st.DrawFn) -> tuple[list[list[tuple[int, int] | None]], dict[int, int]]:
    """What a source sends: in each iteration, each dirty page once, on any channel; a sync
    point on every channel after each iteration."""
    channels = draw(st.integers(1, 4))
    iterations = draw(st.integers(1, 4))
    plan: list[list[tuple[int, int] | None]] = [[] for _ in range(channels)]
    last: dict[int, int] = {}
    for iteration in range(1, iterations + 1):
        for page in draw(st.sets(st.integers(0, 7), max_size=8)):
            plan[draw(st.integers(0, channels - 1))].append((page, iteration))
            last[page] = iteration
        for records in plan:
            records.append(None)
    return plan, last


@settings(max_examples=150, deadline=None)
@given(plan=_plans(), schedule=st.lists(st.integers(0, 3), min_size=200, max_size=200))
def test_no_page_of_iteration_n_lands_after_one_of_n_plus_1(plan, schedule) -> None:
    records, last = plan
    memory, regressed = _apply(records, schedule, keep_rule=True)
    assert not regressed
    if sum(map(len, records)) <= len(schedule):  # the schedule ran every record
        assert memory == last


def test_without_the_rule_a_page_goes_back_an_iteration() -> None:
    """The model can fail: page 5 of iteration 2 on channel 1, then iteration 1's copy on
    channel 0, once channel 1 no longer waits at its sync point."""
    plan: list[list[tuple[int, int] | None]] = [[(5, 1), None, None], [None, (5, 2), None]]
    schedule = [1, 1, 0, 0, 0, 0, 0, 0]  # channel 1 first, twice; then channel 0
    assert _apply(plan, schedule, keep_rule=False)[1]
    assert _apply(plan, schedule, keep_rule=True) == ({5: 2}, False)


def test_the_barrier_releases_a_waiting_channel_and_aborts_it() -> None:
    barrier = SyncBarrier(2)
    done = threading.Event()

    def channel() -> None:
        barrier.arrive(0, 1)
        done.set()

    thread = threading.Thread(target=channel)
    thread.start()
    barrier.arrive(1, 1)  # the second party: both pass
    thread.join(5)
    assert done.is_set()
    errors: list[BaseException] = []

    def waiting() -> None:
        try:
            barrier.arrive(0, 2)
        except StreamError as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiting)
    thread.start()
    barrier.abort(StreamError("multifd channel 1: gone"))
    thread.join(5)
    assert [str(e) for e in errors] == ["multifd channel 1: gone"]


# --- the handshake ------------------------------------------------------------------------------


def _hello(raw: bytes, channels: int = 2, checksum: bool = True) -> int:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(raw)
        ours.shutdown(socket.SHUT_WR)
        return read_hello(StreamReader(theirs, 2.0), channels, SESSION, checksum)


def test_a_channel_says_who_it_is() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        send_hello(StreamWriter(ours, checksum=True), 1, 2, SESSION)
        assert read_hello(StreamReader(theirs, 2.0), 2, SESSION, True) == 1
    assert _hello(streamgen.channel_stream(0, 2).bytes()) == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (streamgen.channel_stream(2, 2).bytes(), "says it is channel 2 of 2; the main stream "
         "announced 2"),
        (streamgen.channel_stream(0, 3).bytes(), "says it is channel 0 of 3"),
        (streamgen.Stream(head=streamgen.preamble(CHANNEL_MAGIC)).channel(0, 2, bytes(16))
         .bytes(), "a multifd channel of another migration connected"),
        (streamgen.Stream().header().bytes(), "a second migration stream connected where a "
         "multifd channel was expected"),
        (streamgen.channel_stream(0, 2, checksum=False).bytes(), "a multifd channel has "
         "record checksums off, the main stream not"),
        (streamgen.Stream(head=streamgen.preamble(CHANNEL_MAGIC)).record(8, b"cancelled")
         .bytes(), "the source abandoned the migration: cancelled"),
        (streamgen.Stream(head=streamgen.preamble(CHANNEL_MAGIC)).sync(1).bytes(),
         "MULTIFD_SYNC record of 8 bytes where a multifd channel's CHANNEL record"),
        (streamgen.channel_stream(0, 2).bytes()[:30], "stream ended early"),
    ],
)  # fmt: skip
def test_a_bad_channel_is_refused_with_one_line(raw: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message.replace("(", r"\(")) as info:
        _hello(raw)
    assert "\n" not in str(info.value)


def test_a_connection_that_sends_nothing_is_a_stray() -> None:
    with pytest.raises(NothingReceived):
        _hello(b"")


def _answer(reply: ReplyType, arg: int = 0, reason: str = "") -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        writer = StreamWriter(ours, checksum=False)
        if reason:
            writer.message(reply, reason)
        else:
            writer.reply(reply, arg)
        await_ready(StreamReader(theirs, 2.0, peer="destination"), 2)


def test_the_source_waits_for_channels_ready() -> None:
    _answer(ReplyType.CHANNELS_READY, 2)
    with pytest.raises(StreamError, match="refused the multifd channels: only 1 of 2"):
        _answer(ReplyType.ERROR, reason="only 1 of 2 multifd channels connected within 60 s")
    with pytest.raises(StreamError, match=r"answered CHANNELS_READY \(3\) to MULTIFD"):
        _answer(ReplyType.CHANNELS_READY, 3)
