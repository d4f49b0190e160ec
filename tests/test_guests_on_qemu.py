"""The same guest images boot unmodified on QEMU (`-kernel`).

Without QEMU these tests skip, naming it; under CI=true they fail (conftest.require)."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from conftest import QEMU_BINARY, qemu_missing, require
from pyvmm.machine.images import resolve_image


@pytest.fixture(autouse=True)
def _qemu_installed() -> None:
    require(qemu_missing())


def qemu(image: str, append: str = "", timeout_s: float = 60, accel: str = "tcg",
         cpus: int = 1) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = [QEMU_BINARY, "-machine", "q35", "-accel", accel, "-cpu", "qemu64", "-smp", str(cpus),
           "-m", "256", "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
           "-serial", "stdio", "-device", "isa-debug-exit,iobase=0x501,iosize=4",
           "-kernel", str(resolve_image(image)), "-append", append]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)


# QEMU starts vCPU 0 only; it wakes the others itself (guest/ap_start.c) and says so.
STARTED_RE = re.compile(r"started (\d+) of (\d+) APs: INIT, [12] SIPI to 0x[0-9a-f]+, \d+ us")


@pytest.mark.parametrize("image", ["hello", "hello-std"])
def test_hello_images_boot_on_qemu(image: str) -> None:
    proc = qemu(image)
    assert "hello from pyvmm guest" in proc.stdout
    assert proc.returncode == (0 << 1) | 1  # isa-debug-exit: (code << 1) | 1


def test_iospin_on_qemu() -> None:
    proc = qemu("iospin", "count=1000")
    assert "iospin done count=1000" in proc.stdout and proc.returncode == 1


def test_memstress_too_big_on_qemu() -> None:
    proc = qemu("memstress", "mb=4096")
    assert "does not fit" in proc.stdout and proc.returncode == (2 << 1) | 1


@pytest.mark.parametrize("image", ["memstress", "memverify"])
def test_workloads_run_on_qemu(image: str) -> None:
    cmd = [QEMU_BINARY, "-machine", "q35", "-accel", "tcg", "-m", "256", "-display", "none",
           "-nodefaults", "-no-user-config", "-serial", "stdio",
           "-kernel", str(resolve_image(image)), "-append", "mb=8 tsc_khz=2000000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        needle = "mib=" if image == "memstress" else "ok pages="
        deadline_lines = 200
        for _ in range(deadline_lines):
            line = proc.stdout.readline()
            if needle in line:
                break
        else:
            pytest.fail(f"{image} printed no progress line on QEMU")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.kvm
def test_vcpu0_starts_every_other_vcpu_on_qemu_kvm() -> None:
    """hello on three vCPUs: vCPU 0 wakes both others with one broadcast INIT-SIPI-SIPI
    (real mode and the local APIC through QEMU 7.2 and this host's KVM)."""
    proc = qemu("hello", "tsc_khz=2000000", accel="kvm", cpus=3)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    m = STARTED_RE.search(proc.stdout)
    assert m and m.groups() == ("2", "2"), proc.stdout
    assert "hello from pyvmm guest" in proc.stdout


@pytest.mark.parametrize(
    ("image", "accel"),
    [pytest.param(i, a, marks=[pytest.mark.kvm] if a == "kvm" else [])
     for i in ("memstress", "memverify") for a in ("kvm", "tcg")],
)  # fmt: skip
def test_workloads_run_on_two_vcpus_on_qemu(image: str, accel: str) -> None:
    """Both vCPUs run the workload on QEMU: a progress line from each, and lines whole
    (the vCPUs share one serial port there)."""
    cmd = [QEMU_BINARY, "-machine", "q35", "-accel", accel, "-cpu", "qemu64", "-smp", "2",
           "-m", "256", "-display", "none", "-nodefaults", "-no-user-config",
           "-serial", "stdio", "-kernel", str(resolve_image(image)),
           "-append", "mb=8 rate=50 tsc_khz=2000000"]  # fmt: skip
    needle = re.compile(
        rf"^{image} vcpu=([01]) " + (r"mib=\d+$" if image == "memstress" else r"ok pages=\d+$")
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        seen: set[str] = set()
        while seen != {"0", "1"} and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            m = needle.match(lines[-1])
            if m:
                seen.add(m.group(1))
    finally:
        proc.kill()
        proc.wait()
    text = "\n".join(lines)
    assert seen == {"0", "1"}, f"progress from vCPUs {sorted(seen)} only:\n{text}"
    m = STARTED_RE.search(text)
    assert m and m.groups() == ("1", "1"), text
    assert f"{image}: vcpus=2 " in text, text
    # Every line is one whole line of one vCPU.
    assert all(ln.startswith(f"{image}") for ln in lines), text
