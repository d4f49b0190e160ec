"""`pyvmm trace`: real VMM processes (pyvmm and QEMU) traced with python-ptrace, and the
Trace Event Format writer the timelines are made with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from vmproc import VmProc, free_tcp_port, vm_process

from helpers import PYVMM, one_line_error, pyvmm_process, run_pyvmm, wait_for_path
from pyvmm import timeline
from pyvmm.kvm import abi
from pyvmm.machine.images import resolve_image
from pyvmm.trace.decode import decode_run_exit, request_name
from pyvmm.trace.errors import TraceError
from pyvmm.trace.lines import CallFilter

try:
    import ptrace  # noqa: F401

    HAVE_PTRACE = True
except ImportError:
    HAVE_PTRACE = False
needs_ptrace = pytest.mark.skipif(
    not HAVE_PTRACE, reason="python-ptrace is not installed (pip install -e '.[test]' brings it)"
)
QEMU = shutil.which("qemu-system-x86_64")
HELLO_LINE = "hello from pyvmm guest\n"


# --- helpers ---------------------------------------------------------------------------------


def kvm_events(trace: dict, name: str | None = None) -> list[dict]:
    return [e for e in trace["traceEvents"]
            if e["ph"] == "X" and (name is None or e["name"] == name)]  # fmt: skip


def exits_by_vcpu(trace: dict) -> dict[str, Counter[str]]:
    """KVM_RUN calls that returned 0, by vCPU fd kind and exit reason."""
    out: dict[str, Counter[str]] = {}
    for e in kvm_events(trace, "KVM_RUN"):
        if e["args"]["result"] == 0:
            kind = e["args"]["fd"].split("(")[1].rstrip(")")
            out.setdefault(kind, Counter())[e["args"]["exit"]] += 1
    return out


def check_trace_file(path: Path) -> dict:
    """The file is JSON with the Trace Event Format's fields, as a reader sees it."""
    data = json.loads(path.read_text())
    assert isinstance(data["traceEvents"], list) and data["displayTimeUnit"] in ("ms", "ns")
    assert timeline.validate(data) == []
    for event in data["traceEvents"]:
        assert {"name", "ph", "ts", "pid", "tid"} <= event.keys(), event
    meta = [e for e in data["traceEvents"] if e["ph"] == "M"]
    assert any(e["name"] == "process_name" for e in meta)
    assert any(e["name"] == "thread_name" and e["args"]["name"].startswith("vCPU 0") for e in meta)
    return data


def wait_attached(tracer: subprocess.Popen[str]) -> str:
    assert tracer.stderr is not None
    line = tracer.stderr.readline()
    assert "attached to pid" in line, line + (tracer.stderr.read() if tracer.poll() else "")
    return line


