"""Whole-machine state capture and restore on real KVM, and the serialised format.

A "transplant" below is what a migration destination (or a checkpoint rollback) does:
capture a paused machine, build a NEW machine with create_vcpus(start_all) and no image,
copy guest RAM, restore, start. The guest must carry on as if nothing happened.
"""

from __future__ import annotations

import base64
import ctypes
import io
import json
import re
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guestgen
from pyvmm.kvm import abi
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.elf import load_pvh_image, parse_pvh_image
from pyvmm.machine.errors import MachineError
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.machine.state import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_TSC_KHZ,
    MSR_IA32_TSC,
    MachineState,
    VcpuState,
    VmState,
    capture,
    restore,
)
from pyvmm.machine.vcpu import VcpuRunState as RunState

pytestmark = pytest.mark.kvm

PROGRESS = re.compile(r"memstress vcpu=(\d+) mib=(\d+)")
IN_LOOP_COUNT = 300_000


def in_loop_then_exit(count: int, code: int) -> bytes:
    """`count` times `in al, 0x99` (an unhandled port: one exit each), then exit with code.

    An IN is the instruction KVM completes only on the next KVM_RUN (RAX and RIP), so this
    guest shows whether capture finishes a pending I/O: a lost or repeated IN changes the
    total number of exits across source and destination."""
    # mov ecx, count; loop: in al, 0x99; dec ecx; jnz loop
    return b"\xb9" + struct.pack("<I", count) + b"\xe4\x99\x49\x75\xfb" + guestgen.exit_with(code)


def new_machine(mem_mib: int, vcpus: int, cmdline: str = "") -> tuple[Machine, io.StringIO]:
    out = io.StringIO()
    return Machine(MachineConfig(mem_mib << 20, vcpus, cmdline), SerialConsole(out)), out


def boot(image: str | bytes, mem_mib: int, vcpus: int, cmdline: str = "", **elf_kw):
    if isinstance(image, bytes):
        pvh = parse_pvh_image(guestgen.make_elf(image, **elf_kw), "test-image")
    else:
        pvh = load_pvh_image(resolve_image(image))
    machine, out = new_machine(mem_mib, vcpus, cmdline)
    try:
        machine.boot(pvh)
    except BaseException:
        machine.close()
        raise
    return machine, out


def transplant(src: Machine, state: MachineState) -> tuple[Machine, io.StringIO]:
    """A new machine built the way a destination builds it, with src's RAM and `state`."""
    assert src.memory is not None
    dst, out = new_machine(src.config.mem_bytes >> 20, src.config.vcpus, src.config.cmdline)
    try:
        dst.create_vcpus(start_all=bool(src.config.start_all_vcpus))
        assert dst.memory is not None
        for old, new in zip(src.memory.regions, dst.memory.regions, strict=True):
            new.array[:] = old.array
        restore(dst, state)
    except BaseException:
        dst.close()
        raise
    return dst, out


def progress(text: str) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {}
    for match in PROGRESS.finditer(text):
        seen.setdefault(int(match[1]), []).append(int(match[2]))
    return seen


