"""Live migration between real pyvmm processes: integrity, transports, failures, controls."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from vmproc import VmProc, free_tcp_port, progress_by_vcpu, vm_process, wait_migration

from helpers import run_pyvmm
from pyvmm.monitor.client import QmpCommandError, SyncQmp

pytestmark = pytest.mark.kvm
VERIFY = ["memverify", "--mem", "256M", "--vcpus", "2", "--append", "mb=32"]
DEST = ["--mem", "256M", "--vcpus", "2"]


def migrate(src, uri: str, checksums: bool = False, **params: int) -> dict:
    with src.qmp() as q:
        caps = [{"capability": "events", "state": True}]
        if checksums:
            caps.append({"capability": "x-record-checksum", "state": True})
        q.execute("migrate-set-capabilities", {"capabilities": caps})
        if params:
            q.execute("migrate-set-parameters", params)
        q.execute("migrate", {"uri": uri})
    return wait_migration(src)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("transport", "checksums"),
    [("tcp", False), ("unix", False), ("unix", True)],
    ids=["tcp", "unix", "unix-checksums"],
)
def test_memverify_survives_live_migration(tmp_path: Path, transport: str, checksums: bool) -> None:
    # With record checksums, pages memverify writes while they are sent fail their hash at
    # the destination and are sent again: RAM must still be identical at switchover.
    uri = f"tcp:127.0.0.1:{free_tcp_port()}" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", [*DEST, "--incoming", uri, "-S"]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        src.wait_line("ok pages=", 20, after=1)  # both vCPUs verifying
        with src.qmp() as events:
            info = migrate(src, uri, checksums, **{"max-bandwidth": 0})
            seen = [e["data"]["status"] for e in events.events() if e["event"] == "MIGRATION"]
        assert info["status"] == "completed", info
        assert seen[0] == "setup" and seen[-1] == "completed" and "active" in seen
        assert info["downtime"] < 300 + 100 and info["ram"]["dirty-sync-count"] >= 2
        assert src.cmd("query-status")["status"] == "postmigrate"
        # Guest memory is identical on both sides at switchover (the destination is held
        # paused by -S; the source stays paused in postmigrate).
        src_hash = src.cmd("x-pyvmm-query-memory-hash")["sha256"]
        assert dst.cmd("query-status")["status"] == "paused"
        assert dst.cmd("x-pyvmm-query-memory-hash")["sha256"] == src_hash
        before = {v: pts[-1][1] for v, pts in progress_by_vcpu(src).items()}
        dst.cmd("cont")
        t0 = time.time()
        time.sleep(5.5)
        after = progress_by_vcpu(dst)
        for vcpu in (0, 1):
            recent = [n for t, n in after.get(vcpu, []) if t >= t0]
            assert len(recent) >= 5, f"vCPU {vcpu} printed {len(recent)} ok lines in 5 s"
            assert recent[-1] > before[vcpu], "verification did not continue from the source"
        assert not dst.lines("CORRUPT") and dst.proc.poll() is None


@pytest.mark.slow
def test_ten_migrations_back_and_forth(tmp_path: Path) -> None:
    args = ["--mem", "128M", "--vcpus", "2"]
    sources = []
    with vm_process(tmp_path, "vm0", ["memverify", *args, "--append", "mb=16"]) as first:
        first.wait_line("ok pages=", 20)
        current, stack = first, []
        try:
            for hop in range(1, 11):
                uri = f"unix:{tmp_path}/hop{hop % 2}.sock"
                ctx = vm_process(tmp_path, f"vm{hop}", [*args, "--incoming", uri])
                nxt = ctx.__enter__()
                stack.append(ctx)
                info = migrate(current, uri, **{"max-bandwidth": 0})
                assert info["status"] == "completed", (hop, info)
                nxt.wait_line("ok pages=", 20, after=len(nxt.lines("ok pages=")))
                sources.append(current)
                current = nxt
            time.sleep(1.5)
            assert current.lines("ok pages=") and not current.lines("CORRUPT")
            for vm in (*sources, current):
                assert not vm.lines("CORRUPT"), vm.name
        finally:
            for ctx in reversed(stack):
                ctx.__exit__(None, None, None)


def test_foreign_image_migrates_through_the_standard_start(tmp_path: Path) -> None:
    """hello-std: in-kernel irqchip and PIT, boot vCPU only. Migrated before it ever ran,
    it runs to its exit on the destination."""
    uri = f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", ["--mem", "64M", "--vcpus", "2", "--incoming", uri]) as dst,
        vm_process(tmp_path, "src", ["hello-std", "--mem", "64M", "--vcpus", "2", "-S"]) as src,
    ):
        assert migrate(src, uri)["status"] == "completed"
        assert dst.cmd("query-status")["status"] == "paused"  # the source was paused
        dst.cmd("cont")
        assert dst.proc.wait(10) == 0
        assert dst.lines("hello from pyvmm guest")


@pytest.mark.slow
def test_destination_killed_mid_migration_leaves_source_running(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with vm_process(tmp_path, "src", VERIFY) as src:
        src.wait_line("ok pages=", 20)
        with vm_process(tmp_path, "dst", [*DEST, "--incoming", uri]) as dst:
            with src.qmp() as q:
                q.execute("migrate-set-parameters", {"max-bandwidth": 8 << 20})
                q.execute("migrate", {"uri": uri})
                deadline = time.monotonic() + 10
                while q.execute("query-migrate").get("ram", {}).get("transferred", 0) < 4 << 20:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            dst.proc.kill()
        info = wait_migration(src)
        assert info["status"] == "failed" and info["error-desc"]
        assert src.cmd("query-status")["status"] == "running"
        count = len(src.lines("ok pages="))
        src.wait_line("ok pages=", 10, after=count + 1)  # the guest still runs
        # A second migration to a fresh destination succeeds.
        with vm_process(tmp_path, "dst2", [*DEST, "--incoming", uri]) as dst2:
            assert migrate(src, uri, **{"max-bandwidth": 0})["status"] == "completed"
            dst2.wait_line("ok pages=", 20)
            assert not dst2.lines("CORRUPT")


def _fake_destination(path: Path, behaviour: str) -> threading.Thread:
    """A real socket that misbehaves at a chosen point (failure injection)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            if behaviour == "close-at-once":
                return
            total = 0
            conn.settimeout(1.0)
            try:
                while chunk := conn.recv(1 << 20):  # swallow the stream...
                    total += len(chunk)
                    if behaviour == "close-mid-stream" and total > 2 << 20:
                        return
            except TimeoutError:
                pass  # ...until the source waits for the ACK: die without confirming

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("behaviour", ["close-at-once", "close-mid-stream", "no-ack"])
def test_connection_drop_at_any_point_resumes_the_source(tmp_path: Path, behaviour: str) -> None:
    sock = tmp_path / "fake.sock"
    with vm_process(tmp_path, "src", VERIFY) as src:
        src.wait_line("ok pages=", 20)
        thread = _fake_destination(sock, behaviour)
        with src.qmp() as q:
            q.execute("migrate-set-parameters", {"max-bandwidth": 0})
            if behaviour == "no-ack":  # reach switchover, then lose the destination
                q.execute("migrate-set-parameters", {"downtime-limit": 2000})
            q.execute("migrate", {"uri": f"unix:{sock}"})
        info = wait_migration(src)
        thread.join(10)
        assert info["status"] == "failed", info
        assert info["error-desc"]
        assert src.cmd("query-status")["status"] == "running"
        count = len(src.lines("ok pages="))
        src.wait_line("ok pages=", 10, after=count + 1)


