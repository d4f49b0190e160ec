"""QEMU's own migration qtests, where they apply to pyvmm (tests/qtest/migration/
precopy-tests.c and migration-test.c; the QEMU case name is in each comment).

The destination is started as QEMU's tests start it: `--incoming defer`, then
migrate-incoming with exit-on-error false, so that it stays up to be asked how it ended.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from vmproc import FINAL, VmProc, free_tcp_port, vm_process

from pyvmm.monitor.client import QmpCommandError

pytestmark = pytest.mark.kvm
SRC = ["memverify", "--mem", "64M", "--append", "mb=8"]
DST = ["--mem", "64M", "--incoming", "defer"]


def status(vm: VmProc) -> str | None:
    return vm.cmd("query-migrate").get("status")


def wait_status(vm: VmProc, wanted: tuple[str, ...], timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = vm.cmd("query-migrate")
        if info.get("status") in wanted:
            return info
        time.sleep(0.05)
    raise TimeoutError(f"{vm.name}: status never reached {wanted}")


def listen(dst: VmProc, tmp_path: Path) -> str:
    uri = f"unix:{tmp_path}/mig.sock"
    dst.cmd("migrate-incoming", uri=uri, **{"exit-on-error": False})
    return uri


def converge(src: VmProc) -> None:
    """QEMU's migrate_ensure_converge: unlimited bandwidth, a generous downtime."""
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 30_000})


def non_converge(src: VmProc) -> None:
    """QEMU's migrate_ensure_non_converge: 3 MB/s, 1 ms of downtime."""
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 3_000_000, "downtime-limit": 1})


def test_cancel_src_after_none(tmp_path: Path) -> None:
    # /migration/cancel/src/after/none: a cancel with nothing to cancel changes nothing.
    with vm_process(tmp_path, "dst", DST) as dst, vm_process(tmp_path, "src", SRC) as src:
        dst.cmd("migrate_cancel")
        src.wait_line("ok pages=", 20)
        src.cmd("migrate_cancel")
        assert src.cmd("query-migrate") == {} and dst.cmd("query-migrate") == {}
        uri = listen(dst, tmp_path)
        converge(src)
        src.cmd("migrate", uri=uri)
        assert wait_status(src, FINAL)["status"] == "completed"
        assert wait_status(dst, FINAL)["status"] == "completed"


@pytest.mark.parametrize("phase", ["setup", "active"])
def test_cancel_src_pre_switchover(tmp_path: Path, phase: str) -> None:
    # /migration/cancel/src/after/{setup,active}: cancelled; the destination fails. Beyond
    # QEMU: a source cancelled in setup before it sent a byte leaves the destination
    # waiting (docs/migration-stream.md, "Connections that send nothing"), and a later
    # migration then completes.
    with vm_process(tmp_path, "dst", DST) as dst, vm_process(tmp_path, "src", SRC) as src:
        uri = listen(dst, tmp_path)
        src.wait_line("ok pages=", 20)
        non_converge(src)
        with src.qmp() as q:
            q.execute("migrate", {"uri": uri})
            if phase == "active":
                wait_status(src, ("active",))
            q.execute("migrate_cancel")
        assert wait_status(src, FINAL)["status"] == "cancelled"
        assert src.cmd("query-status")["status"] == "running"
        try:  # the cancel closed the connection: the destination knows at once
            assert wait_status(dst, FINAL, timeout_s=3)["status"] == "failed"
            return
        except TimeoutError:  # nothing had arrived (possible only in setup): still waiting
            assert phase == "setup" and status(dst) == "setup"
        converge(src)
        src.cmd("migrate", uri=uri)
        assert wait_status(src, FINAL)["status"] == "completed"
        assert wait_status(dst, FINAL)["status"] == "completed"


@pytest.mark.parametrize("phase", ["cancelling", "cancelled"])
def test_cancel_src_after_cancelled(tmp_path: Path, phase: str) -> None:
    # /migration/cancel/src/after/{cancelling,cancelled}: a second cancel changes nothing.
    with vm_process(tmp_path, "dst", DST) as dst, vm_process(tmp_path, "src", SRC) as src:
        uri = listen(dst, tmp_path)
        src.wait_line("ok pages=", 20)
        non_converge(src)
        with src.qmp() as q:
            q.execute("migrate", {"uri": uri})
            wait_status(src, ("active",))
            q.execute("migrate_cancel")
            if phase == "cancelled":
                wait_status(src, ("cancelled",))
            q.execute("migrate_cancel")
        assert wait_status(src, FINAL)["status"] == "cancelled"
        assert wait_status(dst, FINAL)["status"] == "failed"


def test_cancel_src_after_complete(tmp_path: Path) -> None:
    # /migration/cancel/src/after/completed: both stay completed, the guest runs there.
    with vm_process(tmp_path, "dst", DST) as dst, vm_process(tmp_path, "src", SRC) as src:
        uri = listen(dst, tmp_path)
        src.wait_line("ok pages=", 20)
        converge(src)
        src.cmd("migrate", uri=uri)
        assert wait_status(src, FINAL)["status"] == "completed"
        src.cmd("migrate_cancel")
        assert status(src) == "completed"
        assert wait_status(dst, FINAL)["status"] == "completed"
        assert dst.cmd("query-status")["status"] == "running"


