"""QMP commands on a running pyvmm process, through the official qemu.qmp client."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import pyvmm_process, wait_for_path
from pyvmm.monitor.client import QmpCommandError, SyncQmp

pytestmark = pytest.mark.kvm


def test_status_stop_cont_cpus_quit_and_events(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    args = ["run", "memstress", "--vcpus", "2", "--mem", "128M", "--append", "mb=8"]
    with pyvmm_process([*args, "--qmp", f"unix:{sock}"]) as proc:
        wait_for_path(sock)
        with SyncQmp(f"unix:{sock}", timeout_s=10) as qmp:
            assert qmp.greeting["QMP"]["version"]["package"].startswith("pyvmm")
            assert qmp.cmd("query-status") == {
                "running": True,
                "singlestep": False,
                "status": "running",
            }
            names = {c["name"] for c in qmp.cmd("query-commands")}
            assert {"query-status", "stop", "cont", "query-cpus-fast", "quit"} <= names

            cpus = qmp.cmd("query-cpus-fast")
            assert [c["cpu-index"] for c in cpus] == [0, 1]
            assert all(c["thread-id"] > 0 and c["target"] == "x86_64" for c in cpus)
            assert len({c["thread-id"] for c in cpus}) == 2

            assert qmp.cmd("stop") == {}
            qmp.wait_event("STOP", 5)
            assert qmp.cmd("query-status")["status"] == "paused"
            assert qmp.cmd("cont") == {}
            qmp.wait_event("RESUME", 5)
            assert qmp.cmd("query-status")["status"] == "running"

            with pytest.raises(QmpCommandError) as info:
                qmp.cmd("query-status", bogus=1)
            assert info.value.error_class == "GenericError"
            assert "Parameter 'bogus' is unexpected" in info.value.desc
            assert qmp.cmd("query-status")["running"]  # the connection keeps working

            assert qmp.cmd("quit") == {}
            event = qmp.wait_event("SHUTDOWN", 5)
            assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert proc.wait(10) == 0


def test_time_limit_end_sends_a_host_shutdown_event(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    args = ["run", "memstress", "--append", "mb=4", "--time-limit", "2"]
    with pyvmm_process([*args, "--qmp", f"unix:{sock}"]) as proc:
        wait_for_path(sock)
        with SyncQmp(f"unix:{sock}", timeout_s=10) as qmp:
            event = qmp.wait_event("SHUTDOWN", 10)
            assert event["data"] == {"guest": False, "reason": "host-signal"}
        assert proc.wait(10) == 0
