"""The same guest images boot unmodified on QEMU (`-kernel`).

Without QEMU these tests skip, naming it; under CI=true they fail (conftest.require)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import QEMU_BINARY, qemu_missing, require
from pyvmm.machine.images import resolve_image


@pytest.fixture(autouse=True)
def _qemu_installed() -> None:
    require(qemu_missing())


def qemu(image: str, append: str = "", timeout_s: float = 60) -> subprocess.CompletedProcess:
    cmd = [QEMU_BINARY, "-machine", "q35", "-accel", "tcg", "-m", "256", "-display", "none",
           "-nodefaults", "-no-user-config", "-no-reboot", "-serial", "stdio",
           "-device", "isa-debug-exit,iobase=0x501,iosize=4",
           "-kernel", str(resolve_image(image)), "-append", append]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)


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
