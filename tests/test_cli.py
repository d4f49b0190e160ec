"""`pyvmm` as a user runs it: real processes, signals, files, QMP sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest

import guestgen
from helpers import one_line_error, pyvmm_process, run_pyvmm, wait_for_line, wait_for_path

kvm = pytest.mark.kvm


@kvm
def test_run_hello_exits_zero_with_its_line() -> None:
    proc = run_pyvmm(["run", "hello"])
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"\[\d+\.\d{6}\] hello from pyvmm guest\n", proc.stdout)


@kvm
def test_guest_exit_code_becomes_process_exit_code(tmp_path: Path) -> None:
    image = tmp_path / "exit42.elf"
    image.write_bytes(guestgen.make_elf(guestgen.exit_with(42)))
    assert run_pyvmm(["run", str(image), "--mem", "16M"]).returncode == 42


@kvm
def test_serial_file_gets_the_lines(tmp_path: Path) -> None:
    serial = tmp_path / "console.txt"
    proc = run_pyvmm(["run", "hello", "--serial", str(serial)])
    assert proc.returncode == 0 and proc.stdout == ""
    assert serial.read_text().endswith("hello from pyvmm guest\n")


@kvm
def test_time_limit_ends_with_code_zero(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = run_pyvmm(["run", "memstress", "--append", "mb=8", "--time-limit", "1.5"])
    assert proc.returncode == 0, proc.stderr
    assert 1.4 < time.monotonic() - t0 < 15
    assert "memstress vcpu=0" in proc.stdout


@kvm
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_signal_ends_the_vm_cleanly(tmp_path: Path, signum: int) -> None:
    sock = tmp_path / "qmp.sock"
    serial = tmp_path / "serial.txt"
    args = ["run", "memstress", "--vcpus", "2", "--append", "mb=8", "--serial", str(serial)]
    with pyvmm_process([*args, "--qmp", f"unix:{sock}"]) as proc:
        wait_for_line(serial, "mib=", 15)
        t0 = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(5) == 0
        assert time.monotonic() - t0 < 2.0
        assert not sock.exists(), "QMP socket left behind"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "no-such-guest"], "not a file and not a built-in guest"),
        (["run", "hello", "--mem", "12Q"], "invalid size"),
        (["run", "hello", "--vcpus", "0"], "must be a positive number"),
        (["run", "hello", "--vcpus", "65"], "out of range"),
        (["run", "hello", "--qmp", "bogus"], "bogus"),
        (["run", "hello", "--qmp", "tcp:8.8.8.8:4444"], "8.8.8.8"),
        (["run", "hello", "--dirty-ring", "1000"], "power of two"),
        (["run", "hello", "--dirty-ring", "1048576"], "out of range"),
        (["run", "hello", "--serial", "/nonexistent/dir/file"], "No such file"),
        (["qmp", "unix:/nonexistent.sock", "query-status"], "nonexistent.sock"),
        (["qmp", "unix:/x.sock", "query-status", "{bad"], "not valid JSON"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], needle: str, require_kvm) -> None:
    proc = run_pyvmm(args)
    assert proc.returncode != 0
    if "invalid size" in needle or "positive" in needle:
        assert needle in proc.stderr and "Traceback" not in proc.stderr  # argparse's usage error
    else:
        assert needle in one_line_error(proc.stderr)


@kvm
@pytest.mark.parametrize(
    ("image", "mem", "needle"),
    [
        (guestgen.make_elf(guestgen.CLI_HLT, pvh_note=False), "16M", "no PVH entry note"),
        (guestgen.make_elf(guestgen.CLI_HLT)[:70], "16M", "truncated ELF"),
        (guestgen.make_elf(guestgen.CLI_HLT, load_addr=0x2000000), "16M", "outside guest RAM"),
        (guestgen.make_elf(guestgen.CLI_HLT, extra_memsz=32 << 20), "16M", "--mem of at least"),
        (guestgen.make_elf(guestgen.DIVIDE_ERROR), "16M", "triple-faulted"),
        (guestgen.make_elf(guestgen.UD2), "16M", "triple-faulted"),
    ],
    ids=["no-note", "truncated", "outside-ram", "mem-too-small", "triple-fault", "ud2"],
)
def test_bad_guests_are_one_line_errors(tmp_path: Path, image: bytes, mem: str, needle: str):
    path = tmp_path / "guest.elf"
    path.write_bytes(image)
    proc = run_pyvmm(["run", str(path), "--mem", mem])
    assert proc.returncode == 1
    assert needle in one_line_error(proc.stderr)


def test_every_subcommand_has_help() -> None:
    for sub in ([], ["run"], ["guests"], ["qmp"], ["demo"]):
        proc = run_pyvmm([*sub, "--help"])
        assert proc.returncode == 0 and "usage: pyvmm" in proc.stdout


def test_guests_lists_the_built_in_images() -> None:
    proc = run_pyvmm(["guests"])
    assert proc.returncode == 0
    names = {line.split()[0] for line in proc.stdout.splitlines()}
    assert {"hello", "hello-std", "memstress", "memverify", "iospin"} <= names
    for line in proc.stdout.splitlines():
        assert Path(line.split()[1]).is_file()


@kvm
def test_qmp_socket_is_private_and_cli_qmp_works(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    with pyvmm_process(["run", "memstress", "--append", "mb=8", "--qmp", f"unix:{sock}"]) as proc:
        wait_for_path(sock)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        status = run_pyvmm(["qmp", f"unix:{sock}", "query-status"])
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["status"] == "running"
        bad = run_pyvmm(["qmp", f"unix:{sock}", "no-such-command"])
        assert bad.returncode == 1 and json.loads(bad.stdout)["class"] == "CommandNotFound"
        quit_ = run_pyvmm(["qmp", f"unix:{sock}", "quit"])
        assert quit_.returncode == 0 and json.loads(quit_.stdout) == {}
        assert proc.wait(5) == 0
    assert not sock.exists()


@kvm
@pytest.mark.slow
def test_demo_migrates_and_passes() -> None:
    proc = run_pyvmm(["demo", "--seconds", "2"], timeout_s=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "status: completed" in proc.stdout and "equal" in proc.stdout
    assert "PASS" in proc.stdout
