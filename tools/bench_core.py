#!/usr/bin/env python3
"""Core VMM figures: boot latency, port-I/O exit rate, memstress update rate.

Each figure is printed beside a reference measured in the same run where one
exists: QEMU booting the same image (when qemu-system-x86_64 is installed).
Usage: python tools/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import statistics
import subprocess
import threading
import time

from pyvmm.machine.devices import SerialConsole, SerialLine
from pyvmm.machine.elf import load_pvh_image
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig


def first_line_ms(image: str, cmdline: str = "", mem_mib: int = 64) -> float:
    """From creating the VM to the guest's first complete serial line."""
    got = threading.Event()
    serial = SerialConsole(io.StringIO())
    serial.listeners.append(lambda line: got.set())
    loaded = load_pvh_image(resolve_image(image))
    t0 = time.perf_counter()
    with Machine(MachineConfig(mem_mib << 20, 1, cmdline), serial) as machine:
        machine.boot(loaded)
        machine.start()
        if not got.wait(10):
            raise RuntimeError(f"{image} printed nothing within 10 s")
        return (time.perf_counter() - t0) * 1000


def iospin_exits_per_s(count: int) -> float:
    done = threading.Event()
    serial = SerialConsole(io.StringIO())
    serial.listeners.append(lambda line: "iospin done" in line.text and done.set())
    loaded = load_pvh_image(resolve_image("iospin"))
    with Machine(MachineConfig(64 << 20, 1, f"count={count}"), serial) as machine:
        machine.boot(loaded)
        t0 = time.perf_counter()
        machine.start()
        if not done.wait(120):
            raise RuntimeError("iospin did not finish")
        return count / (time.perf_counter() - t0)


def raw_kvm_run_exits_per_s(count: int) -> float:
    """The ceiling: KVM_RUN in a loop on iospin with no exit handling at all (through the
    same callable the vCPU loop uses)."""
    loaded = load_pvh_image(resolve_image("iospin"))
    config = MachineConfig(64 << 20, 1, f"count={count * 2}")
    with Machine(config, SerialConsole(io.StringIO())) as m:
        m.boot(loaded)
        run = m.vcpus[0].fd.decoded_runner()
        t0 = time.perf_counter()
        for _ in range(count):
            run()
        return count / (time.perf_counter() - t0)


def memstress_mib_s(vcpus: int, seconds: float, mb: int = 64) -> list[float]:
    samples: dict[int, list[tuple[float, int]]] = {}
    pattern = re.compile(r"memstress vcpu=(\d+) mib=(\d+)")

    def on_line(line: SerialLine) -> None:
        if m := pattern.search(line.text):
            samples.setdefault(int(m.group(1)), []).append((line.wall_time_s, int(m.group(2))))

    serial = SerialConsole(io.StringIO())
    serial.listeners.append(on_line)
    loaded = load_pvh_image(resolve_image("memstress"))
    mem = (vcpus * mb + 64) << 20
    with Machine(MachineConfig(mem, vcpus, f"mb={mb}"), serial) as machine:
        machine.boot(loaded)
        machine.start()
        time.sleep(seconds)
    rates = []
    for vcpu in range(vcpus):
        pts = samples.get(vcpu, [])[1:]  # skip the first-touch second
        if len(pts) < 2:
            raise SystemExit(f"memstress vCPU {vcpu}: fewer than two progress lines after the "
                             f"first in {seconds} s (a slow first touch?); run longer")  # fmt: skip
        rates.append((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))
    return rates


def qemu_first_line_ms(image: str) -> float | None:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return None
    cmd = [qemu, "-machine", "q35,accel=kvm:tcg", "-m", "64", "-nographic", "-no-reboot",
           "-display", "none", "-monitor", "none", "-serial", "stdio",
           "-device", "isa-debug-exit,iobase=0x501,iosize=4",
           "-kernel", str(resolve_image(image))]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "hello from pyvmm guest" in line:
                return (time.perf_counter() - t0) * 1000
        return None
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    reps = 5 if args.quick else 20
    boot = [first_line_ms("hello") for _ in range(reps)]
    qemu = qemu_first_line_ms("hello")
    print(f"{'figure':<44} {'pyvmm':>12} {'reference':>22}")
    ref = f"QEMU {qemu:.0f} ms" if qemu else "QEMU not installed"
    median = statistics.median(boot)
    print(f"{'VM creation -> first serial line (median)':<44} {median:>9.1f} ms {ref:>22}")
    count = 100_000 if args.quick else 1_000_000
    ceiling = f"raw KVM_RUN {raw_kvm_run_exits_per_s(count // 2):,.0f}"
    rate = iospin_exits_per_s(count)
    print(f"{'port-I/O exits per second, 1 vCPU':<44} {rate:>12,.0f} {ceiling:>22}")
    secs = 5 if args.quick else 6  # the first second touches fresh memory and is skipped
    for vcpus in (1, 2):
        rates = memstress_mib_s(vcpus, secs)
        shown = " + ".join(f"{r:.0f}" for r in rates)
        print(f"{f'memstress update rate, {vcpus} vCPU(s), MiB/s':<44} {shown:>12}")  # fmt: skip


if __name__ == "__main__":
    main()
