"""The machine layer on real KVM: boot paths, exits, pause/resume, leaks."""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import numpy as np
import pytest

import guestgen
from helpers import open_fds
from pyvmm.kvm import abi
from pyvmm.machine.elf import load_pvh_image, parse_pvh_image
from pyvmm.machine.errors import ImageError, MachineError
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.machine.memory import HIGH_RAM_START, LOW_RAM_END, GuestMemory
from pyvmm.machine.vcpu import VcpuRunState, describe_fatal_exit

pytestmark = pytest.mark.kvm


def boot(code_or_image, *, mem_mib: int = 16, vcpus: int = 1, cmdline: str = "", **elf_kw):
    if isinstance(code_or_image, bytes):
        image = parse_pvh_image(guestgen.make_elf(code_or_image, **elf_kw), "test-image")
    else:
        image = load_pvh_image(resolve_image(code_or_image))
    out = io.StringIO()
    from pyvmm.machine.devices import SerialConsole

    machine = Machine(MachineConfig(mem_mib << 20, vcpus, cmdline), SerialConsole(out))
    machine.boot(image)
    return machine, out


def run_to_end(code_or_image, timeout_s: float = 20.0, **kw):
    machine, out = boot(code_or_image, **kw)
    try:
        machine.start()
        result = machine.wait(timeout_s)
        assert result is not None, "the VM did not end in time"
        return result, out.getvalue()
    finally:
        machine.close()


@pytest.mark.parametrize(("elf_class", "desc_bytes"), [(64, 4), (64, 8), (32, 4), (32, 8)], ids=str)
def test_elf_classes_and_note_sizes(elf_class: int, desc_bytes: int) -> None:
    result, _ = run_to_end(guestgen.exit_with(7), elf_class=elf_class, entry_desc_bytes=desc_bytes)
    assert (result.code, result.error) == (7, False)


def test_all_vcpus_halted_ends_the_vm() -> None:
    result, _ = run_to_end(guestgen.CLI_HLT, vcpus=3)
    assert (result.code, result.reason) == (0, "all vCPUs halted")


def test_unhandled_port_reads_all_ones() -> None:
    result, _ = run_to_end(guestgen.READ_UNHANDLED_PORT_AND_EXIT)
    assert result.code == 0xFF and not result.error


def test_standard_start_runs_only_the_boot_vcpu() -> None:
    machine, _ = boot(guestgen.CLI_HLT + b"\x90" * 4, vcpus=2, start_all=False)
    try:
        assert machine.irqchip
        machine.start()
        time.sleep(0.3)
        # With the in-kernel LAPIC, HLT stays in the kernel and the AP waits for INIT/SIPI:
        # neither vCPU has exited to pyvmm.
        assert machine.stats().exits_per_vcpu == [0, 0]
        assert machine.wait(0.1) is None
    finally:
        machine.close()


def test_triple_fault_is_a_clear_error() -> None:
    result, _ = run_to_end(guestgen.DIVIDE_ERROR)
    assert result.error and result.code != 0
    assert "triple-faulted" in result.reason and "RIP 0x" in result.reason


def test_invalid_instruction_is_a_clear_error() -> None:
    result, _ = run_to_end(guestgen.UD2)
    assert result.error and "triple-faulted" in result.reason
    assert "RIP 0x100000" in result.reason


