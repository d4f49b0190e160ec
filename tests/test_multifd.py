"""multifd with real sockets and processes: memverify intact over 1, 2 and 4 channels, the
destination learning the channels from the stream, the ordering rule on a real destination,
a channel dropped mid-way, migrate_cancel, and QEMU's parameter errors."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import streamgen
from mitm import DROP, FORWARD, Mitm, Seen
from vmproc import VmProc, free_tcp_port, vm_process, wait_migration

from helpers import one_line_error, run_pyvmm
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.migration.destination import MigrationDestination
from pyvmm.migration.stream import RECORD, RecordType, ReplyType, StreamError
from pyvmm.monitor.client import QmpCommandError

pytestmark = pytest.mark.kvm
ARGS = ["--mem", "128M", "--vcpus", "2"]
VERIFY = ["memverify", *ARGS, "--append", "mb=16"]


def multifd_on(vm: VmProc, channels: int, **params: object) -> None:
    caps = [{"capability": "multifd", "state": True}]
    vm.cmd("migrate-set-capabilities", capabilities=caps)
    vm.cmd("migrate-set-parameters", **{"multifd-channels": channels, **params})


def same_memory(src: VmProc, dst: VmProc) -> bool:
    return (
        src.cmd("x-pyvmm-query-memory-hash")["sha256"]
        == dst.cmd("x-pyvmm-query-memory-hash")["sha256"]
    )


def resources(pid: int) -> tuple[int, int]:
    """(threads, sockets) of a process."""
    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    return len(os.listdir(f"/proc/{pid}/task")), sum(f.startswith("socket:") for f in fds)


def settled(pid: int) -> tuple[int, int]:
    """resources() once they stay the same for 0.2 s (a QMP client's thread and socket
    end a moment after it disconnects)."""
    last = resources(pid)
    for _ in range(50):
        time.sleep(0.2)
        now = resources(pid)
        if now == last:
            return now
        last = now
    return last


def settles_to(pid: int, before: tuple[int, int], timeout_s: float = 10) -> tuple[int, int]:
    """Wait until the process holds no more threads and sockets than before."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = resources(pid)
        if (now[0] <= before[0] and now[1] <= before[1]) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("channels", "checksums"), [(1, False), (2, True), (4, False)], ids=["1", "2-checksums", "4"]
)
def test_memverify_intact_over_channels(tmp_path: Path, channels: int, checksums: bool) -> None:
    """A running memverify, a plain `--incoming` destination: it learns multifd and the
    channel count from the stream; RAM is identical, and memverify goes on there."""
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    with (
        vm_process(tmp_path, "dst", [*ARGS, "--incoming", uri, "-S"]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        src.wait_line("ok pages=", 20, after=1)
        if checksums:
            src.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "x-record-checksum", "state": True}])  # fmt: skip
        multifd_on(src, channels, **{"max-bandwidth": 0})
        src.cmd("migrate", uri=uri)
        info = wait_migration(src, 30)
        assert info["status"] == "completed", info
        ram = info["ram"]
        # Everything but the main stream's HEADER, syncs and STATE went over the channels.
        assert ram["normal"] > 4000 and ram["multifd-bytes"] > ram["normal"] * 4096
        assert ram["transferred"] - ram["multifd-bytes"] < 200_000
        assert dst.cmd("query-migrate")["x-multifd-channels"] == channels
        assert same_memory(src, dst)
        dst.cmd("cont")
        dst.wait_line("ok pages=", 10, after=2)
        assert not dst.lines("CORRUPT")


