"""The switchover handshake under failure, between real processes over real sockets.

A man in the middle (tests/mitm.py) relays a real migration and breaks it at each step
of the handshake. Whatever happens, at most one guest runs; and when none runs, both
sides say why (query-migrate's error-desc, or the process's exit status)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mitm import CORRUPT, CUT, FORWARD, Mitm, Seen
from vmproc import FINAL, VmProc, vm_process

from pyvmm.migration.params import CAPABILITY_DEFAULTS
from pyvmm.migration.stream import RecordType, ReplyType

pytestmark = pytest.mark.kvm
SRC = ["memverify", "--mem", "64M", "--append", "mb=8"]
DST = ["--mem", "64M", "--incoming", "defer"]
CHECKSUMS = {"x-record-checksum": True}


def final(vm: VmProc, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    with vm.qmp() as q:
        while time.monotonic() < deadline:
            info = q.execute("query-migrate")
            if info.get("status") in FINAL:
                return info
            time.sleep(0.05)
    raise TimeoutError(f"{vm.name}: migration did not end")


def running(vm: VmProc) -> bool:
    if vm.proc.poll() is not None:
        return False
    return bool(vm.cmd("query-status")["running"])


def migrate_through(
    tmp_path: Path, mitm_rules, during=None, caps: dict | None = None, paused: bool = False,
    dst_args: tuple[str, ...] = (), params: dict | None = None,
) -> tuple[dict, dict, dict]:  # fmt: skip
    """Migrate src -> mitm -> dst; returns (src info, dst info, facts). mitm_rules is a
    dict of Mitm rules, or a function of (src, dst) that returns one; caps are set on the
    source; paused: the source's guest is stopped before the migration."""
    with (
        vm_process(tmp_path, "dst", [*DST, *dst_args]) as dst,
        vm_process(tmp_path, "src", SRC) as src,
    ):
        dst_sock = tmp_path / "dst.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}", **{"exit-on-error": False})
        rules = mitm_rules(src, dst) if callable(mitm_rules) else mitm_rules
        mitm = Mitm(tmp_path / "mitm.sock", str(dst_sock), **rules)
        try:
            src.wait_line("ok pages=", 20)
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, **(params or {})})
            if caps:
                wanted = [{"capability": name, "state": on} for name, on in caps.items()]
                src.cmd("migrate-set-capabilities", capabilities=wanted)
            if paused:
                src.cmd("stop")
            src.cmd("migrate", uri=mitm.uri)
            if during is not None:
                during(src, mitm)
            src_info = final(src)
            dst_info = final(dst) if dst.proc.poll() is None else {"exited": dst.proc.returncode}
            facts = {
                "src_running": running(src),
                "dst_running": running(dst),
                "src_state": src.cmd("query-status")["status"],
                "records": [s.kind for s in mitm.records],
                "replies": [s.kind for s in mitm.replies],
                "flags": mitm.flags,
                "checksums": [s.checksum for s in mitm.records + mitm.replies],
            }
            if paused and dst.proc.poll() is None and facts["src_state"] == "postmigrate":
                facts["hashes"] = [vm.cmd("x-pyvmm-query-memory-hash")["sha256"]
                                   for vm in (src, dst)]  # fmt: skip
        finally:
            mitm.close()
    assert not (facts["src_running"] and facts["dst_running"]), ("two running", facts)
    if not facts["src_running"] and not facts["dst_running"] and not paused:
        assert src_info.get("error-desc"), ("none running, source silent", src_info)
        assert dst_info.get("error-desc") or dst_info.get("exited"), ("dst silent", dst_info)
    return src_info, dst_info, facts


def at(kind: RecordType | ReplyType, action: str):
    return lambda seen: action if seen.kind is kind else FORWARD


def nth(kind: RecordType, n: int, action: str):
    """The action for the n-th record of this kind (from 0), FORWARD for the others."""
    count = [0]

    def rule(seen: Seen) -> str:
        if seen.kind is not kind:
            return FORWARD
        count[0] += 1
        return action if count[0] == n + 1 else FORWARD

    return rule