def test_nobody_listening_fails_cleanly(tmp_path: Path) -> None:
    with vm_process(tmp_path, "src", ["memstress", "--append", "mb=8"]) as src:
        proc = run_pyvmm(["migrate", src.qmp_addr, f"unix:{tmp_path}/nobody.sock", "--wait",
                          "--json"])  # fmt: skip
        assert proc.returncode == 1
        final = json.loads(proc.stdout)  # exactly one JSON object, also on failure
        assert final["status"] == "failed" and "cannot connect" in final["error-desc"]
        assert src.cmd("query-status")["status"] == "running"


def test_cancel_mid_iteration(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", [*DEST, "--incoming", uri]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        src.wait_line("ok pages=", 20)
        with src.qmp() as q:
            q.execute("migrate-set-parameters", {"max-bandwidth": 16 << 20})
            q.execute("migrate", {"uri": uri})
            time.sleep(1.0)
            assert q.execute("query-migrate")["status"] == "active"
            q.execute("migrate_cancel")
        info = wait_migration(src)
        assert info["status"] == "cancelled"
        assert src.cmd("query-status")["status"] == "running"
        assert dst.proc.wait(10) != 0  # the destination saw the stream end early


def test_cli_migrate_wait_json(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", [*DEST, "--incoming", uri]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        src.wait_line("ok pages=", 20)
        sets = ["--set", "max-bandwidth=1073741824", "--set", "downtime-limit=500"]
        proc = run_pyvmm(["migrate", src.qmp_addr, uri, *sets, "--cap", "events=on", "--wait",
                          "--json"])  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        final = json.loads(proc.stdout)
        assert final["status"] == "completed" and final["ram"]["normal-bytes"] > 32 << 20
        params = src.cmd("query-migrate-parameters")
        assert params["downtime-limit"] == 500 and params["max-bandwidth"] == 1 << 30
        dst.wait_line("ok pages=", 20)


def test_memory_and_vcpu_mismatch_are_refused(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with vm_process(tmp_path, "src", VERIFY) as src:
        src.wait_line("ok pages=", 20)
        for bad, needle in (
            (["--mem", "128M", "--vcpus", "2"], "the source VM has 256M of RAM, this one 128M"),
            (["--mem", "256M", "--vcpus", "1"], "the source VM has 2 vCPUs, this one 1"),
        ):
            with vm_process(tmp_path, "dst", [*bad, "--incoming", uri]) as dst:
                info = migrate(src, uri)
                assert info["status"] == "failed"
                assert dst.proc.wait(10) == 1
                assert needle in dst.proc.stderr.read()
            assert src.cmd("query-status")["status"] == "running"


def test_parameters_and_capabilities_follow_qemu(tmp_path: Path) -> None:
    with vm_process(tmp_path, "src", ["memstress", "--append", "mb=8"]) as src, src.qmp() as q:
        params = q.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 300 and params["max-bandwidth"] == 128 << 20
        assert params["avail-switchover-bandwidth"] == 0
        for args, needle in (
            ({"downtime-limit": 2_000_001}, "Parameter 'downtime_limit' expects"),
            ({"max-bandwidth": -1}, "Parameter 'max_bandwidth' expects"),
            ({"downtime-limit": "x"}, "Invalid parameter type for 'downtime-limit'"),
            ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
        ):
            with pytest.raises(QmpCommandError, match=needle):
                q.execute("migrate-set-parameters", args)
        assert q.execute("query-migrate-parameters") == params  # nothing half-applied
        with pytest.raises(QmpCommandError, match="does not accept value 'nope'"):
            q.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "nope", "state": True}]})  # fmt: skip
        with pytest.raises(QmpCommandError, match="invalid migration URI"):
            q.execute("migrate", {"uri": "ftp://x"})
        assert q.execute("query-migrate") == {}