def tracer_pids(pid: int) -> set[int]:
    """TracerPid of every thread of pid (0: not traced)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        out.add(int(status.split("TracerPid:")[1].split()[0]))
    return out


def vm_exits(vm: VmProc) -> int:
    return vm.cmd("x-pyvmm-query-exits")["total"]


# --- the timeline writer (no KVM) ------------------------------------------------------------


def test_timeline_writes_the_trace_event_format(tmp_path: Path) -> None:
    clock = iter([100.0, 250.0, 400.0])
    tl = timeline.Timeline(pid=7, process_name="vmm", clock_us=lambda: next(clock))
    tl.name_track(11, "vCPU 0", sort_index=0)
    mig = tl.new_track("migration")
    tl.complete("KVM_RUN", 10.0, 5.5, 11, cat="vcpu", args={"exit": "IO"})
    tl.instant("switchover", mig, 30.0, scope="p")
    tl.counter("dirty rate", {"MB/s": 12.5}, 20.0)
    with tl.span("sync", mig, cat="migration") as args:  # clock: 100 -> 250
        args["pages"] = 3
    tl.instant("now", 11)  # clock: 400
    n = tl.write(tmp_path / "t.json")
    data = timeline.load(tmp_path / "t.json")
    assert n == len(data["traceEvents"]) == 9 and timeline.validate(data) == []
    events = data["traceEvents"]
    # Metadata first, then by time.
    assert [e["ph"] for e in events[:4]] == ["M"] * 4
    assert [e["ts"] for e in events[4:]] == [10.0, 20.0, 30.0, 100.0, 400.0]
    names = {(e["name"], e["tid"]): e["args"] for e in events if e["ph"] == "M"}
    assert names[("process_name", 0)] == {"name": "vmm"}
    assert names[("thread_name", 11)] == {"name": "vCPU 0"}
    assert names[("thread_name", mig)] == {"name": "migration"} and mig > 1 << 22
    run, counter, instant, span = events[4], events[5], events[6], events[7]
    assert run == {"name": "KVM_RUN", "ph": "X", "ts": 10.0, "dur": 5.5, "pid": 7, "tid": 11,
                   "cat": "vcpu", "args": {"exit": "IO"}}  # fmt: skip
    assert counter["ph"] == "C" and counter["args"] == {"MB/s": 12.5}
    assert instant["ph"] == "i" and instant["s"] == "p"
    assert span["dur"] == 150.0 and span["args"] == {"pages": 3}
    assert data["otherData"]["dropped_events"] == 0


def test_timeline_bounds_memory_and_merges(tmp_path: Path) -> None:
    a = timeline.Timeline(pid=1, process_name="a", max_events=3)
    for i in range(5):
        a.complete("x", float(i), 1.0, 1)
    assert len(a) == 3 and a.dropped == 2
    b = timeline.Timeline(pid=2, process_name="b")
    b.instant("y", 1, 2.5)
    merged = timeline.merge(a.to_dict(), b.to_dict())
    assert timeline.validate(merged) == []
    assert [e["ts"] for e in merged["traceEvents"] if e["ph"] != "M"] == [0.0, 1.0, 2.0, 2.5]
    assert {e["pid"] for e in merged["traceEvents"] if e["ph"] == "M"} == {1, 2}
    timeline.write(tmp_path / "m.json", merged)
    assert timeline.load(tmp_path / "m.json")["traceEvents"] == merged["traceEvents"]
    with pytest.raises(ValueError, match="scope"):
        a.instant("z", 1, 0.0, scope="x")


@pytest.mark.parametrize(
    ("event", "needle"),
    [
        ({"name": "a", "ph": "X", "ts": 1, "pid": 1, "tid": 1}, "dur"),
        ({"name": "a", "ph": "X", "ts": 1, "pid": 1, "tid": 1, "dur": -1}, "dur"),
        ({"name": "a", "ph": "Q", "ts": 1, "pid": 1, "tid": 1}, "phase"),
        ({"ph": "i", "ts": 1, "pid": 1, "tid": 1}, "name"),
        ({"name": "a", "ph": "i", "ts": "1", "pid": 1, "tid": 1}, "ts"),
        ({"name": "a", "ph": "i", "ts": 1, "pid": 1, "tid": 1, "s": "x"}, "scope"),
        ({"name": "a", "ph": "C", "ts": 1, "pid": 1, "tid": 1, "args": {"v": "x"}}, "numeric"),
        ({"name": "thread_name", "ph": "M", "ts": 0, "pid": 1, "tid": 1, "args": {}}, "args.name"),
        ({"name": "bogus", "ph": "M", "ts": 0, "pid": 1, "tid": 1}, "metadata"),
        ({"name": "a", "ph": "i", "ts": 1, "pid": "1", "tid": 1}, "pid"),
    ],
)
def test_timeline_validate_names_each_problem(event: dict, needle: str) -> None:
    problems = timeline.validate({"traceEvents": [event]})
    assert len(problems) == 1 and needle in problems[0], problems


# --- decoding and filters (no KVM) -----------------------------------------------------------


def test_requests_are_named_from_pyvmm_abi() -> None:
    assert request_name(abi.KVM_RUN) == "KVM_RUN"
    assert request_name(abi.KVM_SET_USER_MEMORY_REGION) == "KVM_SET_USER_MEMORY_REGION"
    # A request pyvmm's tables do not have is named by its _IOC fields.
    assert request_name((1 << 30) | (16 << 16) | (0xAE << 8) | 0xF9) == "KVM_IOW_0xf9"


def test_run_exits_are_decoded_from_kvm_run_bytes() -> None:
    page = bytearray(64)
    struct.pack_into("<I", page, 8, abi.KVM_EXIT_IO)
    struct.pack_into("<BBHI", page, 32, abi.KVM_EXIT_IO_OUT, 1, 0x3F8, 23)
    assert decode_run_exit(bytes(page)) == {"exit": "IO", "io": "out", "port": "0x3f8",
                                            "size": 1, "count": 23}  # fmt: skip
    struct.pack_into("<I", page, 8, abi.KVM_EXIT_MMIO)
    struct.pack_into("<Q8xIB", page, 32, 0xFEE00000, 4, 1)
    assert decode_run_exit(bytes(page)) == {"exit": "MMIO", "mmio": "write",
                                            "addr": "0xfee00000", "len": 4}  # fmt: skip
    struct.pack_into("<I", page, 8, abi.KVM_EXIT_HLT)
    assert decode_run_exit(bytes(page)) == {"exit": "HLT"}


def test_filter_words() -> None:
    flt = CallFilter.parse(["run,kvm_get_dirty_log", "vcpu:1", "vm"])
    assert flt.names == {"KVM_RUN", "KVM_GET_DIRTY_LOG"}
    assert flt.kinds == {"kvm-vcpu:1", "kvm-vm"}
    assert CallFilter.parse(["vcpu"]).kinds == {"kvm-vcpu:"}
    with pytest.raises(TraceError, match="--filter KVM_NOPE"):
        CallFilter.parse(["KVM_NOPE"])


# --- tracing pyvmm ---------------------------------------------------------------------------


@needs_ptrace
@pytest.mark.kvm
def test_trace_hello_from_open_to_exit(tmp_path: Path) -> None:
    out = tmp_path / "hello.json"
    serial = tmp_path / "serial"
    proc = run_pyvmm(["trace", "--output", str(out), "--", *PYVMM, "run", "hello", "--serial",
                      str(serial)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert serial.read_text().endswith("hello from pyvmm guest\n")
    lines = proc.stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if f" {name}(" in line)
             for name in ("KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_SET_USER_MEMORY_REGION",
                          "KVM_CREATE_VCPU", "KVM_SET_REGS", "KVM_RUN")]  # fmt: skip
    assert order == sorted(order), lines[:20]
    region = next(line for line in lines if "KVM_SET_USER_MEMORY_REGION(" in line)
    assert "slot=0" in region and "gpa=0x0" in region and f"size_bytes={256 << 20}" in region
    trace = check_trace_file(out)
    runs = kvm_events(trace, "KVM_RUN")
    ios = [e["args"] for e in runs if e["args"].get("exit") == "IO"]
    # The guest's one line: every byte of it went out on COM1 (in one exit or several,
    # depending on how the host's KVM handles `rep outsb`), then one write to 0x501.
    com1 = [a for a in ios if a["port"] == "0x3f8" and a["io"] == "out"]
    assert sum(a["count"] for a in com1) == len(HELLO_LINE)
    assert [a for a in ios if a["port"] == "0x501"] == [ios[-1]]
    assert all(e["args"]["fd"].endswith("(kvm-vcpu:0)") for e in runs)
    names = {e["name"] for e in kvm_events(trace)}
    assert {"KVM_CREATE_VM", "KVM_SET_USER_MEMORY_REGION", "KVM_CREATE_VCPU"} <= names
    assert "exited with code 0" in proc.stderr


@needs_ptrace
@pytest.mark.kvm
def test_traced_iospin_exits_match_the_vms_own_count(tmp_path: Path) -> None:
    qmp = tmp_path / "vm.qmp"
    out = tmp_path / "iospin.json"
    vm_cmd = [*PYVMM, "run", "iospin", "--append", f"count={10**12}", "--qmp", f"unix:{qmp}",
              "--serial", str(tmp_path / "serial")]  # fmt: skip
    with pyvmm_process(["trace", "--summary", "--output", str(out), "--", *vm_cmd]) as tracer:
        wait_for_path(qmp, 30)
        from pyvmm.monitor.client import SyncQmp

        time.sleep(2)
        with SyncQmp(f"unix:{qmp}", timeout_s=20) as q:
            q.execute("stop")
            own = q.execute("x-pyvmm-query-exits")
            q.execute("quit")
        stdout, stderr = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, stderr
    assert own["total"] > 1000
    trace = check_trace_file(out)
    exits = exits_by_vcpu(trace)
    traced = sum(exits["kvm-vcpu:0"].values())
    assert abs(traced - own["vcpus"][0]["exits"]) <= own["total"] // 100, (traced, own)
    assert exits["kvm-vcpu:0"]["IO"] >= 0.99 * traced
    # The summary table says the same.
    row = next(line for line in stdout.splitlines() if line.startswith("kvm-vcpu:0"))
    assert int(row.split()[1]) == exits["kvm-vcpu:0"]["IO"]
    assert "KVM_RUN exits by reason" in stdout and "KVM_CREATE_VM" in stdout


@needs_ptrace
@pytest.mark.kvm
def test_attach_counts_and_detach_leaves_the_vm_running(tmp_path: Path) -> None:
    args = ["iospin", "--append", f"count={10**12}"]
    with vm_process(tmp_path, "vm", args) as vm:
        vm.cmd("stop")
        before = vm_exits(vm)
        cmd = ["trace", "--summary", "--output", str(tmp_path / "a.json"), str(vm.proc.pid)]
        with pyvmm_process(cmd) as tracer:
            wait_attached(tracer)
            assert tracer_pids(vm.proc.pid) == {tracer.pid}  # every thread
            vm.cmd("cont")
            time.sleep(1.5)
            vm.cmd("stop")
            after = vm_exits(vm)
            tracer.send_signal(signal.SIGINT)
            _, stderr = tracer.communicate(timeout=30)
        assert tracer.returncode == 0 and "detached from pid" in stderr, stderr
        assert tracer_pids(vm.proc.pid) == {0}
        traced = sum(exits_by_vcpu(check_trace_file(tmp_path / "a.json"))["kvm-vcpu:0"].values())
        assert after - before > 1000
        assert abs(traced - (after - before)) <= (after - before) // 100, (traced, before, after)
        # Untraced again: QMP answers and the guest goes on exiting.
        assert vm.cmd("query-status")["status"] == "paused"
        vm.cmd("cont")
        time.sleep(0.3)
        assert vm_exits(vm) > after
        # SIGTERM and --duration detach the same way, while the guest runs.
        with pyvmm_process(["trace", "-q", str(vm.proc.pid)]) as tracer:
            wait_attached(tracer)
            time.sleep(0.5)
            tracer.send_signal(signal.SIGTERM)
            assert tracer.wait(30) == 0
        proc = run_pyvmm(["trace", "--duration", "0.5", "--filter", "run", str(vm.proc.pid)])
        assert proc.returncode == 0, proc.stderr
        assert "KVM_RUN() = 0" in proc.stdout and "exit=IO io=out port=0x80" in proc.stdout
        assert tracer_pids(vm.proc.pid) == {0}
        assert vm.cmd("query-status")["status"] == "running"
        assert vm.proc.poll() is None


@needs_ptrace
@pytest.mark.kvm
@pytest.mark.slow
def test_dirty_log_calls_follow_the_migration_syncs(tmp_path: Path) -> None:
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    # 8 MiB/s per vCPU: the migration converges even on a loaded machine under ptrace
    # (flat out, it did not within 120 s in CI).
    src_args = ["memstress", "--mem", "256M", "--vcpus", "2", "--append", "mb=32 rate=8"]
    with (
        vm_process(tmp_path, "dst", ["--mem", "256M", "--vcpus", "2", "--incoming", uri]) as dst,
        vm_process(tmp_path, "src", src_args) as src,
    ):
        src.wait_line("mib=", 20)
        out = tmp_path / "mig.json"
        with pyvmm_process(["trace", "--summary", "--output", str(out), str(src.proc.pid)]) as tr:
            wait_attached(tr)
            mig = run_pyvmm(["migrate", src.qmp_addr, uri, "--wait", "--json"], timeout_s=120)
            tr.send_signal(signal.SIGINT)
            stdout, stderr = tr.communicate(timeout=30)
        assert mig.returncode == 0, mig.stderr
        assert tr.returncode == 0, stderr
        final = json.loads(mig.stdout)
        syncs = final["ram"]["dirty-sync-count"]
        trace = check_trace_file(out)
        gets = kvm_events(trace, "KVM_GET_DIRTY_LOG")
        # One KVM_GET_DIRTY_LOG per slot (here one) per sync of the migration.
        assert len(gets) == syncs >= 2
        assert all(e["args"]["slot"] == 0 and e["args"]["slot_pages"] == 65536 for e in gets)
        # The first sync finds every page dirty (logging starts with all set); later ones
        # find what memstress wrote meanwhile.
        assert all(0 < e["args"]["dirty_pages"] <= 65536 for e in gets[1:])
        # They all fall within the migration, which took total-time ms.
        span_ms = (gets[-1]["ts"] - gets[0]["ts"]) / 1000
        assert span_ms <= final["total-time"]
        assert "dirty-log calls per second" in stdout and "KVM_GET_DIRTY_LOG" in stdout
        assert src.cmd("query-status")["status"] == "postmigrate"
        dst.wait_line("mib=", 20)


# --- tracing QEMU ----------------------------------------------------------------------------


@needs_ptrace
@pytest.mark.kvm
@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not on PATH (.ci/run installs it)")
def test_trace_qemu_boot_and_attach(tmp_path: Path) -> None:
    assert QEMU is not None
    serial = tmp_path / "serial"
    qemu = [QEMU, "-machine", "q35", "-accel", "kvm", "-cpu", "qemu64", "-m", "64",
            "-display", "none", "-nodefaults", "-no-user-config", "-serial", f"file:{serial}",
            "-device", "isa-debug-exit,iobase=0x501,iosize=4",
            "-kernel", str(resolve_image("hello"))]  # fmt: skip
    out = tmp_path / "qemu.json"
    proc = run_pyvmm(["trace", "-q", "--output", str(out), "--", *qemu], timeout_s=120)
    assert proc.returncode == 1, proc.stderr  # isa-debug-exit: (0 << 1) | 1
    assert HELLO_LINE.strip() in serial.read_text()
    trace = check_trace_file(out)
    names = [e["name"] for e in kvm_events(trace)]
    for name in ("KVM_CREATE_VM", "KVM_SET_USER_MEMORY_REGION", "KVM_CREATE_VCPU", "KVM_RUN"):
        assert name in names
    assert names.index("KVM_CREATE_VM") < names.index("KVM_CREATE_VCPU") < names.index("KVM_RUN")
    # Every ioctl QEMU issued has a name in pyvmm's ABI tables.
    assert not [n for n in names if n.startswith(("KVM_IO_", "KVM_IOW_", "KVM_IOR_"))], names
    assert exits_by_vcpu(trace)["kvm-vcpu:0"]["IO"] > 0
    # Attach to a running QEMU (memstress, 2 vCPUs and QMP), then detach.
    qmp = tmp_path / "qemu.qmp"
    serial2 = tmp_path / "serial2"
    running = [QEMU, "-machine", "q35", "-accel", "kvm", "-cpu", "qemu64", "-m", "128",
               "-smp", "2", "-display", "none", "-nodefaults", "-no-user-config",
               "-serial", f"file:{serial2}", "-qmp", f"unix:{qmp},server=on,wait=off",
               "-kernel", str(resolve_image("memstress")),
               "-append", "mb=8 tsc_khz=2000000"]  # fmt: skip
    vm = subprocess.Popen(running, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_path(qmp, 30)
        wait_serial = time.monotonic() + 30
        while not serial2.exists() or "mib=" not in serial2.read_text(errors="replace"):
            assert time.monotonic() < wait_serial and vm.poll() is None, "no memstress on QEMU"
            time.sleep(0.1)
        traced = run_pyvmm(["trace", "--summary", "--duration", "1.5", str(vm.pid)])
        assert traced.returncode == 0, traced.stderr
        assert "kvm-vcpu:0" in traced.stdout and "kvm-vcpu:1" in traced.stdout
        assert tracer_pids(vm.pid) == {0}
        from pyvmm.monitor.client import SyncQmp

        with SyncQmp(f"unix:{qmp}", timeout_s=10) as q:
            assert q.execute("query-status")["status"] == "running"
    finally:
        vm.kill()
        vm.wait()


# --- bad input -------------------------------------------------------------------------------


@needs_ptrace
def test_bad_targets_are_one_line_errors(tmp_path: Path) -> None:
    def error(args: list[str]) -> str:
        proc = run_pyvmm(["trace", *args])
        assert proc.returncode != 0
        return one_line_error(proc.stderr)

    assert "no process with pid 4194999" in error(["4194999"])
    assert "give a PID" in error([])
    assert "command not found" in error(["--", "no-such-vmm-binary"])
    assert "--filter bogus" in error(["--filter", "bogus", "1"])
    assert "directory" in error(["--output", str(tmp_path / "no" / "x.json"), "1"])
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert "has no KVM file descriptors" in error([str(sleeper.pid)])
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_ptrace
@pytest.mark.kvm
def test_a_second_tracer_is_a_one_line_error(tmp_path: Path) -> None:
    with vm_process(tmp_path, "vm", ["iospin", "--append", f"count={10**12}"]) as vm:
        pid = str(vm.proc.pid)
        with pyvmm_process(["trace", "-q", pid]) as first:
            wait_attached(first)
            proc = run_pyvmm(["trace", pid])
            assert "already traced by pid" in one_line_error(proc.stderr)
            first.send_signal(signal.SIGINT)
            assert first.wait(30) == 0
        assert vm.cmd("query-status")["status"] == "running"


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def nobody_can_run_pyvmm() -> str | None:
    """None if user nobody can run this interpreter and import pyvmm, else why not."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return "needs root and setpriv to run the tracer as another user"
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import pyvmm.trace.run"],
                           capture_output=True, timeout=60, check=False)  # fmt: skip
    if probe.returncode != 0:
        return "user nobody cannot run this interpreter or read this checkout"
    return None


@needs_ptrace
@pytest.mark.kvm
def test_tracing_another_users_vmm_is_a_one_line_error(tmp_path: Path) -> None:
    reason = nobody_can_run_pyvmm()
    if reason:
        pytest.skip(reason)
    with vm_process(tmp_path, "vm", ["iospin", "--append", f"count={10**12}"]) as vm:
        env = {**os.environ, "HOME": "/tmp"}
        proc = subprocess.run([*NOBODY, *PYVMM, "trace", str(vm.proc.pid)], capture_output=True,
                              text=True, timeout=60, env=env, check=False)  # fmt: skip
        assert proc.returncode != 0
        assert "permission denied" in one_line_error(proc.stderr)
        assert vm.cmd("query-status")["status"] == "running"


def test_missing_python_ptrace_is_a_one_line_error() -> None:
    # Failure injection: the interpreter is told python-ptrace cannot be imported.
    code = "import sys; sys.modules['ptrace'] = None; from pyvmm.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "trace", "1"], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "python-ptrace is not installed" in one_line_error(proc.stderr)