def test_cancel_src_after_failed(tmp_path: Path) -> None:
    # /migration/cancel/src/after/failed: nobody listens, it fails; a cancel keeps it failed.
    with vm_process(tmp_path, "src", SRC) as src:
        src.wait_line("ok pages=", 20)
        src.cmd("migrate", uri=f"unix:{tmp_path}/nobody.sock")
        assert wait_status(src, FINAL)["status"] == "failed"
        src.cmd("migrate_cancel")
        assert status(src) == "failed"
        assert src.cmd("query-status")["status"] == "running"


def test_migrate_without_uri_is_an_error(tmp_path: Path) -> None:
    # migration-test's "no uri" check in migrate_qmp_fail: an error, and nothing starts.
    with vm_process(tmp_path, "src", SRC) as src:
        with pytest.raises(QmpCommandError, match="need either 'uri' or 'channels' argument"):
            src.cmd("migrate")
        assert src.cmd("query-migrate") == {}


def test_a_second_migrate_while_one_runs_is_refused(tmp_path: Path) -> None:
    with vm_process(tmp_path, "dst", DST) as dst, vm_process(tmp_path, "src", SRC) as src:
        uri = listen(dst, tmp_path)
        src.wait_line("ok pages=", 20)
        non_converge(src)
        src.cmd("migrate", uri=uri)
        with pytest.raises(QmpCommandError, match="There's a migration process in progress"):
            src.cmd("migrate", uri=uri)
        src.cmd("migrate_cancel")
        assert wait_status(src, FINAL)["status"] == "cancelled"


def test_parameters_changed_during_the_migration_let_it_converge(tmp_path: Path) -> None:
    # /migration/precopy/*: migrate_ensure_non_converge, then migrate_ensure_converge while
    # the migration runs (migrate_wait_for_dirty_mem in between).
    with vm_process(tmp_path, "dst", DST) as dst, vm_process(tmp_path, "src", SRC) as src:
        uri = listen(dst, tmp_path)
        src.wait_line("ok pages=", 20)
        non_converge(src)
        src.cmd("migrate", uri=uri)
        deadline = time.monotonic() + 20
        while src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 2:
            assert time.monotonic() < deadline, "no second sync at 3 MB/s"
            time.sleep(0.05)
        assert status(src) == "active"
        converge(src)
        assert wait_status(src, FINAL)["status"] == "completed"
        assert wait_status(dst, FINAL)["status"] == "completed"


def test_dirty_ring_migration_without_the_dirty_limit(tmp_path: Path) -> None:
    # /migration/dirty_ring: the dirty ring tracks a plain migration.
    with (
        vm_process(tmp_path, "dst", [*DST, "--dirty-ring"]) as dst,
        vm_process(tmp_path, "src", [*SRC, "--dirty-ring"]) as src,
    ):
        uri = listen(dst, tmp_path)
        src.wait_line("ok pages=", 20)
        converge(src)
        src.cmd("migrate", uri=uri)
        assert wait_status(src, FINAL)["status"] == "completed"
        assert wait_status(dst, FINAL)["status"] == "completed"
        count = len(dst.lines("ok pages="))
        dst.wait_line("ok pages=", 20, after=count + 1)  # it verifies on, on the destination
        assert not dst.lines("CORRUPT")


def test_incoming_on_tcp_port_0_reports_the_port_it_bound(tmp_path: Path) -> None:
    # /migration/precopy/tcp/plain: listen on port 0, read socket-address, migrate to it.
    with vm_process(tmp_path, "dst", DST) as dst, vm_process(tmp_path, "src", SRC) as src:
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
        info = dst.cmd("query-migrate")
        assert info["status"] == "setup"
        (address,) = info["socket-address"]
        assert address["type"] == "inet" and address["host"] == "127.0.0.1"
        port = int(address["port"])
        assert port > 0
        src.wait_line("ok pages=", 20)
        converge(src)
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        assert wait_status(src, FINAL)["status"] == "completed"


def test_migrate_incoming_only_once(tmp_path: Path) -> None:
    with vm_process(tmp_path, "dst", DST) as dst:
        listen(dst, tmp_path)
        with pytest.raises(QmpCommandError, match="already been started"):
            dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{free_tcp_port()}")


@pytest.mark.exclusive  # the trigger compares the guest's dirtying with the link's rate
@pytest.mark.slow
def test_auto_converge_custom_steps_never_pass_max_cpu_throttle(tmp_path: Path) -> None:
    # /migration/auto_converge: custom initial and increment; the throttle starts at the
    # initial value, steps by the increment, and never exceeds max-cpu-throttle.
    stress = ["memstress", "--mem", "64M", "--append", "mb=4"]
    with vm_process(tmp_path, "dst", DST) as dst, vm_process(tmp_path, "src", stress) as src:
        uri = listen(dst, tmp_path)
        src.wait_line("mib=", 20)
        src.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": "auto-converge", "state": True}],
        )
        src.cmd(
            "migrate-set-parameters",
            **{
                "cpu-throttle-initial": 20, "cpu-throttle-increment": 35,
                "max-cpu-throttle": 60, "max-bandwidth": 16_000_000, "downtime-limit": 1,
            },
        )  # fmt: skip
        src.cmd("migrate", uri=uri)
        seen: list[int] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and seen[-1:] != [60]:
            pct = src.cmd("query-migrate").get("cpu-throttle-percentage")
            if pct is not None and seen[-1:] != [pct]:
                seen.append(pct)
            time.sleep(0.05)
        src.cmd("migrate_cancel")
        assert seen[:1] == [20], seen
        assert max(seen) == 60 and set(seen) <= {20, 55, 60}, seen
        assert wait_status(src, FINAL)["status"] == "cancelled"