@pytest.mark.parametrize("checksums", [None, True, False], ids=["default", "on", "off"])
def test_the_whole_handshake_runs_the_guest_on_one_side(
    tmp_path: Path, checksums: bool | None
) -> None:
    # With checksums, memverify writes pages while they are sent: such pages fail their
    # hash at the destination and are sent again, and the migration still completes.
    caps = None if checksums is None else {"x-record-checksum": checksums}
    src, dst, facts = migrate_through(tmp_path, {}, caps=caps)
    assert src["status"] == "completed" and dst["status"] == "completed"
    assert facts["dst_running"] and facts["src_state"] == "postmigrate"
    assert facts["records"][-3:] == [RecordType.STATE, RecordType.SWITCHOVER, RecordType.GO]
    assert facts["replies"] == [ReplyType.LOADED, ReplyType.STARTED]
    # The preamble follows the capability (or its default); records carry checksums iff so.
    on = CAPABILITY_DEFAULTS.get("x-record-checksum", False) if checksums is None else checksums
    assert facts["flags"] == int(on)
    assert all(facts["checksums"]) if on else not any(facts["checksums"])
    parts = src["x-downtime-parts"]
    assert {"stop", "ram", "state", "load", "commit", "start", "expected"} <= set(parts)
    steps = sum(parts[k] for k in ("stop", "ram", "state", "load", "commit", "start"))
    assert steps <= src["downtime"] + 1  # the parts are the downtime, measured in pieces


def test_cut_during_the_pages_resumes_nothing_and_keeps_the_source(tmp_path: Path) -> None:
    rule = {"on_record": lambda s: CUT if s.kind is RecordType.RAM_RUN and s.index > 2 else FORWARD}
    src, dst, facts = migrate_through(tmp_path, rule)
    assert src["status"] == "failed" and facts["src_running"]
    assert dst["status"] == "failed" and not facts["dst_running"]


def test_cut_before_loaded_reaches_the_source_resumes_it(tmp_path: Path) -> None:
    src, dst, facts = migrate_through(tmp_path, {"on_reply": at(ReplyType.LOADED, CUT)})
    assert src["status"] == "failed" and facts["src_running"]
    assert dst["status"] == "failed" and "GO" in dst["error-desc"]


def test_a_state_the_destination_refuses_resumes_the_source_with_its_reason(
    tmp_path: Path,
) -> None:
    # Without record checksums the corrupted STATE reaches the state's own parser.
    src, dst, facts = migrate_through(
        tmp_path, {"on_record": at(RecordType.STATE, CORRUPT)}, caps={"x-record-checksum": False}
    )
    assert src["status"] == "failed" and facts["src_running"]
    assert "bad machine state" in src["error-desc"], src["error-desc"]
    assert dst["status"] == "failed" and "bad machine state" in dst["error-desc"]
    assert facts["flags"] == 0 and not any(facts["checksums"])


def test_a_corrupted_state_fails_its_checksum_and_the_source_keeps_running(
    tmp_path: Path,
) -> None:
    src, dst, facts = migrate_through(
        tmp_path, {"on_record": at(RecordType.STATE, CORRUPT)}, caps=CHECKSUMS
    )
    assert src["status"] == "failed" and facts["src_running"]
    assert "checksum mismatch in STATE record" in src["error-desc"], src["error-desc"]
    assert dst["status"] == "failed" and not facts["dst_running"]
    assert facts["flags"] == 1 and all(facts["checksums"])


def test_a_corrupted_page_in_the_downtime_fails_at_once(tmp_path: Path) -> None:
    # RAM_RUNs sent after the guest stopped (arg bit 0 clear) must match their page hashes.
    def rule(seen: Seen) -> str:
        final = seen.kind is RecordType.RAM_RUN and not seen.arg & 1
        return CORRUPT if final else FORWARD

    # A switchover bandwidth this high makes the first check converge: all of RAM is still
    # to send, and all of it goes in the downtime.
    everything_in_the_downtime = {"avail-switchover-bandwidth": 1 << 40, "downtime-limit": 60000}
    src, dst, facts = migrate_through(
        tmp_path, {"on_record": rule}, params=everything_in_the_downtime, caps=CHECKSUMS
    )
    assert src["status"] == "failed" and facts["src_running"]
    assert "page checksum mismatch in RAM_RUN record" in src["error-desc"], src["error-desc"]
    assert "corrupted in transit" in dst["error-desc"] and not facts["dst_running"]
    # The STATE record may already be on the wire (the source does not wait between
    # records); the destination failed at the page, before loading it.
    assert "STATE" not in dst["error-desc"], dst["error-desc"]