@pytest.mark.slow
def test_migration_over_a_100_mbit_link_respects_it(tmp_path: Path, require_netns: None) -> None:
    from pyvmm.bench import netns

    with netns.veth_pair(rate_mbit=100) as link:
        uri = f"tcp:{link.addr_b}:{free_tcp_port()}"
        guest = ["memverify", "--mem", "128M", "--append", "mb=24"]
        with (
            vm_process(tmp_path, "dst", ["--mem", "128M", "--incoming", uri],
                       prefix=link.prefix("b")) as dst,
            vm_process(tmp_path, "src", guest, prefix=link.prefix("a")) as src,
        ):  # fmt: skip
            # Once verifying, the 24 MiB region is filled; pause so that exactly that
            # (plus the image) has to cross the link.
            while not [n for n in progress_by_vcpu(src).get(0, []) if n[1] > 0]:
                time.sleep(0.05)
            src.cmd("stop")
            info = migrate(src, uri, **{"max-bandwidth": 0})
            assert info["status"] == "completed", info
            assert info["ram"]["normal-bytes"] > 24 << 20
            mbps = info["ram"]["mbps"]
            assert 60 < mbps <= 105, f"{mbps} Mbit/s over a 100 Mbit/s link: {info}"
            dst.cmd("cont")
            count = len(dst.lines("ok pages="))
            dst.wait_line("ok pages=", 20, after=count + 1)
            assert not dst.lines("CORRUPT")
    assert not any("pyvmm-" in ns for ns in netns_list())


def netns_list() -> list[str]:
    import subprocess

    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return out.stdout.split()


