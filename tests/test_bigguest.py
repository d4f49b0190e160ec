"""Guests larger than they need, and larger than the host: guest RAM is mapped with
MAP_NORESERVE, a failure to map says why, and a migration reads, sends and stores only
what the guest ever populated (docs/dirty-tracking.md, "Never-populated memory")."""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest
from vmproc import vm_process, wait_migration

from helpers import PYVMM, one_line_error

pytestmark = pytest.mark.kvm
PAGE = 4096
MIB = 1 << 20
CHUNK_BYTES = 2 * MIB


def _vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_a_64_gib_guest_that_touches_little_runs_on_any_host(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*PYVMM, "run", "hello", "--mem", "64G"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "hello from pyvmm guest" in proc.stdout
    # Whatever the host's memory, the process stays small: nothing maps 64 GiB eagerly.
    # VmHWM of the running VMM, not its rusage: a child forked from this (large) test
    # process starts with the parent's pages, and rusage's peak keeps them past exec.
    guest = ["memstress", "--mem", "64G", "--append", "mb=8 rate=8"]
    with vm_process(tmp_path, "big", guest) as vm:
        vm.wait_line("mib=", 30)
        assert _vm_hwm_bytes(vm.proc.pid) < 256 * MIB


def test_a_guest_that_cannot_be_mapped_says_why() -> None:
    def limit_address_space() -> None:  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run(
        [*PYVMM, "run", "hello", "--mem", "8G"], capture_output=True, text=True, timeout=60,
        preexec_fn=limit_address_space,
    )  # fmt: skip
    assert proc.returncode != 0
    line = one_line_error(proc.stderr)
    assert "cannot map 8G of guest RAM: Cannot allocate memory" in line, line
    for part in ("host RAM ", "vm.overcommit_memory=", "address-space limit (ulimit -v) 6.0 GiB"):
        assert part in line, line


def test_a_sparse_16_gib_guest_migrates_reading_only_what_it_populated(tmp_path: Path) -> None:
    """memverify writes 2 x 32 MiB of a 16 GiB guest; paused, the migration's only pass
    reads the 2 MiB chunks the guest populated and nothing else (counted, not timed), the
    destination holds no more than that, and memverify goes on verifying there."""
    uri = f"unix:{tmp_path}/mig.sock"
    args = ["--mem", "16G", "--vcpus", "2"]
    total_pages = (16 << 30) // PAGE
    written_bytes = 2 * 32 * MIB
    with (
        vm_process(tmp_path, "dst", [*args, "--incoming", uri]) as dst,
        vm_process(tmp_path, "src", ["memverify", *args, "--append", "mb=32"]) as src,
    ):
        src.wait_line("ok pages=", 30, after=1)  # both vCPUs filled and verifying
        src.cmd("stop")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        src.cmd("migrate", uri=uri)
        info = wait_migration(src, 120)
        assert info["status"] == "completed", info
        ram = info["ram"]
        read, unpopulated = ram["x-read-pages"], ram["x-unpopulated-pages"]
        # Every page went once (paused: one pass, the final sync finds nothing).
        assert ram["normal"] + ram["duplicate"] == total_pages, ram
        assert read + unpopulated == total_pages, ram
        # Read: memverify's pages and the guest's own, rounded up to whole 2 MiB chunks.
        assert written_bytes // PAGE <= read <= (written_bytes + 16 * MIB) // PAGE, ram
        assert ram["normal"] >= written_bytes // PAGE
        # The destination stores what arrived: within the populated memory + 10 % + 64 MiB.
        assert _vm_hwm_bytes(dst.proc.pid) <= 1.1 * read * PAGE + 64 * MIB
        dst.cmd("cont")
        count = len(dst.lines("ok pages="))
        dst.wait_line("ok pages=", 30, after=count + 3)
        assert not dst.lines("CORRUPT")