def wait_progress(out: io.StringIO, vcpus: int, lines: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = progress(out.getvalue())
        if len(seen) == vcpus and all(len(v) >= lines for v in seen.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {lines} progress lines per vCPU: {out.getvalue()!r}")


# --- guests continue on a new VM ---------------------------------------------------------------


def test_memstress_continues_where_it_was_on_a_new_vm() -> None:
    src, src_out = boot("memstress", mem_mib=64, vcpus=2, cmdline="mb=8")
    dst = None
    try:
        src.start()
        wait_progress(src_out, vcpus=2, lines=2)
        src.pause()
        state = capture(src)
        before = progress(src_out.getvalue())
        dst, dst_out = transplant(src, state)
        dst.start()
        wait_progress(dst_out, vcpus=2, lines=2)
        after = progress(dst_out.getvalue())
        assert dst.exit_status is None, dst.exit_status
        assert "start" not in dst_out.getvalue(), "the guest started again instead of continuing"
        for vcpu in (0, 1):
            last_before = before[vcpu][-1]
            assert after[vcpu][0] >= last_before, (vcpu, before[vcpu], after[vcpu])
            assert after[vcpu] == sorted(after[vcpu]) and after[vcpu][-1] > last_before
    finally:
        src.close()
        if dst is not None:
            dst.close()


@pytest.mark.parametrize("start_all", [True, False], ids=["start_all", "irqchip"])
def test_io_loop_continues_without_losing_or_repeating_an_exit(start_all: bool) -> None:
    code = in_loop_then_exit(IN_LOOP_COUNT, 7)
    src, _ = boot(code, mem_mib=16, vcpus=1, start_all=start_all)
    dst = None
    try:
        assert src.irqchip is not start_all
        src.start()
        time.sleep(0.3)
        src.pause()
        src_exits = src.stats().exits_per_vcpu[0]
        assert src.exit_status is None and 0 < src_exits < IN_LOOP_COUNT, src_exits
        state = capture(src)
        dst, _ = transplant(src, state)
        dst.start()
        result = dst.wait(60)
        assert result is not None and (result.code, result.error) == (7, False), result
        # Every IN exits once, plus the exit-port write: none lost, none repeated.
        assert src_exits + dst.stats().exits_per_vcpu[0] == IN_LOOP_COUNT + 1
    finally:
        src.close()
        if dst is not None:
            dst.close()


def test_hello_std_irqchip_state_round_trips_through_kvm() -> None:
    """Standard start: LAPIC, PIC, IOAPIC and PIT captured and restored, AP waiting for SIPI."""
    src, _ = boot("hello-std", mem_mib=64, vcpus=2)
    dst = None
    try:
        state = capture(src)  # right after boot, before start
        assert state.irqchip and all(v.lapic is not None for v in state.vcpus)
        assert state.vcpus[1].mp_state == abi.KVM_MP_STATE_UNINITIALIZED
        data = state.to_bytes()
        dst, dst_out = transplant(src, MachineState.from_bytes(data, vcpus=2, irqchip=True))
        dst.start()
        result = dst.wait(30)
        assert result is not None and (result.code, result.error) == (0, False), result
        assert "hello from pyvmm guest" in dst_out.getvalue()
    finally:
        src.close()
        if dst is not None:
            dst.close()


def test_restore_onto_the_same_machine_rolls_it_back() -> None:
    """A checkpoint rollback (COLO's use): restore an earlier state into the paused machine
    it came from; the guest redoes exactly the work after the checkpoint. (The machine is
    paused with an IN pending; restore completes it first. KVM's fast-PIO path would also
    drop that completion by itself, because RIP changed, so this test cannot tell.)"""
    code = in_loop_then_exit(IN_LOOP_COUNT, 7)
    machine, _ = boot(code, mem_mib=16, vcpus=1, start_all=False)
    try:
        machine.start()
        time.sleep(0.2)
        machine.pause()
        checkpoint = capture(machine)
        at_checkpoint = machine.stats().exits_per_vcpu[0]
        machine.resume()
        time.sleep(0.2)
        machine.pause()
        at_rollback = machine.stats().exits_per_vcpu[0]
        assert machine.exit_status is None and at_checkpoint < at_rollback < IN_LOOP_COUNT
        restore(machine, checkpoint)  # the loop keeps its count in ECX: RAM is unchanged
        machine.resume()
        result = machine.wait(60)
        assert result is not None and (result.code, result.error) == (7, False), result
        redone = machine.stats().exits_per_vcpu[0] - at_rollback
        assert redone == IN_LOOP_COUNT - at_checkpoint + 1
    finally:
        machine.close()


# --- exact round trip --------------------------------------------------------------------------

# kvm_pit_channel_state: count_load_time (s64) at offset 16 of each 24-byte channel.
PIT_CHANNEL_BYTES = ctypes.sizeof(abi.kvm_pit_channel_state)
PIT_LOAD_TIME = abi.kvm_pit_channel_state.count_load_time.offset


def assert_same_state(before: MachineState, after: MachineState) -> None:
    """Equal except what KVM changes by itself as host time passes:
    - MSR 0x10 (guest TSC): counts on with the host TSC; it may only grow;
    - vm.clock (kvmclock ns, realtime, host_tsc): counts on; the clock may only grow;
    - each PIT channel's count_load_time: KVM_SET_PIT2 reloads the counters "now".
    Nothing else may differ, byte for byte (LAPIC included: these guests run no LAPIC timer,
    whose current-count register would also move)."""
    assert len(before.vcpus) == len(after.vcpus)
    for old, new in zip(before.vcpus, after.vcpus, strict=True):
        assert new.msrs.keys() == old.msrs.keys()
        assert new.msrs[MSR_IA32_TSC] >= old.msrs[MSR_IA32_TSC]
        old_rest = {k: v for k, v in old.msrs.items() if k != MSR_IA32_TSC}
        new_rest = {k: v for k, v in new.msrs.items() if k != MSR_IA32_TSC}
        assert new_rest == old_rest
        for name in ("cpuid", "regs", "sregs", "xsave", "fpu", "xcrs", "debugregs", "lapic"):
            assert getattr(new, name) == getattr(old, name), (old.index, name)
        assert (new.index, new.mp_state, new.tsc_khz) == (old.index, old.mp_state, old.tsc_khz)
        assert new.vcpu_events == old.vcpu_events, old.index
    assert after.vm.decode("clock").clock >= before.vm.decode("clock").clock
    for name in ("pic_master", "pic_slave", "ioapic"):
        assert getattr(after.vm, name) == getattr(before.vm, name), name
    if before.vm.pit2 is not None:
        assert after.vm.pit2 is not None

        def without_load_times(data: bytes) -> bytes:
            buf = bytearray(data)
            for ch in range(3):
                start = ch * PIT_CHANNEL_BYTES + PIT_LOAD_TIME
                buf[start : start + 8] = bytes(8)
            return bytes(buf)

        assert without_load_times(after.vm.pit2) == without_load_times(before.vm.pit2)
    assert after.devices == before.devices


@pytest.mark.parametrize("start_all", [True, False], ids=["start_all", "irqchip"])
def test_registers_round_trip_exactly(start_all: bool) -> None:
    code = in_loop_then_exit(IN_LOOP_COUNT, 7)
    src, _ = boot(code, mem_mib=16, vcpus=2, start_all=start_all)
    dst = None
    try:
        src.start()
        time.sleep(0.2)
        src.pause()
        first = capture(src)
        dst, _ = transplant(src, first)
        second = capture(dst)
        assert_same_state(first, second)
        assert second.vcpus[0].decode("regs").rip == first.vcpus[0].decode("regs").rip
    finally:
        src.close()
        if dst is not None:
            dst.close()


def test_memstress_state_round_trips_exactly_in_user_or_kernel_mode() -> None:
    src, src_out = boot("memstress", mem_mib=64, vcpus=2, cmdline="mb=8")
    dst = None
    try:
        src.start()
        wait_progress(src_out, vcpus=2, lines=1)
        src.pause()
        first = capture(src)
        dst, _ = transplant(src, first)
        assert_same_state(first, capture(dst))
    finally:
        src.close()
        if dst is not None:
            dst.close()


# --- refusals on real machines -----------------------------------------------------------------


def test_capture_of_a_running_machine_is_refused() -> None:
    machine, out = boot("memstress", mem_mib=64, vcpus=2, cmdline="mb=8")
    try:
        machine.start()
        wait_progress(out, vcpus=2, lines=1)
        with pytest.raises(MachineError, match=r"Machine\.pause\(\)"):
            capture(machine)
        machine.pause()
        capture(machine)  # fine once paused
        machine.resume()
        deadline = time.monotonic() + 10
        while any(v.state is not RunState.RUNNING for v in machine.vcpus):
            assert time.monotonic() < deadline, "the vCPUs did not resume"
            time.sleep(0.01)
        with pytest.raises(MachineError, match="is running"):
            capture(machine)
    finally:
        machine.close()


def test_restore_refuses_a_different_vcpu_count_or_start_mode() -> None:
    src, _ = boot(guestgen.CLI_HLT, mem_mib=16, vcpus=2, start_all=True)
    try:
        state = capture(src)
        other, _ = new_machine(16, 3)
        try:
            other.create_vcpus(start_all=True)
            with pytest.raises(MachineError, match="state has 2 vCPUs but the machine has 3"):
                restore(other, state)
        finally:
            other.close()
        other, _ = new_machine(16, 2)
        try:
            other.create_vcpus(start_all=False)
            with pytest.raises(MachineError, match=r"start_all=True.*start_all=False"):
                restore(other, state)
        finally:
            other.close()
    finally:
        src.close()


# --- serialisation: real captures --------------------------------------------------------------


@pytest.fixture(scope="module")
def captured() -> tuple[MachineState, MachineState]:
    """(no-irqchip state of a running memstress, irqchip state of a booted hello-std)."""
    src, out = boot("memstress", mem_mib=64, vcpus=2, cmdline="mb=8")
    try:
        src.start()
        wait_progress(out, vcpus=2, lines=1)
        src.pause()
        plain = capture(src)
    finally:
        src.close()
    src, _ = boot("hello-std", mem_mib=64, vcpus=2)
    try:
        with_irqchip = capture(src)
    finally:
        src.close()
    return plain, with_irqchip


def test_real_captures_serialise_exactly(captured: tuple[MachineState, MachineState]) -> None:
    for state in captured:
        data = state.to_bytes()
        back = MachineState.from_bytes(data, vcpus=2, irqchip=state.irqchip)
        assert back == state
        assert back.to_bytes() == data


def test_serialised_format_is_self_describing(captured: tuple[MachineState, MachineState]) -> None:
    doc = json.loads(captured[1].to_bytes())
    assert (doc["format"], doc["version"], doc["vcpu_count"], doc["irqchip"]) == (
        FORMAT_NAME,
        FORMAT_VERSION,
        2,
        True,
    )
    regs = doc["vcpus"][0]["regs"]
    assert regs["struct"] == "kvm_regs" and regs["size"] == ctypes.sizeof(abi.kvm_regs)
    assert len(base64.b64decode(regs["base64"])) == regs["size"]
    assert doc["vm"]["ioapic"]["struct"] == "kvm_irqchip"
    assert all(isinstance(i, int) and isinstance(v, int) for i, v in doc["vcpus"][0]["msrs"])


def mutate(doc: dict, path: tuple, value: object) -> bytes:
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc).encode()


DELETE = object()
BAD_CASES = [
    (("version",), 1, "version: 1 is not supported"),
    (("version",), "1", "version: string is not supported"),
    (("format",), "qemu", "format"),
    (("vcpu_count",), 3, "the state has 3 vCPUs, the machine has 2"),
    (("vcpu_count",), True, "vcpu_count: expected an integer, got boolean"),
    (("irqchip",), 1, "irqchip: expected true or false"),
    (("vcpus",), {}, "vcpus: expected an array, got object"),
    (("vcpus", 1, "index"), 0, r"vcpus\[1\]\.index: is 0, expected 1"),
    (("vcpus", 0, "regs", "size"), 143, "size 143 is wrong for kvm_regs"),
    (("vcpus", 0, "regs", "size"), 10**12, "out of range"),
    (("vcpus", 0, "regs", "struct"), "kvm_sregs", "expected 'kvm_regs'"),
    (("vcpus", 0, "regs", "base64"), "!!!!" * 48, "not valid base64"),
    (("vcpus", 0, "regs", "base64"), "AAAA", "do not encode 144 bytes"),
    (("vcpus", 0, "regs", "base64"), 12, "expected a string"),
    (("vcpus", 0, "regs"), None, "expected an object, got null"),
    (("vcpus", 0, "sregs"), DELETE, "missing key 'sregs'"),
    (("vcpus", 0, "surprise"), 1, "unknown key 'surprise'"),
    (("vcpus", 0, "msrs"), [[16, 2**64]], "out of range 0..18446744073709551615"),
    (("vcpus", 0, "msrs"), [[2**32, 0]], "out of range 0..4294967295"),
    (("vcpus", 0, "msrs"), [[16, 1], [16, 2]], "MSR 0x10 appears twice"),
    (("vcpus", 0, "msrs"), [[16, 1.5]], "expected an integer, got float"),
    (("vcpus", 0, "msrs"), [[16]], r"expected \[index, value\]"),
    (("vcpus", 0, "msrs"), [[1, 1]] * 5000, "5000 MSRs, at most 1024"),
    (("vcpus", 0, "mp_state"), 7, "not an x86 mp_state"),
    (("vcpus", 0, "tsc_khz"), -1, "out of range"),
    (("vcpus", 0, "tsc_khz"), 0x7FFFFFFF, "out of range 0..2147483646"),  # KVM_SET_TSC_KHZ's
    (("vcpus", 0, "tsc_khz"), 2.0e6, "expected an integer, got float"),
    (("devices", "serial", "regs", "1"), [[[[[1]]]]], "nested too deeply"),
    (("vcpus", 0, "lapic"), None, "missing"),
    (("vcpus", 0, "fpu"), {"struct": "kvm_fpu", "size": 416, "base64": "A" * 556}, "both"),
    (("vcpus", 0, "xsave"), None, "neither xsave nor fpu"),
    (("vm", "pit2"), None, r"vm\.pit2: missing \(irqchip is true\)"),
    (("vm", "irqchip"), False, "disagrees"),
    (("devices", "serial", "regs", "1"), 256, "out of range 0..255"),
    (("devices", "serial", "buffers"), {"5": "61"}, "not a vCPU index below 2"),
    (("devices", "serial", "buffers"), {"0": "6" * 9999}, "hex of at most"),
    (("devices", "keyboard"), {}, "unknown key 'keyboard'"),
]


def _case_id(x: object) -> str:
    # Stable across processes (pytest-xdist compares the workers' test ids): no addresses.
    return "DELETE" if x is DELETE else str(x)[:40]


@pytest.mark.parametrize(("path", "value", "message"), BAD_CASES, ids=_case_id)
def test_bad_fields_are_refused_with_one_line(
    captured: tuple[MachineState, MachineState], path: tuple, value: object, message: str
) -> None:
    data = mutate(json.loads(captured[1].to_bytes()), path, value)
    with pytest.raises(MachineError, match=message) as info:
        MachineState.from_bytes(data, vcpus=2, irqchip=True)
    assert "\n" not in str(info.value) and str(info.value).startswith("machine state: ")


def test_irqchip_chip_ids_are_checked(captured: tuple[MachineState, MachineState]) -> None:
    doc = json.loads(captured[1].to_bytes())
    doc["vm"]["pic_master"], doc["vm"]["ioapic"] = doc["vm"]["ioapic"], doc["vm"]["pic_master"]
    with pytest.raises(MachineError, match=r"vm\.pic_master: chip_id 2, expected 0"):
        MachineState.from_bytes(json.dumps(doc).encode(), vcpus=2, irqchip=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b"[" * 9 + b"]" * 9, "nested too deeply"),
        (b"[" + b"[]," * 300_000 + b"[]]", r"JSON values, at most \d+ \(refused unparsed\)"),
        (b'{"a": Infinity}', "Infinity is not allowed"),
        (b'{"a": NaN}', "NaN is not allowed"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b"9" * 5000, "not valid JSON"),
        (b"[]", "top level: expected an object, got array"),
        (b"{}", "missing key"),
        (b" " * (17 << 20), "at most"),
        ("text", "expected bytes, got str"),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_garbage_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(MachineError, match=message):
        MachineState.from_bytes(data, vcpus=2, irqchip=True)


def test_truncated_state_is_refused(captured: tuple[MachineState, MachineState]) -> None:
    data = captured[0].to_bytes()
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(MachineError, match="not valid JSON"):
            MachineState.from_bytes(data[:cut], vcpus=2, irqchip=False)


def test_from_bytes_checks_the_machine_it_is_for(
    captured: tuple[MachineState, MachineState],
) -> None:
    data = captured[0].to_bytes()
    with pytest.raises(MachineError, match="the state has 2 vCPUs, the machine has 4"):
        MachineState.from_bytes(data, vcpus=4, irqchip=False)
    with pytest.raises(MachineError, match="state has irqchip=false, the machine has irqchip=true"):
        MachineState.from_bytes(data, vcpus=2, irqchip=True)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_bytes_only_ever_raise_machine_error(
    captured: tuple[MachineState, MachineState], data: st.DataObject
) -> None:
    state = data.draw(st.sampled_from(captured))
    raw = bytearray(state.to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[pos] = data.draw(st.sampled_from(b'{}[]",:0123456789-.eEtrufalsn \\AZaz+/='))
        elif kind == "delete":
            del raw[pos : pos + data.draw(st.integers(1, 64))]
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(max_size=32))
        else:
            del raw[pos:]
    try:
        MachineState.from_bytes(bytes(raw), vcpus=2, irqchip=state.irqchip)
    except MachineError as exc:
        assert "\n" not in str(exc)


# --- serialisation: generated states -----------------------------------------------------------


def blob(size: int) -> st.SearchStrategy[bytes]:
    """`size` bytes: a short random pattern repeated (kilobytes of pure entropy would exceed
    what hypothesis generates per example), with all 256 byte values possible."""
    return st.binary(min_size=1, max_size=24).map(
        lambda seed: (seed * (size // len(seed) + 1))[:size]
    )


def irqchip_blob(chip_id: int) -> st.SearchStrategy[bytes]:
    return blob(ctypes.sizeof(abi.kvm_irqchip) - 4).map(lambda b: struct.pack("<I", chip_id) + b)


@st.composite
def vcpu_states(draw: st.DrawFn, index: int, irqchip: bool) -> VcpuState:
    entries = draw(st.integers(1, abi.KVM_MAX_CPUID_ENTRIES))
    use_xsave = draw(st.booleans())
    xsave_words = draw(st.integers(1024, 4096))
    return VcpuState(
        index=index,
        cpuid=draw(blob(entries * ctypes.sizeof(abi.kvm_cpuid_entry2))),
        mp_state=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 9])),
        regs=draw(blob(ctypes.sizeof(abi.kvm_regs))),
        sregs=draw(blob(ctypes.sizeof(abi.kvm_sregs))),
        xsave=draw(blob(xsave_words * 4)) if use_xsave else None,
        fpu=None if use_xsave else draw(blob(ctypes.sizeof(abi.kvm_fpu))),
        xcrs=draw(st.none() | blob(ctypes.sizeof(abi.kvm_xcrs))),
        debugregs=draw(blob(ctypes.sizeof(abi.kvm_debugregs))),
        lapic=draw(blob(ctypes.sizeof(abi.kvm_lapic_state))) if irqchip else None,
        msrs=draw(
            st.dictionaries(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), max_size=64)
        ),
        vcpu_events=draw(blob(ctypes.sizeof(abi.kvm_vcpu_events))),
        tsc_khz=draw(st.integers(0, MAX_TSC_KHZ)),
    )


