"""The comparator's rules (pyvmm/colo/compare.py), deterministically: bytes in, actions
out, time given by the test. The real processes are in test_colo.py."""

from __future__ import annotations

from pyvmm.colo.compare import (
    COLO,
    PASSIVE,
    PRIMARY_ONLY,
    SECONDARY_ONLY,
    Comparator,
    LineParser,
    RequestCheckpoint,
    SendClient,
    SendVm,
)


def to_client(actions: list) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, SendClient)]


def to_vm(actions: list, vm: str) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendVm) and a.vm == vm)


def requests(actions: list) -> list[tuple[str, int]]:
    return [(a.reason, a.epoch) for a in actions if isinstance(a, RequestCheckpoint)]


def colo_started(comparator: Comparator | None = None) -> Comparator:
    """A comparator past checkpoint 0: COLO mode, the secondary fed."""
    c = comparator or Comparator(timeout_ms=1000)
    c.checkpoint(0, COLO, 0, 0, 0)
    c.release(0, 0)
    assert c.mode == COLO
    return c


def test_line_parser_positions() -> None:
    p = LineParser()
    assert p.feed(b"1 a\n2 b") == [(b"1 a", 4)]
    assert p.feed(b"b\n") == [(b"2 bb", 9)]
    assert p.position == 9 and p.partial == b""


def test_primary_only_before_colo_answers_go_out_at_once() -> None:
    c = Comparator()
    actions = c.client_line(7, b"41 inc")
    assert to_vm(actions, "primary") == b"1 inc\n" and to_vm(actions, "secondary") == b""
    assert to_client(c.primary_bytes(b"1 count=1\n", 0)) == [b"41 count=1\n"]
    assert c.mode == PRIMARY_ONLY


def test_colo_start_replays_every_request_to_the_secondary() -> None:
    c = Comparator()
    c.client_line(1, b"1 inc")
    c.client_line(1, b"2 inc")
    c.checkpoint(0, COLO, 0, 0, 0)
    actions = c.release(0, 0)
    assert to_vm(actions, "secondary") == b"1 inc\n2 inc\n"  # its COM2 skips what it has
    assert c.stats.replayed_bytes == 12
    assert to_vm(c.client_line(1, b"3 inc"), "secondary") == b"3 inc\n"


def test_matching_answers_go_out_in_order_each_once() -> None:
    c = colo_started()
    c.client_line(1, b"10 inc")
    c.client_line(2, b"20 inc")
    assert to_client(c.primary_bytes(b"1 count=1\n2 count=2\n", 0)) == []  # no twins yet
    assert to_client(c.secondary_bytes(b"2 count=2\n", 0)) == []  # 1 comes first
    out = to_client(c.secondary_bytes(b"1 count=1\n", 0))
    assert out == [b"10 count=1\n", b"20 count=2\n"]
    assert c.stats.matched == 2 and c.held() == 0


def test_a_miscompare_holds_the_answer_and_asks_once_per_epoch() -> None:
    c = colo_started()
    for seq in (1, 2):
        c.client_line(1, b"%d time" % seq)
    c.primary_bytes(b"1 tsc=100\n2 tsc=101\n", 0)
    first = c.secondary_bytes(b"1 tsc=200\n", 0)
    assert requests(first) == [("miscompare", 0)] and to_client(first) == []
    assert requests(c.secondary_bytes(b"2 tsc=201\n", 0)) == []  # one per epoch
    # the checkpoint commits the primary's answers: they go out, the secondary's never
    c.checkpoint(1, COLO, 20, 20, 14)
    out = to_client(c.release(1, 20))
    assert out == [b"1 tsc=100\n", b"2 tsc=101\n"]
    assert c.epoch == 1 and c.stats.miscompares == 2


def test_an_answer_without_its_twin_times_out_into_a_checkpoint_request() -> None:
    c = colo_started()
    c.client_line(1, b"1 inc")
    c.primary_bytes(b"1 count=1\n", now_ms=100)
    assert requests(c.tick(1000)) == []
    assert requests(c.tick(1101)) == [("timeout", 0)]
    assert requests(c.tick(2000)) == []  # asked already in this epoch


def test_the_secondarys_past_is_dropped_and_its_line_continues_the_primarys() -> None:
    c = colo_started()
    c.client_line(1, b"1 inc")
    c.client_line(1, b"2 inc")
    # the primary stops after "1 count=1\n2 cou": 15 bytes sent, 5 more queued
    c.primary_bytes(b"1 count=1\n2 cou", 0)
    assert to_client(c.secondary_bytes(b"1 count=1\n", 0)) == [b"1 count=1\n"]  # a match
    c.checkpoint(1, COLO, 20, 15, 12)
    assert c.secondary_bytes(b"2 count=99\n", 0) == []  # past output, kept unread
    assert to_client(c.release(1, 21)) == []  # the secondary had sent 21 bytes at its stop
    # both now send the queued rest, "nt=2\n": the primary's is committed (it ends by 20)
    assert to_client(c.primary_bytes(b"nt=2\n", 0)) == [b"2 count=2\n"]
    assert to_client(c.secondary_bytes(b"nt=2\n", 0)) == []  # same gid: delivered already
    assert c.stats.dropped_secondary == 1