def test_a_corrupted_page_never_sent_again_fails_at_the_state(tmp_path: Path) -> None:
    # The guest is paused, so no page is dirtied again: the pre-copy page whose hash failed
    # (tolerated while it might still be sent again) is still wrong when the STATE comes.
    rule = {"on_record": nth(RecordType.RAM_RUN, 1, CORRUPT)}
    src, dst, facts = migrate_through(tmp_path, rule, paused=True, caps=CHECKSUMS)
    assert src["status"] == "failed" and facts["src_state"] == "paused"
    assert "were never sent again: corrupted in transit" in dst["error-desc"], dst["error-desc"]
    assert not facts["dst_running"]


def test_without_checksums_a_corrupted_page_goes_unnoticed(tmp_path: Path) -> None:
    # What x-record-checksum=false gives up: the same corruption completes the migration,
    # and the destination's RAM differs from the source's.
    rule = {"on_record": nth(RecordType.RAM_RUN, 1, CORRUPT)}
    src, dst, facts = migrate_through(
        tmp_path, rule, caps={"x-record-checksum": False}, paused=True, dst_args=("-S",)
    )
    assert src["status"] == "completed" and dst["status"] == "completed"
    assert facts["flags"] == 0 and not any(facts["checksums"])
    assert facts["hashes"][0] != facts["hashes"][1]


def test_cut_after_the_commit_leaves_the_source_paused_and_says_so(tmp_path: Path) -> None:
    src, dst, facts = migrate_through(tmp_path, {"on_record": at(RecordType.GO, CUT)})
    assert src["status"] == "failed" and not facts["src_running"]
    assert facts["src_state"] == "postmigrate"
    assert "committed" in src["error-desc"]
    assert dst["status"] == "failed" and not facts["dst_running"]  # no GO: never ran


def test_a_lost_started_reply_leaves_one_guest_running_there(tmp_path: Path) -> None:
    src, dst, facts = migrate_through(tmp_path, {"on_reply": at(ReplyType.STARTED, CUT)})
    assert dst["status"] == "completed" and facts["dst_running"]
    assert src["status"] == "failed" and not facts["src_running"]
    assert "committed" in src["error-desc"]


def test_a_cancel_before_the_commit_wins_and_resumes_the_source(tmp_path: Path) -> None:
    hold = threading.Event()

    def rule(seen: Seen) -> str | threading.Event:
        return hold if seen.kind is ReplyType.LOADED else FORWARD

    def cancel_while_loaded_is_held(src: VmProc, mitm: Mitm) -> None:
        deadline = time.monotonic() + 20
        while ReplyType.LOADED not in [s.kind for s in mitm.replies]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        src.cmd("migrate_cancel")
        hold.set()

    src, dst, facts = migrate_through(
        tmp_path, {"on_reply": rule}, during=cancel_while_loaded_is_held
    )
    assert src["status"] == "cancelled" and facts["src_running"]
    assert RecordType.GO not in facts["records"]
    assert dst["status"] == "failed" and not facts["dst_running"]


def test_a_destination_killed_after_loading_leaves_none_running_and_says_so(
    tmp_path: Path,
) -> None:
    def rules(src: VmProc, dst: VmProc) -> dict:
        def kill_then_forward(seen: Seen) -> str:
            if seen.kind is ReplyType.LOADED:
                dst.proc.kill()
                dst.proc.wait(10)
            return FORWARD

        return {"on_reply": kill_then_forward}

    src, dst, facts = migrate_through(tmp_path, rules)
    assert dst == {"exited": -9}
    assert src["status"] == "failed" and not facts["src_running"]
    assert "committed" in src["error-desc"] and facts["src_state"] == "postmigrate"
