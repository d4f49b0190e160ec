"""The two VMs of a benchmark run: their command lines (pyvmm or QEMU), their processes,
their consoles and their vCPU threads' CPU time.

The harness talks to both only through QMP and reads the guest's console from a file, so
the same run works on pyvmm and on QEMU with the same guest image.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.bench.scenario import Hardware, ScenarioError
from pyvmm.dirty.ring_quirk import decide_ring_quirk
from pyvmm.machine.images import resolve_image

GUEST = "memstress"
# pyvmm's console prefixes each line with "[unix time] "; QEMU's file has the bare text,
# which the reader timestamps on arrival (it polls every 50 ms).
PROGRESS_RE = re.compile(r"^(?:\[(\d+\.\d+)\] )?memstress vcpu=(\d+) mib=(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A run that could not be carried out; the message is one line for the user."""


def is_qemu(binary: str) -> bool:
    return binary != "pyvmm"


def resolve_binary(binary: str) -> str:
    """'pyvmm' or the absolute path of a QEMU binary."""
    if binary == "pyvmm":
        return binary
    path = shutil.which(binary)
    if path is None:
        raise ScenarioError(f"--binary {binary}: not found")
    return path


def free_tcp_port() -> int:
    """A loopback port nobody listens on right now (the destination will)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_tsc_khz() -> int:
    """What the guest needs on QEMU (tsc_khz=), where it has no pyvmm CPUID leaf."""
    from pyvmm.kvm import Kvm

    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                return vcpu.get_tsc_khz()
            finally:
                vcpu.close()
        finally:
            vm.close()


def pyvmm_ring_args(entries: int) -> list[str]:
    """QEMU's `dirty-ring-size=N` on pyvmm: a real ring of N entries where the start-up
    probe finds such rings reliable; elsewhere (this host) the largest real ring, and N sizes
    the virtual ring that counts entries (x-vcpu-dirty-limit-ring-size, set by the engine)."""
    if not entries:
        return []
    if decide_ring_quirk(entries).lossy:
        return ["--dirty-ring"]
    return ["--dirty-ring", str(entries)]


def vm_command(binary: str, hw: Hardware, qmp: Path, serial: Path, incoming: str | None,
               tsc_khz: int) -> list[str]:  # fmt: skip
    """The command line of one side; the destination gets `incoming` and no guest."""
    mem = hw.vm_mem_mib()
    if not is_qemu(binary):
        cmd = [sys.executable, "-m", "pyvmm.cli", "run"]
        # The guest name goes before --dirty-ring, whose value is optional.
        cmd += [GUEST, "--append", hw.guest_cmdline()] if incoming is None else []
        cmd += ["--mem", f"{mem}M", "--vcpus", str(hw.cpus)]
        cmd += pyvmm_ring_args(hw.dirty_ring_size)
        cmd += ["--qmp", f"unix:{qmp}", "--serial", str(serial)]
        return cmd + (["--incoming", incoming] if incoming else [])
    accel = f"kvm,dirty-ring-size={hw.dirty_ring_size}" if hw.dirty_ring_size else "kvm"
    # QEMU starts vCPU 0 only; the guest wakes the others with INIT-SIPI-SIPI and counts
    # them with CPUID leaf 1 (logical processors per package), so all in one package.
    smp = f"cpus={hw.cpus},sockets=1,cores={hw.cpus},threads=1"
    cmd = [binary, "-machine", "q35", "-accel", accel, "-cpu", "qemu64",
           "-m", str(mem), "-smp", smp, "-display", "none", "-nodefaults",
           "-no-user-config", "-serial", f"file:{serial}",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           "-device", "isa-debug-exit,iobase=0x501,iosize=4",
           # Same image on both sides; QEMU's destination needs it for the ROM layout.
           "-kernel", str(resolve_image(GUEST)),
           # No +invtsc (QEMU refuses to migrate it), so the guest is told its TSC rate.
           "-append", f"{hw.guest_cmdline()} tsc_khz={tsc_khz}"]  # fmt: skip
    return cmd + (["-incoming", incoming] if incoming else [])


@dataclass
class ConsoleReader:
    """Tails a console file: memstress progress lines as (time, vCPU, MiB so far)."""

    path: Path
    offset: int = 0
    partial: bytes = b""
    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        now = time.time()
        for raw in lines:
            m = PROGRESS_RE.match(raw.decode(errors="replace"))
            if m:
                t = float(m.group(1)) if m.group(1) else now
                self.samples.setdefault(int(m.group(2)), []).append((t, int(m.group(3))))

    def latest_mib(self) -> dict[int, int]:
        return {vcpu: s[-1][1] for vcpu, s in self.samples.items() if s}


@dataclass
class VmProcess:
    """One side: its process, QMP socket, console and (once known) vCPU thread ids."""

    side: str
    proc: subprocess.Popen[bytes]
    qmp: Path
    console: ConsoleReader
    log: Path
    vcpu_tids: dict[int, int] = field(default_factory=dict)
    cpu: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"the {self.side} VM exited with {self.proc.returncode}: {self.last_log_line()}"
            )

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1].strip() if lines else "no output"

    def sample_cpu(self) -> None:
        """Cumulative user+system CPU ms of each vCPU thread, from /proc."""
        now = time.time()
        for vcpu, tid in self.vcpu_tids.items():
            try:
                fields = Path(f"/proc/{self.proc.pid}/task/{tid}/stat").read_text()
            except OSError:
                continue  # the thread is gone (VM stopped)
            # Fields after the ")" that closes the thread name; utime and stime are 14, 15.
            rest = fields.rsplit(")", 1)[1].split()
            ms = (int(rest[11]) + int(rest[12])) * 1000 / CLK_TCK
            self.cpu.setdefault(vcpu, []).append((now, ms, tid))

    def stop(self) -> None:
        """End the process: SIGTERM (pyvmm and QEMU both exit cleanly), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def start_vm(side: str, cmd: list[str], work: Path, qmp: Path, serial: Path) -> VmProcess:
    log = work / f"{side}.log"
    with log.open("wb") as out:
        # Own session: a terminal's Ctrl-C reaches the harness only, which then stops the
        # VMs in order instead of both sides racing to die.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip
    return VmProcess(side, proc, qmp, ConsoleReader(serial), log)


def wait_for_socket(vm: VmProcess, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not vm.qmp.exists():
        vm.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"the {vm.side} VM opened no QMP socket within {timeout_s:.0f} s")
        time.sleep(0.02)