@pytest.mark.parametrize(
    ("code", "insn"),
    [(guestgen.SSE_AT_CPL0, guestgen.PXOR), (guestgen.INT3_NO_IDT, b"\xcc")],
    ids=["sse-at-cpl0", "int3-no-idt"],
)
def test_internal_error_reports_suberror_and_instruction_bytes(code: bytes, insn: bytes) -> None:
    machine, _ = boot(code)
    try:
        machine.start()
        result = machine.wait(20)
        assert result is not None, "the VM did not end in time"
        exit_reason = machine.vcpus[0].fd.kvm_run.exit_reason  # the raw exit, not the message
        if exit_reason != abi.KVM_EXIT_INTERNAL_ERROR:
            name = abi.EXIT_REASON_NAMES.get(exit_reason, str(exit_reason))
            pytest.skip(
                f"this host's KVM handled {insn.hex(' ')} at CPL0 without an emulation "
                f"failure (last exit KVM_EXIT_{name}): it runs guest kernel code in hardware, "
                "so this guest cannot make it report KVM_EXIT_INTERNAL_ERROR"
            )
        rip = guestgen.LOAD_ADDR + code.index(insn)
        match = re.fullmatch(
            r"KVM internal error \(KVM_EXIT_INTERNAL_ERROR, suberror 1 \(emulation failure\), "
            r"instruction bytes ((?:[0-9a-f]{2} ?)+)\) on vCPU 0 at RIP 0x([0-9a-f]+)",
            result.reason,
        )
        assert match, result.reason
        assert (result.error, result.code) == (True, 1)
        assert int(match.group(2), 16) == rip
        reported = bytes.fromhex(match.group(1))
        # The bytes KVM fetched are the guest's own, from the failing instruction on.
        assert reported.startswith(insn)
        assert reported == machine.memory.read(rip, len(reported))
    finally:
        machine.close()


def test_fatal_exit_decoder_on_a_synthetic_kvm_run() -> None:
    run = abi.kvm_run()
    run.exit_reason = abi.KVM_EXIT_INTERNAL_ERROR
    emu = run.exit.emulation_failure
    emu.suberror, emu.ndata = abi.KVM_INTERNAL_ERROR_EMULATION, 3
    emu.flags = abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    emu.insn_size = 4
    emu.insn_bytes[:4] = list(guestgen.PXOR)
    assert describe_fatal_exit(run, "vCPU 3 at RIP 0x1000") == (
        "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror 1 (emulation failure), "
        "instruction bytes 66 0f ef c0) on vCPU 3 at RIP 0x1000"
    )
    emu.flags = 0  # KVM did not say it filled in the bytes: none are reported
    assert describe_fatal_exit(run, "vCPU 3").endswith("suberror 1 (emulation failure)) on vCPU 3")
    internal = run.exit.internal
    internal.suberror, internal.ndata = 3, 2  # KVM_INTERNAL_ERROR_DELIVERY_EV
    internal.data[0], internal.data[1] = 0x80000B0D, 0x10
    assert describe_fatal_exit(run, "vCPU 0") == (
        "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror 3, data 0x80000b0d 0x10) on vCPU 0"
    )
    run.exit_reason = abi.KVM_EXIT_SHUTDOWN
    assert describe_fatal_exit(run, "vCPU 0").startswith("guest triple-faulted (KVM_EXIT_SHUTDOWN)")


def test_hello_prints_a_timestamped_line_and_exits_zero() -> None:
    result, out = run_to_end("hello", mem_mib=64)
    assert (result.code, result.error) == (0, False)
    assert re.fullmatch(r"\[\d{10}\.\d{6}\] hello from pyvmm guest\n", out), out


def test_hello_std_boots_through_the_standard_start() -> None:
    machine, out = boot("hello-std", mem_mib=64, vcpus=2)
    try:
        assert machine.irqchip
        machine.start()
        result = machine.wait(20)
        assert result is not None and result.code == 0
        assert "hello from pyvmm guest" in out.getvalue()
    finally:
        machine.close()


def test_memstress_lines_from_two_vcpus_never_interleave() -> None:
    machine, out = boot("memstress", mem_mib=256, vcpus=2, cmdline="mb=32")
    try:
        machine.start()
        time.sleep(2.5)
        lines = out.getvalue().splitlines()
        progress = [line for line in lines if "mib=" in line]
        assert {re.search(r"vcpu=(\d)", line).group(1) for line in progress} == {"0", "1"}
        for line in lines:
            assert re.fullmatch(r"\[\d+\.\d{6}\] memstress[ :][ -~]*", line), line
            assert line.count("memstress") == 1, line
    finally:
        machine.close()