def test_passive_mode_holds_everything_until_its_checkpoint_and_feeds_no_secondary() -> None:
    c = colo_started()
    c.checkpoint(1, PASSIVE, 0, 0, 0)
    c.release(1, 0)
    assert c.mode == PASSIVE
    actions = c.client_line(1, b"5 time")
    assert to_vm(actions, "primary") == b"1 time\n" and to_vm(actions, "secondary") == b""
    assert to_client(c.primary_bytes(b"1 tsc=7\n", 0)) == []
    assert requests(c.tick(10_000)) == []  # nothing is compared while passive
    c.checkpoint(2, PASSIVE, 8, 8, 7)
    assert to_client(c.release(2, 0)) == [b"5 tsc=7\n"]  # Remus's output commit
    # back to COLO: the secondary gets the requests it missed, replayed
    c.checkpoint(3, COLO, 8, 8, 7)
    assert to_vm(c.release(3, 0), "secondary") == b"1 time\n"
    assert c.stats.replayed_bytes == 7


def test_primary_failover_releases_what_it_holds() -> None:
    c = colo_started()
    c.client_line(1, b"1 time")
    c.primary_bytes(b"1 tsc=1\n", 0)
    c.secondary_lost()
    assert to_client(c.primary_exit()) == [b"1 tsc=1\n"]
    assert c.mode == PRIMARY_ONLY
    assert to_vm(c.client_line(1, b"2 inc"), "secondary") == b""


def test_secondary_failover_in_colo_mode_its_own_answers_go_on() -> None:
    c = colo_started()
    for seq in (1, 2, 3):
        c.client_line(1, b"%d inc" % seq)
    c.primary_bytes(b"1 count=1\n2 count=2\n", 0)
    out = to_client(c.secondary_bytes(b"1 count=1\n", 0))
    assert out == [b"1 count=1\n"]
    c.primary_lost()
    # a match may still go out (both states gave it); the rest waits for the takeover
    out = to_client(c.secondary_bytes(b"2 count=2\n3 count=3\n", 0))
    assert out == [b"2 count=2\n"]
    out = to_client(c.secondary_promoted(0, 0))
    assert out == [b"3 count=3\n"] and c.mode == SECONDARY_ONLY
    assert to_vm(c.client_line(1, b"4 inc"), "primary") == b""


def test_secondary_failover_with_the_checkpoint_applied_releases_what_it_commits() -> None:
    c = colo_started()
    c.client_line(1, b"1 time")
    c.primary_bytes(b"1 tsc=5\n", 0)
    c.secondary_bytes(b"1 tsc=9\n", 0)  # a miscompare
    c.checkpoint(1, COLO, 8, 8, 7)
    c.primary_lost()  # dies after the secondary has the checkpoint, before the release
    assert to_client(c.secondary_promoted(1, 8)) == [b"1 tsc=5\n"]


def test_secondary_failover_without_the_checkpoint_drops_the_primarys_answers() -> None:
    c = colo_started()
    c.client_line(1, b"1 time")
    c.primary_bytes(b"1 tsc=5\n", 0)
    c.secondary_bytes(b"1 tsc=9\n", 0)
    c.checkpoint(1, COLO, 8, 8, 7)
    c.primary_lost()  # the checkpoint never reached the secondary: it stays on its own
    assert to_client(c.secondary_promoted(0, 0)) == [b"1 tsc=9\n"]


def test_secondary_failover_after_passive_mode_replays_the_requests() -> None:
    c = colo_started()
    c.checkpoint(1, PASSIVE, 0, 0, 0)
    c.release(1, 0)
    c.client_line(1, b"1 inc")
    c.primary_bytes(b"1 count=1\n", 0)  # held: passive
    c.primary_lost()
    actions = c.secondary_promoted(1, 0)
    assert to_client(actions) == []  # the survivor (at checkpoint 1) answers it itself
    assert to_vm(actions, "secondary") == b"1 inc\n"
    assert to_client(c.secondary_bytes(b"1 count=1\n", 0)) == [b"1 count=1\n"]


def test_a_request_without_a_seq_is_refused() -> None:
    c = Comparator()
    assert to_client(c.client_line(3, b"inc")) == [b"error: a request is '<seq> <op> [args]'\n"]
    assert c.stats.requests == 0