def test_the_cli_with_four_channels_against_a_plain_destination(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", [*ARGS, "--incoming", uri, "-S"]) as dst,
        vm_process(tmp_path, "src", ["hello", *ARGS, "-S"]) as src,
    ):
        done = run_pyvmm(["migrate", src.qmp_addr, uri, "--cap", "multifd=on",
                          "--set", "multifd-channels=4", "--set", "max-bandwidth=0",
                          "--wait"], timeout_s=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert dst.cmd("query-migrate")["x-multifd-channels"] == 4
        assert same_memory(src, dst)


def test_channel_counts_set_on_both_sides_must_agree(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", [*ARGS, "--incoming", uri]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        src.wait_line("ok pages=", 20)
        multifd_on(dst, 3)
        multifd_on(src, 2)
        src.cmd("migrate", uri=uri)
        info = wait_migration(src, 30)
        assert info["status"] == "failed"
        assert (
            "the source uses 2 multifd channels, this destination's multifd-channels is 3"
            in (info["error-desc"])
        )
        assert src.cmd("query-status")["status"] == "running"
        assert dst.proc.wait(10) == 1
        assert "multifd-channels is 3" in one_line_error(dst.proc.stderr.read())


def test_a_channel_dropped_midway_fails_cleanly(tmp_path: Path) -> None:
    """Channel 1's connection is cut after its third page run: both sides fail with one
    line, the source's guest runs on, and it keeps no thread or socket of the attempt."""
    dst_sock = tmp_path / "dst.sock"
    runs: dict[int, int] = {}

    def drop_channel_1(seen: Seen) -> str:
        if seen.kind is RecordType.RAM_RUN:
            runs[seen.conn] = runs.get(seen.conn, 0) + 1
            if seen.conn == 2 and runs[seen.conn] == 3:  # 0: the main stream, 1: channel 0
                return DROP
        return FORWARD

    with (
        vm_process(tmp_path, "dst", [*ARGS, "--incoming", f"unix:{dst_sock}"]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        src.wait_line("ok pages=", 20, after=1)
        multifd_on(src, 2, **{"max-bandwidth": 0})
        before = settled(src.proc.pid)
        mitm = Mitm(tmp_path / "mitm.sock", str(dst_sock), on_record=drop_channel_1, multi=True)
        try:
            src.cmd("migrate", uri=mitm.uri)
            info = wait_migration(src, 30)
        finally:
            mitm.close()
        assert info["status"] == "failed", info
        assert "multifd channel" in info["error-desc"] and "\n" not in info["error-desc"]
        assert src.cmd("query-status")["status"] == "running"
        ok = len(src.lines("ok pages="))
        src.wait_line("ok pages=", 10, after=ok)  # memverify goes on
        assert not src.lines("CORRUPT")
        assert dst.proc.wait(10) == 1
        error = one_line_error(dst.proc.stderr.read())
        assert "multifd channel" in error or "stream ended early" in error, error
        after = settles_to(src.proc.pid, before)
        assert after[0] <= before[0] and after[1] <= before[1], (before, after)


def test_cancel_stops_the_channels_and_qmp_speaks_qemus_errors(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", [*ARGS, "--incoming", uri]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        with src.qmp() as q:
            assert q.execute("query-migrate-parameters")["multifd-channels"] == 2
            caps = {c["capability"]: c["state"] for c in q.execute("query-migrate-capabilities")}
            assert caps["multifd"] is False
            errors = {
                0: "Parameter 'multifd_channels' expects a value between 1 and 255",
                256: "Parameter 'multifd-channels' expects uint8_t",
                -1: "Parameter 'multifd-channels' expects uint8_t",
                "4": "Invalid parameter type for 'multifd-channels', expected: integer",
            }
            for value, message in errors.items():
                with pytest.raises(QmpCommandError) as info:
                    q.execute("migrate-set-parameters", {"multifd-channels": value})
                assert info.value.desc == message
        src.wait_line("ok pages=", 20)
        multifd_on(src, 3, **{"max-bandwidth": 4 << 20})  # 4 MiB/s: still running below
        before = settled(src.proc.pid)
        src.cmd("migrate", uri=uri)
        deadline = time.monotonic() + 10
        while src.cmd("query-migrate").get("ram", {}).get("multifd-bytes", 0) < 1 << 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with src.qmp() as q, pytest.raises(QmpCommandError) as info:
            q.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "multifd", "state": False}]})  # fmt: skip
        assert info.value.desc == "There's a migration process in progress"
        src.cmd("migrate_cancel")
        assert wait_migration(src, 10)["status"] == "cancelled"
        assert src.cmd("query-status")["status"] == "running"
        after = settles_to(src.proc.pid, before)
        assert after[0] <= before[0] and after[1] <= before[1], (before, after)
        assert dst.proc.wait(10) == 1  # the destination heard the ABANDON (or the close)


# --- the ordering rule, on a real destination ---------------------------------------------------


def test_the_destination_holds_iteration_2_until_every_channel_ends_iteration_1(
    tmp_path: Path,
) -> None:
    """Channel 1 sends its sync point and then iteration 2's copy of page 300 before channel
    0 sends iteration 1's copy of that page: the destination must not apply channel 1's copy
    until channel 0 has reached its sync point, so page 300 ends with iteration 2's bytes.
    (The destination runs on this thread: building vCPUs installs a signal handler.)"""
    path = tmp_path / "dst.sock"
    machine = Machine(MachineConfig(streamgen.MEM, 1), SerialConsole(io.StringIO()))
    dest = MigrationDestination(machine, f"unix:{path}")
    dest.listen()
    page = machine.memory.regions[0].array[300 * 4096 : 301 * 4096]
    seen: list[str] = []
    conns: list[socket.socket] = []

    def source() -> None:
        def connect(data: bytes) -> socket.socket:
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(str(path))
            conns.append(conn)
            conn.sendall(data)
            return conn

        main = connect(streamgen.Stream().header().multifd(2).bytes())
        ch0, ch1 = (streamgen.channel_stream(i, 2) for i in (0, 1))
        sock0, sock1 = connect(ch0.bytes()), connect(ch1.bytes())
        reply = main.recv(RECORD.size)
        seen.append(f"reply {int.from_bytes(reply[:4], 'little'):#x}")
        mark0, mark1 = len(ch0.data), len(ch1.data)
        ch1.sync(1).ram_run(0, 300, 1, fill=0xBB).sync(2, final=True)
        sock1.sendall(bytes(ch1.data[mark1:]))
        deadline = time.monotonic() + 10
        while dest._multifd is None or dest._multifd.barrier.state.reached[1] < 1:
            if time.monotonic() > deadline:
                seen.append("channel 1 never reached its sync point")
                return
            time.sleep(0.01)
        seen.append(f"page 300 while channel 1 waits: {'zero' if not page.any() else 'written'}")
        ch0.ram_run(0, 300, 1, fill=0xAA).sync(1).sync(2, final=True)
        sock0.sendall(bytes(ch0.data[mark0:]))
        tail = streamgen.Stream()
        tail.seq, tail.data = 2, bytearray()  # HEADER and MULTIFD came first
        main.sendall(tail.sync(1).sync(2, final=True).record(RecordType.ABANDON, b"over").bytes())

    thread = threading.Thread(target=source)
    thread.start()
    try:
        with pytest.raises(StreamError, match="the source abandoned the migration: over"):
            dest.receive(lambda running: running)
        thread.join(10)
        assert seen == [f"reply {ReplyType.CHANNELS_READY:#x}", "page 300 while channel 1 "
                        "waits: zero"]  # fmt: skip
        assert np.all(page == 0xBB)
    finally:
        dest.stop()
        thread.join(10)
        for conn in conns:
            conn.close()
        machine.close()