def test_guest_sees_tsc_frequency_and_vcpu_count() -> None:
    machine, out = boot("memstress", mem_mib=128, vcpus=2, cmdline="mb=8")
    try:
        machine.start()
        deadline = time.monotonic() + 10
        while "tsc_khz=" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = out.getvalue()
        assert f"tsc_khz={machine.tsc_khz}" in text and "vcpus=2" in text, text
    finally:
        machine.close()


def test_memstress_too_big_exits_with_code_2() -> None:
    result, out = run_to_end("memstress", mem_mib=64, vcpus=2, cmdline="mb=64")
    assert result.code == 2 and "does not fit" in out


def test_pause_stops_the_guest_and_resume_restarts_it() -> None:
    machine, _ = boot("memstress", mem_mib=128, vcpus=2, cmdline="mb=16")
    try:
        machine.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        machine.pause()
        pause_ms = (time.monotonic() - t0) * 1000
        assert all(v.state is VcpuRunState.PAUSED for v in machine.vcpus)
        assert pause_ms < 500, pause_ms
        ram = machine.memory.regions[0].array
        before = ram.copy()
        time.sleep(0.5)
        assert np.array_equal(before, ram), "guest memory changed while paused"
        machine.resume()
        time.sleep(0.5)
        assert not np.array_equal(before, ram), "guest did not run after resume"
    finally:
        machine.close()


def test_create_destroy_cycles_leak_no_fds_or_threads() -> None:
    run_to_end("hello", mem_mib=32)  # warm up lazily created objects
    fds, threads = open_fds(), threading.active_count()
    for _ in range(50):
        result, _ = run_to_end("hello", mem_mib=32, vcpus=2)
        assert result.code == 0
    assert open_fds() == fds
    assert threading.active_count() == threads


def test_memory_layout_splits_around_the_hole() -> None:
    memory = GuestMemory(LOW_RAM_END + (256 << 20))
    try:
        assert [(r.gpa, r.size_bytes) for r in memory.regions] == [
            (0, LOW_RAM_END),
            (HIGH_RAM_START, 256 << 20),
        ]
        memory.write(HIGH_RAM_START + 4096, b"abc")
        assert memory.read(HIGH_RAM_START + 4096, 3) == b"abc"
        assert memory.vmm_dirty[1][0] == 2  # page 1 of slot 1 marked dirty
        with pytest.raises(MachineError, match="outside guest RAM"):
            memory.read(LOW_RAM_END + 5, 1)
        with pytest.raises(MachineError, match="outside guest RAM"):
            memory.write(LOW_RAM_END - 2, b"abcd")  # crosses into the hole
    finally:
        memory.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an ELF"),
        (b"MZ" + b"\0" * 100, "not an ELF"),
        (guestgen.make_elf(guestgen.CLI_HLT, pvh_note=False), "no PVH entry note"),
        (guestgen.make_elf(guestgen.CLI_HLT)[:70], "truncated ELF"),
        (guestgen.make_elf(guestgen.CLI_HLT)[:-20], "truncated ELF"),
    ],
    ids=["empty", "not-elf", "no-note", "truncated-headers", "truncated-notes"],
)
def test_bad_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_pvh_image(data, "bad.elf")


def test_segment_outside_ram_is_refused() -> None:
    with pytest.raises(ImageError, match=r"outside guest RAM.*--mem of at least 17M"):
        boot(guestgen.CLI_HLT, mem_mib=16, load_addr=0x1000000)


def test_invalid_ring_size_fails_before_any_vcpu() -> None:
    image = parse_pvh_image(guestgen.make_elf(guestgen.CLI_HLT))
    with Machine(MachineConfig(16 << 20, 1, dirty_ring_entries=1000)) as machine:
        with pytest.raises(MachineError, match="power of two"):
            machine.boot(image)
        assert machine.vcpus == []