def test_incoming_defer_then_migrate_incoming(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/late.sock"
    with (
        vm_process(tmp_path, "dst", [*DEST, "--incoming", "defer"]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        assert dst.cmd("query-status")["status"] == "inmigrate"
        with pytest.raises(QmpCommandError, match="invalid migration URI"):
            dst.cmd("migrate-incoming", uri="nowhere")
        dst.cmd("migrate-incoming", uri=uri)  # listening when the command returns
        with pytest.raises(QmpCommandError, match="already been started"):
            dst.cmd("migrate-incoming", uri=uri)
        src.wait_line("ok pages=", 20)
        assert migrate(src, uri, **{"max-bandwidth": 0})["status"] == "completed"
        dst.wait_line("ok pages=", 20)
        assert dst.cmd("query-status")["status"] == "running"
        assert dst.cmd("query-migrate")["status"] == "completed"


# memverify at a set pace: 2 vCPUs x 12 MiB/s, each sweeping its 48 MiB in 4 s, so no page is
# written twice within a 2 s measurement and the pages it writes are the pages it dirties.
PACED = ["memverify", "--mem", "256M", "--vcpus", "2", "--append", "mb=48 rate=12"]


def guest_rate_mib_s(vm: VmProc, t1: float, t2: float) -> float:
    """The guest's own dirty rate between host times t1 and t2, from its `ok pages=` lines
    (memverify rewrites every page it verifies)."""
    total = 0.0
    for points in progress_by_vcpu(vm).values():
        inside = [(t, n) for t, n in points if t1 <= t <= t2]
        assert len(inside) >= 2, (t1, t2, points[-5:])
        (ta, na), (tb, nb) = inside[0], inside[-1]
        total += (nb - na) / (tb - ta)
    return total * 4096 / (1 << 20)


def wait_verifying(vm: VmProc, timeout_s: float = 30) -> None:
    """Every vCPU is past its first pass (which only writes) and has verified for 2 s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = progress_by_vcpu(vm)
        if len(progress) == 2 and all(
            len([n for _, n in points if n > 0]) >= 3 for points in progress.values()
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"memverify did not reach its second pass: {progress_by_vcpu(vm)}")


def measure_rate(q: SyncQmp, mode: str, calc_time_ms: int) -> int:
    args = {"calc-time": calc_time_ms, "calc-time-unit": "millisecond", "mode": mode}
    q.execute("calc-dirty-rate", args)
    deadline = time.monotonic() + calc_time_ms / 1000 + 10
    while (info := q.execute("query-dirty-rate"))["status"] != "measured":
        assert time.monotonic() < deadline, info
        time.sleep(0.02)
    return info["dirty-rate"]


@pytest.mark.exclusive  # measures rates or times: runs alone
@pytest.mark.slow
@pytest.mark.parametrize("tracking", ["bitmap", "ring"])
def test_dirty_rate_during_a_migration_is_the_guests_and_loses_no_page(
    tmp_path: Path, tracking: str
) -> None:
    """calc-dirty-rate has its own view of the tracker the migration syncs. During a
    migration that cannot converge (8 MiB/s against the guest's 24), it reads the guest's
    own rate within 10 %. Then, while the migration converges, 100 ms measurements keep
    syncing; the migration must still see every dirty page (regression: a bit landing
    between reading and clearing a step)."""
    ring = ["--dirty-ring"] if tracking == "ring" else []
    mode = "dirty-ring" if ring else "dirty-bitmap"
    uri = f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", [*DEST, "--incoming", uri, "-S"]) as dst,
        vm_process(tmp_path, "src", [*PACED, *ring]) as src,
    ):
        wait_verifying(src)
        windows = []
        with src.qmp() as q:
            q.execute("migrate-set-parameters", {"max-bandwidth": 8 << 20})
            q.execute("migrate", {"uri": uri})
            for _ in range(2):
                t0 = time.time()
                measured = measure_rate(q, mode, 2000)
                windows.append((t0, time.time(), measured))
            assert q.execute("query-migrate")["status"] == "active"
            q.execute("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 2000})
            while (info := q.execute("query-migrate"))["status"] in ("setup", "active"):
                rate = q.execute("query-dirty-rate")
                if rate["status"] != "measuring":
                    measure = {"calc-time": 100, "calc-time-unit": "millisecond"}
                    q.execute("calc-dirty-rate", {**measure, "mode": mode})
                time.sleep(0.05)
        assert info["status"] in ("completed", "device"), info
        assert wait_migration(src)["status"] == "completed"
        for t0, t1, measured in windows:
            real = guest_rate_mib_s(src, t0 - 1.5, t1 + 1.5)
            assert abs(measured - real) <= 0.1 * real, (measured, real, windows)
        assert (
            src.cmd("x-pyvmm-query-memory-hash")["sha256"]
            == dst.cmd("x-pyvmm-query-memory-hash")["sha256"]
        )
        dst.cmd("cont")
        count = len(dst.lines("ok pages="))
        dst.wait_line("ok pages=", 20, after=count + 2)
        assert not dst.lines("CORRUPT")


@pytest.mark.slow
def test_downtime_stays_within_its_limit(tmp_path: Path) -> None:
    """A running 512 MiB, 2-vCPU memverify migrated at unlimited bandwidth, 10 times: the
    90th percentile of the downtime is within downtime-limit + 50 ms. (Before pages in
    their first pass were kept out of the switchover, a destination writing memory this
    host had never given it took up to 1.4 s: docs/migration.md.)"""
    downtimes = []
    for run in range(10):
        uri = f"unix:{tmp_path}/mig{run}.sock"
        args = ["--mem", "512M", "--vcpus", "2"]
        with (
            vm_process(tmp_path, f"dst{run}", [*args, "--incoming", uri]),
            vm_process(tmp_path, f"src{run}", ["memverify", *args]) as src,
        ):
            src.wait_line("ok pages=", 30)
            info = migrate(src, uri, **{"max-bandwidth": 0, "downtime-limit": 300})
            assert info["status"] == "completed", info
            downtimes.append(info["downtime"])
    downtimes.sort()
    assert downtimes[8] <= 350, downtimes
