"""Real pyvmm processes for migration tests: start, talk QMP, read the console, clean up."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from helpers import pyvmm_process
from pyvmm.monitor.client import SyncQmp

FINAL = ("completed", "failed", "cancelled")


@dataclass
class VmProc:
    name: str
    proc: Popen[str]
    qmp_path: Path
    serial: Path

    @property
    def qmp_addr(self) -> str:
        return f"unix:{self.qmp_path}"

    def qmp(self, timeout_s: float = 20) -> SyncQmp:
        return SyncQmp(self.qmp_addr, timeout_s=timeout_s)

    def cmd(self, name: str, **args: object) -> object:
        with self.qmp() as q:
            return q.execute(name, args or None)

    def lines(self, pattern: str = "") -> list[str]:
        if not self.serial.exists():
            return []
        return [line for line in self.serial.read_text().splitlines() if pattern in line]

    def wait_line(self, pattern: str, timeout_s: float = 20, after: int = 0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.lines(pattern)
            if len(found) > after:
                return found[after]
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}) waiting for {pattern!r}: {err}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {pattern!r} line within {timeout_s} s")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vm_process(
    tmp_path: Path, name: str, args: list[str], prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[VmProc]:  # fmt: skip
    """`pyvmm run ARGS` with QMP and a serial file; env: variables added to ours."""
    qmp = tmp_path / f"{name}.qmp"
    serial = tmp_path / f"{name}.serial"
    full = ["run", *args, "--qmp", f"unix:{qmp}", "--serial", str(serial)]
    extra = {} if env is None else {"env": {**os.environ, **env}}
    with ExitStack() as stack:
        proc = stack.enter_context(pyvmm_process(full, prefix=prefix or (), **extra))
        deadline = time.monotonic() + 30
        while not qmp.exists():
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"{name} exited with {proc.returncode} at start: {err}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no QMP socket within 30 s")
            time.sleep(0.02)
        yield VmProc(name, proc, qmp, serial)


def wait_migration(src: VmProc, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    with src.qmp() as q:
        while time.monotonic() < deadline:
            info = q.execute("query-migrate")
            if info.get("status") in FINAL:
                return info
            time.sleep(0.05)
    raise TimeoutError(f"migration from {src.name} did not end within {timeout_s} s")


def progress_by_vcpu(vm: VmProc, guest: str = "memverify") -> dict[int, list[tuple[float, int]]]:
    """(time, counter) per vCPU from memverify's `ok pages=` or memstress's `mib=` lines."""
    pat = re.compile(rf"\[(\d+\.\d+)\] {guest} vcpu=(\d+) (?:ok pages|mib)=(\d+)")
    out: dict[int, list[tuple[float, int]]] = {}
    for line in vm.lines(guest):
        if m := pat.match(line):
            out.setdefault(int(m.group(2)), []).append((float(m.group(1)), int(m.group(3))))
    return out
