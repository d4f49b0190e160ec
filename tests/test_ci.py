""".ci/install-tools: CI installs QEMU and iproute2, or stops in one line saying why.

Each case runs the real script with PATH limited to a directory of the commands it
uses, so that ip, tc and qemu-system-x86_64 are missing; apt-get there is a stand-in
(failure injection), since a test must not install packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "install-tools"
TOOLS = ("ip", "tc", "qemu-system-x86_64")


def fake_bin(tmp_path: Path, apt_get: str) -> Path:
    """A PATH directory with what the script needs and an apt-get running `apt_get`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "env", "id", "mktemp", "rm", "tail"):
        found = shutil.which(name)
        assert found, f"{name} is needed to run .ci/install-tools"
        (bin_dir / name).symlink_to(found)
    apt = bin_dir / "apt-get"
    apt.write_text(f'#!{shutil.which("bash")}\necho "$@" >> "{tmp_path}/apt.log"\n{apt_get}\n')
    apt.chmod(0o755)
    return bin_dir


def install_tools(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": str(bin_dir)}
    return subprocess.run(
        [str(bin_dir / "bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30
    )


def stub_tools(bin_dir: Path) -> str:
    """Shell lines that 'install' the tools into bin_dir."""
    chmod = shutil.which("chmod")
    return "; ".join(f"echo '#!/bin/sh' > {bin_dir}/{t}; {chmod} +x {bin_dir}/{t}" for t in TOOLS)


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs as root; this user is not")
def test_a_failed_install_ends_in_one_line(tmp_path: Path) -> None:
    bin_dir = fake_bin(
        tmp_path,
        'case "$1" in update) exit 0;; esac\n'
        'echo "E: Unable to locate package qemu-system-x86" >&2; exit 100',
    )
    proc = install_tools(bin_dir)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "apt-get install exited with status 100: E: Unable to locate package" in lines[0]
    assert "iproute2" in lines[0] and "qemu-system-x86" in lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs as root; this user is not")
def test_tools_still_missing_after_install_fail(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, "exit 0")  # "succeeds" but installs nothing
    proc = install_tools(bin_dir)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "still missing after apt-get install" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs as root; this user is not")
def test_missing_tools_are_installed(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    installs = f'if [ "$1" = install ]; then {stub_tools(bin_dir)}; fi'
    proc = install_tools(fake_bin(tmp_path, installs))
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "apt.log").read_text().splitlines()
    assert log[0] == "update -qq"
    assert log[1].startswith("install -y -qq --no-install-recommends ")
    assert sorted(log[1].split()[4:]) == ["iproute2", "qemu-system-x86"]


def test_nothing_is_installed_when_the_tools_are_there(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, "exit 100")
    subprocess.run(["bash", "-c", stub_tools(bin_dir)], check=True)
    proc = install_tools(bin_dir)
    assert proc.returncode == 0 and proc.stderr == ""
    assert not (tmp_path / "apt.log").exists()