@st.composite
def machine_states(draw: st.DrawFn) -> tuple[MachineState, int]:
    count = draw(st.integers(1, 4))
    irqchip = draw(st.booleans())
    vm = VmState(irqchip=irqchip, clock=draw(blob(ctypes.sizeof(abi.kvm_clock_data))))
    if irqchip:
        vm.pic_master = draw(irqchip_blob(0))
        vm.pic_slave = draw(irqchip_blob(1))
        vm.ioapic = draw(irqchip_blob(2))
        vm.pit2 = draw(blob(ctypes.sizeof(abi.kvm_pit_state2)))
    hexline = st.binary(max_size=64).map(bytes.hex)
    serial = {
        "buffers": draw(st.dictionaries(st.integers(0, count - 1).map(str), hexline)),
        "regs": {k: draw(st.integers(0, 255)) for k in ("1", "3", "4", "7")},
    }
    devices = draw(st.sampled_from([{}, {"serial": serial}]))
    vcpus = [draw(vcpu_states(i, irqchip)) for i in range(count)]
    return MachineState(vcpus, vm, devices), count


@settings(max_examples=60, deadline=None)
@given(machine_states())
def test_generated_states_round_trip_exactly(case: tuple[MachineState, int]) -> None:
    state, count = case
    data = state.to_bytes()
    back = MachineState.from_bytes(data, vcpus=count, irqchip=state.irqchip)
    assert back == state
    assert back.to_bytes() == data
