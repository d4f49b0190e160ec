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

from pyvmm.migration.stream import RecordType, ReplyType

pytestmark = pytest.mark.kvm
SRC = ["memverify", "--mem", "64M", "--append", "mb=8"]
DST = ["--mem", "64M", "--incoming", "defer"]


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


def migrate_through(tmp_path: Path, mitm_rules, during=None) -> tuple[dict, dict, dict]:
    """Migrate src -> mitm -> dst; returns (src info, dst info, facts). mitm_rules is a
    dict of Mitm rules, or a function of (src, dst) that returns one."""
    with (
        vm_process(tmp_path, "dst", DST) as dst,
        vm_process(tmp_path, "src", SRC) as src,
    ):
        dst_sock = tmp_path / "dst.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}", **{"exit-on-error": False})
        rules = mitm_rules(src, dst) if callable(mitm_rules) else mitm_rules
        mitm = Mitm(tmp_path / "mitm.sock", str(dst_sock), **rules)
        try:
            src.wait_line("ok pages=", 20)
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
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
            }
        finally:
            mitm.close()
    assert not (facts["src_running"] and facts["dst_running"]), ("two running", facts)
    if not facts["src_running"] and not facts["dst_running"]:
        assert src_info.get("error-desc"), ("none running, source silent", src_info)
        assert dst_info.get("error-desc") or dst_info.get("exited"), ("dst silent", dst_info)
    return src_info, dst_info, facts


def at(kind: RecordType | ReplyType, action: str):
    return lambda seen: action if seen.kind is kind else FORWARD


def test_the_whole_handshake_runs_the_guest_on_one_side(tmp_path: Path) -> None:
    src, dst, facts = migrate_through(tmp_path, {})
    assert src["status"] == "completed" and dst["status"] == "completed"
    assert facts["dst_running"] and facts["src_state"] == "postmigrate"
    assert facts["records"][-3:] == [RecordType.STATE, RecordType.SWITCHOVER, RecordType.GO]
    assert facts["replies"] == [ReplyType.LOADED, ReplyType.STARTED]
    parts = src["x-downtime-parts"]
    assert {"stop", "ram", "state", "load", "commit", "start", "expected"} <= set(parts)
    steps = sum(parts[k] for k in ("stop", "ram", "state", "load", "commit", "start"))
    assert steps <= src["downtime"] + 1  # the parts are the downtime, measured in pieces


def test_cut_during_the_pages_resumes_nothing_and_keeps_the_source(tmp_path: Path) -> None:
    rule = {
        "on_record": lambda s: CUT if s.kind is RecordType.RAM_RUN and s.index > 20 else FORWARD
    }
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
    src, dst, facts = migrate_through(tmp_path, {"on_record": at(RecordType.STATE, CORRUPT)})
    assert src["status"] == "failed" and facts["src_running"]
    assert "bad machine state" in src["error-desc"], src["error-desc"]
    assert dst["status"] == "failed" and "bad machine state" in dst["error-desc"]


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