# --- control from any thread, at any moment, also re-entrantly ---------------------------------


def reenter_at_every_opcode(outer: Callable[[], object], inner: Callable[[], object]) -> int:
    """Run outer() with inner() injected at every bytecode boundary of every Python frame
    outer reaches, as a signal handler may run there; returns how many times inner ran.

    Runs on a worker thread, so that a deadlock fails the test instead of hanging it."""
    injected, busy, errors = [0], [False], []

    def tracer(frame: FrameType, event: str, arg: object) -> object:
        if busy[0]:
            return None  # inner's own frames run untraced, as a handler's would
        frame.f_trace_opcodes = True
        if event == "opcode":
            busy[0] = True
            try:
                inner()
                injected[0] += 1
            finally:
                busy[0] = False
        return tracer

    def body() -> None:
        sys.settrace(tracer)
        try:
            outer()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)
        finally:
            sys.settrace(None)

    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "deadlock: outer() never returned with inner() re-entering"
    if errors:
        raise errors[0]
    return injected[0]


def paused_machine(vcpus: int = 2) -> Machine:
    machine, _ = boot("memstress", mem_mib=64, vcpus=vcpus, cmdline="mb=8 rate=16")
    machine.start(paused=True)  # vCPU threads exist (kicks signal them) but run no guest
    return machine


def test_request_exit_reentered_at_every_opcode_neither_deadlocks_nor_loses_the_exit(
    caplog,
) -> None:
    machine = paused_machine()
    try:
        with caplog.at_level(logging.INFO, logger="pyvmm.machine.machine"):
            count = reenter_at_every_opcode(
                lambda: machine.request_exit(0, "outer"), lambda: machine.request_exit(0, "inner")
            )
        assert count > 20  # the injection really reached inside
        result = machine.wait(1.0)
        assert result is not None and result.reason in ("outer", "inner")
        assert machine.exit_status is result
        ends = [r for r in caplog.records if r.getMessage().startswith("VM ends")]
        assert len(ends) == 1, "exactly one caller wins"
    finally:
        machine.close()


def test_vcpu_controls_reentered_at_every_opcode_of_close_are_harmless() -> None:
    machine = paused_machine()
    vcpus = list(machine.vcpus)  # what another thread would still hold during close

    def poke() -> None:
        for vcpu in vcpus:
            vcpu.kick()
            vcpu.wake()
            vcpu.request_pause()
            vcpu.resume()
            vcpu.request_stop()
        machine.request_exit(0, "poked")

    fds = open_fds()
    count = reenter_at_every_opcode(machine.close, poke)
    assert count > 200
    assert machine.vcpus == [] and all(v.fd.closed for v in vcpus)
    assert open_fds() < fds  # the vCPU, VM and /dev/kvm fds really closed
    poke()  # and after close, too


def hammer_during_close(machine: Machine, threads: int = 3) -> None:
    """Threads that kick, pause, resume and end the VM without pause while close() runs,
    and well after it; any exception in them fails the test."""
    vcpus = list(machine.vcpus)
    closed, errors, after_close = threading.Event(), [], [0]

    def hammer() -> None:
        try:
            while after_close[0] < 200:
                for vcpu in vcpus:
                    vcpu.kick()
                    vcpu.wake()
                    vcpu.request_pause()
                    vcpu.resume()
                machine.request_exit(0, "hammered")
                if closed.is_set():
                    after_close[0] += 1
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    machine.close()
    closed.set()
    for worker in workers:
        worker.join(10)
    assert not any(worker.is_alive() for worker in workers)
    assert not errors, repr(errors[0])


def test_threads_hammering_controls_during_close() -> None:
    fds = open_fds()
    for _ in range(20):
        machine, _ = boot("memstress", mem_mib=64, vcpus=2, cmdline="mb=8 rate=16")
        machine.start()
        hammer_during_close(machine)
        assert machine.exit_status is not None and machine.exit_status.reason == "hammered"
    assert open_fds() == fds
