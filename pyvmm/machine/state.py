"""Whole-machine state: capture a paused VM's vCPU, VM and device state, restore it elsewhere.

What is captured and why, the capture and restore orders and the serialised format are
explained in docs/machine-state.md. In short:

- `capture(machine)` reads everything KVM and pyvmm's devices hold for a guest to continue
  (guest RAM excepted: the caller moves RAM). Every vCPU must be out of KVM_RUN
  (`Machine.pause()`, or not started yet).
- `restore(machine, state)` writes it into a machine whose vCPUs were created by
  `Machine.create_vcpus(start_all)` with the same vCPU count and start mode.
- `MachineState.to_bytes()` / `MachineState.from_bytes()` are a versioned JSON format in
  which every KVM struct travels as the kernel's raw bytes (base64) with its name and size.
  `from_bytes` treats its input as hostile: anything malformed is a one-line MachineError.

Nothing here knows about migration; checkpointing (COLO) uses the same calls.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import errno
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvmm.kvm import KvmError, abi
from pyvmm.machine.devices import MAX_LINE_BYTES, SerialConsole
from pyvmm.machine.errors import MachineError
from pyvmm.machine.strictjson import JsonReader, type_name
from pyvmm.machine.uart import FIFO_MAX_BYTES, STATE_REGS
from pyvmm.machine.vcpu import VcpuRunState as RunState

if TYPE_CHECKING:
    from pyvmm.kvm import VcpuFd
    from pyvmm.machine.machine import Machine
    from pyvmm.machine.vcpu import Vcpu

log = logging.getLogger(__name__)

FORMAT_NAME = "pyvmm-machine-state"
FORMAT_VERSION = 2  # 2: devices.serial2 (COM2, uart.py)
MAX_STATE_BYTES = 16 << 20  # far above 64 vCPUs' worth (about 25 KiB each)
MAX_VCPUS = 64  # Machine's own limit
MAX_MSRS = 1024  # per vCPU; KVM_GET_MSR_INDEX_LIST has about 40 here, a few hundred at most
MSR_CHUNK = 255  # KVM_GET/SET_MSRS refuse nmsrs >= MAX_IO_MSRS (256)
MAX_XSAVE_BYTES = 64 << 10  # KVM_CAP_XSAVE2 is 4096 here, about 11 KiB with AMX
# KVM_SET_TSC_KHZ takes a u32 and refuses values >= kvm_caps.max_guest_tsc_khz, which
# __kvm_x86_vendor_init (arch/x86/kvm/x86.c) caps at 0x7fffffff so that the value fits a
# signed int (KVM_GET_TSC_KHZ returns it as the ioctl's int result): 0x7ffffffe is the
# largest rate any host accepts (about 2.1 THz). 0 means "the host's rate".
MAX_TSC_KHZ = 0x7FFFFFFE
TSC_KHZ_TOLERANCE = 250e-6  # QEMU's and Firecracker's tolerance before rescaling the TSC
PENDING_IO_MAX_EXITS = 64  # exits a pending I/O may take to complete before we give up
KVM_RUN_IMMEDIATE_EXIT = abi.KVM_RUN_IMMEDIATE_EXIT_OFFSET

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
APIC_LVTT = 0x320  # LVT timer register in the LAPIC page
APIC_LVT_MASKED = 1 << 16
APIC_LVT_TIMER_MODE_MASK = 3 << 17
APIC_LVT_TIMER_TSCDEADLINE = 2 << 17

KNOWN_EVENT_FLAGS = (
    abi.KVM_VCPUEVENT_VALID_NMI_PENDING
    | abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    | abi.KVM_VCPUEVENT_VALID_SHADOW
    | abi.KVM_VCPUEVENT_VALID_SMM
    | abi.KVM_VCPUEVENT_VALID_PAYLOAD
    | abi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT
)
# x86 mp_state values: RUNNABLE, UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED,
# AP_RESET_HOLD (5) and SUSPENDED (9). KVM checks the rest (e.g. only RUNNABLE without
# an in-kernel LAPIC).
KNOWN_MP_STATES = frozenset({0, 1, 2, 3, 4, 5, 9})

CPUID_ENTRY_BYTES = ctypes.sizeof(abi.kvm_cpuid_entry2)
SERIAL_REGS = ("1", "3", "4", "7")  # IER, LCR, MCR, SCR: what SerialConsole keeps
KNOWN_DEVICES = frozenset({"serial", "serial2"})
SERIAL2_KEYS = frozenset({"rx", "rx_end", "tx", "tx_end", "regs"})
MAX_STREAM_OFFSET = (1 << 63) - 1


# --- the state ---------------------------------------------------------------------------------


@dataclass
class VcpuState:
    """One vCPU. Every bytes field is the kernel's struct, byte for byte."""

    index: int
    cpuid: bytes  # kvm_cpuid_entry2 x n (KVM_GET_CPUID2's entries, without the header)
    mp_state: int
    regs: bytes  # kvm_regs
    sregs: bytes  # kvm_sregs
    xsave: bytes | None  # kvm_xsave (4096 bytes, or KVM_CAP_XSAVE2's size); None: see fpu
    fpu: bytes | None  # kvm_fpu, only when the host has no KVM_CAP_XSAVE
    xcrs: bytes | None  # kvm_xcrs, None when the host has no KVM_CAP_XCRS
    debugregs: bytes  # kvm_debugregs
    lapic: bytes | None  # kvm_lapic_state, only with the in-kernel irqchip
    msrs: dict[int, int]  # index -> value, in the order KVM listed them
    vcpu_events: bytes  # kvm_vcpu_events
    tsc_khz: int

    def decode(self, name: str) -> ctypes.Structure:
        """A ctypes copy of one struct field (regs, sregs, vcpu_events, ...)."""
        return _decode(_VCPU_STRUCTS[name], getattr(self, name), name)


@dataclass
class VmState:
    """VM-wide KVM state. The irqchip fields are present exactly when irqchip is True."""

    irqchip: bool
    clock: bytes  # kvm_clock_data
    pic_master: bytes | None = None  # kvm_irqchip, chip_id 0
    pic_slave: bytes | None = None  # kvm_irqchip, chip_id 1
    ioapic: bytes | None = None  # kvm_irqchip, chip_id 2
    pit2: bytes | None = None  # kvm_pit_state2

    def decode(self, name: str) -> ctypes.Structure:
        return _decode(_VM_STRUCTS[name], getattr(self, name), name)


@dataclass
class MachineState:
    vcpus: list[VcpuState]
    vm: VmState
    devices: dict[str, Any] = field(default_factory=dict)  # JSON values: {"serial": {...}}

    @property
    def irqchip(self) -> bool:
        return self.vm.irqchip

    def to_bytes(self) -> bytes:
        """The versioned JSON form (docs/machine-state.md, "Serialised format")."""
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "vcpu_count": len(self.vcpus),
            "irqchip": self.vm.irqchip,
            "vcpus": [_vcpu_to_json(v) for v in self.vcpus],
            "vm": {
                name: _struct_to_json(spec, getattr(self.vm, name))
                for name, spec in _VM_STRUCTS.items()
            },
            "devices": self.devices,
        }
        doc["vm"]["irqchip"] = self.vm.irqchip
        return json.dumps(doc, separators=(",", ":"), sort_keys=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, vcpus: int, irqchip: bool) -> MachineState:
        """Parse and validate serialised state for a machine with `vcpus` vCPUs and the
        given irqchip (start_all=False) setting. Any defect is a one-line MachineError."""
        return _parse(data, vcpus, irqchip)


# Struct fields: name in the dataclass -> (struct name in the format, ctype, fixed size).
@dataclass(frozen=True)
class _Spec:
    struct: str
    ctype: type[ctypes.Structure] | None
    size: int | None  # None: variable (cpuid entries, xsave)


_VCPU_STRUCTS: dict[str, _Spec] = {
    "cpuid": _Spec("kvm_cpuid_entry2[]", None, None),
    "regs": _Spec("kvm_regs", abi.kvm_regs, ctypes.sizeof(abi.kvm_regs)),
    "sregs": _Spec("kvm_sregs", abi.kvm_sregs, ctypes.sizeof(abi.kvm_sregs)),
    "xsave": _Spec("kvm_xsave", None, None),
    "fpu": _Spec("kvm_fpu", abi.kvm_fpu, ctypes.sizeof(abi.kvm_fpu)),
    "xcrs": _Spec("kvm_xcrs", abi.kvm_xcrs, ctypes.sizeof(abi.kvm_xcrs)),
    "debugregs": _Spec("kvm_debugregs", abi.kvm_debugregs, ctypes.sizeof(abi.kvm_debugregs)),
    "lapic": _Spec("kvm_lapic_state", abi.kvm_lapic_state, ctypes.sizeof(abi.kvm_lapic_state)),
    "vcpu_events": _Spec(
        "kvm_vcpu_events", abi.kvm_vcpu_events, ctypes.sizeof(abi.kvm_vcpu_events)
    ),
}
_VM_STRUCTS: dict[str, _Spec] = {
    "clock": _Spec("kvm_clock_data", abi.kvm_clock_data, ctypes.sizeof(abi.kvm_clock_data)),
    "pic_master": _Spec("kvm_irqchip", abi.kvm_irqchip, ctypes.sizeof(abi.kvm_irqchip)),
    "pic_slave": _Spec("kvm_irqchip", abi.kvm_irqchip, ctypes.sizeof(abi.kvm_irqchip)),
    "ioapic": _Spec("kvm_irqchip", abi.kvm_irqchip, ctypes.sizeof(abi.kvm_irqchip)),
    "pit2": _Spec("kvm_pit_state2", abi.kvm_pit_state2, ctypes.sizeof(abi.kvm_pit_state2)),
}
_IRQCHIP_IDS = {
    "pic_master": abi.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": abi.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": abi.KVM_IRQCHIP_IOAPIC,
}


def _decode(spec: _Spec, data: bytes | None, name: str) -> ctypes.Structure:
    if spec.ctype is None or data is None:
        raise MachineError(f"machine state: {name} has no fixed struct to decode")
    return spec.ctype.from_buffer_copy(data)


# --- capture -----------------------------------------------------------------------------------


def _check_stopped(machine: Machine, action: str) -> None:
    """Every vCPU must be out of KVM_RUN for good: paused, finished, stopped or never started."""
    if not machine.vcpus:
        raise MachineError(f"{action}: the machine has no vCPUs (boot or create_vcpus first)")
    for vcpu in machine.vcpus:
        state = vcpu.state
        parked = state in (RunState.PAUSED, RunState.FINISHED, RunState.STOPPED)
        never_started = state is RunState.CREATED and vcpu.thread is None
        if not (parked or never_started):
            raise MachineError(
                f"{action} needs every vCPU paused, but vCPU {vcpu.index} is {state.value}: "
                "call Machine.pause() first"
            )


def _complete_pending_io(machine: Machine, vcpu: Vcpu, action: str) -> None:
    """Finish an I/O exit KVM has not completed yet, without running guest code.

    After a port-I/O or MMIO exit KVM completes the instruction (stores an IN's data in
    RAX, advances RIP) only on the next KVM_RUN, and that half-done state is not in any
    register KVM_GET_* returns (api.rst, KVM_RUN). A vCPU paused right after such an exit
    would be captured with RIP still on the instruction and RAX stale (seen here with an
    `in` loop: the restored guest executed the IN twice). KVM's documented remedy: KVM_RUN
    with immediate_exit set completes the operation and returns EINTR before any guest
    instruction runs. It is issued from this thread while the vCPU's own thread is parked.
    Restore needs it too when the machine has run (a checkpoint rollback): a completion
    left pending would otherwise be applied on top of the restored registers.
    """
    if vcpu.thread is None:  # never ran: nothing can be pending
        return
    fd = vcpu.fd
    mm = fd.run_mmap
    try:
        for _ in range(PENDING_IO_MAX_EXITS):
            mm[KVM_RUN_IMMEDIATE_EXIT] = 1
            result, reason, direction, size, port, count, offset = fd.run_decoded()
            if result == -errno.EINTR:
                return
            if result < 0:
                raise MachineError(
                    f"{action}: vCPU {vcpu.index}: KVM_RUN to complete pending I/O failed: "
                    f"errno {-result}"
                )
            if reason != abi.KVM_EXIT_IO:
                name = abi.EXIT_REASON_NAMES.get(reason, str(reason))
                raise MachineError(
                    f"{action}: vCPU {vcpu.index}: exit KVM_EXIT_{name} while completing "
                    "pending I/O; resume the machine and pause it again"
                )
            # A string instruction (rep ins/outs) can need further exits before it is done.
            if direction == abi.KVM_EXIT_IO_OUT:
                machine.bus.io_out(vcpu, port, mm[offset : offset + size * count])
            else:
                for i in range(count):
                    start = offset + i * size
                    mm[start : start + size] = machine.bus.io_in(vcpu, port, size)
        raise MachineError(
            f"{action}: vCPU {vcpu.index}: pending I/O still incomplete after "
            f"{PENDING_IO_MAX_EXITS} exits"
        )
    finally:
        mm[KVM_RUN_IMMEDIATE_EXIT] = 0


def complete_pending_io(machine: Machine, action: str = "complete pending I/O") -> None:
    """Finish every vCPU's half-done I/O instruction now (see _complete_pending_io). A
    COLO secondary does this before it rolls its RAM back: a completed `rep insb` writes
    guest RAM, and that write must land before the rollback, not on top of it."""
    _check_stopped(machine, action)
    for vcpu in machine.vcpus:
        _complete_pending_io(machine, vcpu, action)


def capture(machine: Machine) -> MachineState:
    """The whole machine's state. Valid only while every vCPU is paused (or never started).

    Order (docs/machine-state.md): complete pending I/O; KVM_GET_CLOCK (guest time at the
    pause); per vCPU MP_STATE, REGS, SREGS, XSAVE/FPU, XCRS, DEBUGREGS, LAPIC, TSC_KHZ,
    CPUID2, MSRs, VCPU_EVENTS; then PIT2 and IRQCHIP x3; then devices.
    """
    _check_stopped(machine, "capture")
    for vcpu in machine.vcpus:
        _complete_pending_io(machine, vcpu, "capture")
    try:
        clock = bytes(machine.vm.get_clock())
        msr_indices = list(dict.fromkeys(machine.kvm.msr_index_list()))
        has_xsave = bool(machine.vm.check_extension(abi.KVM_CAP_XSAVE))
        xsave_bytes = _xsave_size(machine)
        has_xcrs = bool(machine.vm.check_extension(abi.KVM_CAP_XCRS))
    except KvmError as exc:
        raise MachineError(f"capture: {exc}") from None
    vcpus = [
        _capture_vcpu(machine, v, msr_indices, has_xsave, xsave_bytes, has_xcrs)
        for v in machine.vcpus
    ]
    vm = VmState(irqchip=machine.irqchip, clock=clock)
    if machine.irqchip:
        try:
            vm.pit2 = bytes(machine.vm.get_pit2())
            vm.pic_master = bytes(machine.vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER))
            vm.pic_slave = bytes(machine.vm.get_irqchip(abi.KVM_IRQCHIP_PIC_SLAVE))
            vm.ioapic = bytes(machine.vm.get_irqchip(abi.KVM_IRQCHIP_IOAPIC))
        except KvmError as exc:
            raise MachineError(f"capture: VM: {exc}") from None
    devices: dict[str, Any] = {"serial": _serial_state(machine.serial)}
    if machine.serial2 is not None:
        devices["serial2"] = machine.serial2.get_state()
    log.debug("captured %d vCPUs (irqchip %s)", len(vcpus), machine.irqchip)
    return MachineState(vcpus, vm, devices)


def _xsave_size(machine: Machine) -> int:
    """Bytes of a kvm_xsave buffer: 4096, or more when KVM_CAP_XSAVE2 says so (AMX)."""
    return max(ctypes.sizeof(abi.kvm_xsave), machine.vm.check_extension(abi.KVM_CAP_XSAVE2))


def _capture_vcpu(
    machine: Machine,
    vcpu: Vcpu,
    msr_indices: list[int],
    has_xsave: bool,
    xsave_bytes: int,
    has_xcrs: bool,
) -> VcpuState:
    fd = vcpu.fd
    try:
        # GET_MP_STATE first: it may process a pending INIT/SIPI and so change CS:RIP and
        # the LAPIC, which everything after it must see.
        mp_state = fd.get_mp_state()
        regs = bytes(fd.get_regs())
        sregs = bytes(fd.get_sregs())
        xsave = fpu = None
        if has_xsave:
            xsave = _get_xsave(fd, xsave_bytes)
        else:
            fpu = bytes(fd.get_fpu())
        xcrs = bytes(fd.get_xcrs()) if has_xcrs else None
        debugregs = bytes(fd.get_debugregs())
        lapic = bytes(fd.get_lapic()) if machine.irqchip else None
        tsc_khz = fd.get_tsc_khz()
        cpuid = b"".join(bytes(entry) for entry in fd.get_cpuid2())
        msrs = _read_msrs(fd, vcpu.index, msr_indices)
        # Last: the pending/injected event state is what everything above leaves behind.
        vcpu_events = bytes(fd.get_vcpu_events())
    except KvmError as exc:
        raise MachineError(f"capture: vCPU {vcpu.index}: {exc}") from None
    return VcpuState(
        index=vcpu.index,
        cpuid=cpuid,
        mp_state=mp_state,
        regs=regs,
        sregs=sregs,
        xsave=xsave,
        fpu=fpu,
        xcrs=xcrs,
        debugregs=debugregs,
        lapic=lapic,
        msrs=msrs,
        vcpu_events=vcpu_events,
        tsc_khz=tsc_khz,
    )


def _get_xsave(fd: VcpuFd, size: int) -> bytes:
    if size == ctypes.sizeof(abi.kvm_xsave):
        return bytes(fd.get_xsave())
    # A larger XSAVE area (AMX) needs KVM_GET_XSAVE2 with a buffer of KVM_CAP_XSAVE2 bytes.
    return fd.get_xsave2(size)


def _set_xsave(fd: VcpuFd, data: bytes) -> None:
    if len(data) == ctypes.sizeof(abi.kvm_xsave):
        fd.set_xsave(abi.kvm_xsave.from_buffer_copy(data))
        return
    # KVM_SET_XSAVE reads KVM_CAP_XSAVE2 bytes from the buffer when that is larger.
    fd.set_xsave_bytes(data)


def _read_msrs(fd: VcpuFd, vcpu_index: int, indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS over the whole list. KVM stops at the first MSR it cannot read and
    returns how many it did; skip that one and go on, so one bad MSR loses nothing else."""
    values: dict[int, int] = {}
    skipped: list[int] = []
    pending = indices
    while pending:
        chunk = pending[:MSR_CHUNK]
        got = fd.get_msrs(chunk)
        values.update(got)
        done = len(got)
        if done < len(chunk):
            skipped.append(chunk[done])
            done += 1
        pending = pending[done:]
    if skipped:
        log.info(
            "vCPU %d: KVM could not read MSR(s) %s; not captured",
            vcpu_index,
            ", ".join(f"0x{i:x}" for i in skipped),
        )
    return values


def _serial_state(serial: SerialConsole) -> dict[str, Any]:
    """SerialConsole.get_state() in its JSON form (string keys), so a round trip is exact."""
    raw = serial.get_state()
    return {
        "buffers": {str(k): str(v) for k, v in raw["buffers"].items()},
        "regs": {str(k): int(v) for k, v in raw["regs"].items()},
    }


# --- restore -----------------------------------------------------------------------------------


def restore(machine: Machine, state: MachineState) -> None:
    """Write `state` into `machine`, whose vCPUs came from Machine.create_vcpus(start_all)
    with the same count and start mode and are not running. Guest RAM is the caller's.

    A machine that has run (a checkpoint rollback) must be paused; its RAM is the
    caller's to put back too.

    Order (docs/machine-state.md): complete pending I/O; per vCPU CPUID2, MP_STATE, REGS,
    SREGS, XSAVE/FPU, XCRS, DEBUGREGS, LAPIC, MSRs (TSC first, TSC_DEADLINE last),
    VCPU_EVENTS; then PIT2, CLOCK, IRQCHIP x3; then devices; then KVMCLOCK_CTRL per vCPU.
    """
    _check_stopped(machine, "restore")
    _check_compatible(machine, state)
    for vcpu in machine.vcpus:
        _complete_pending_io(machine, vcpu, "restore")
    _match_tsc_khz(machine, state)
    for vcpu, vstate in zip(machine.vcpus, state.vcpus, strict=True):
        _restore_vcpu(machine, vcpu, vstate)
    _restore_vm(machine, state.vm)
    _restore_devices(machine, state.devices)
    for vcpu in machine.vcpus:
        try:
            vcpu.fd.kvmclock_ctrl()
        except KvmError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: the guest never enabled kvmclock
                raise MachineError(f"restore: vCPU {vcpu.index}: {exc}") from None
    log.debug("restored %d vCPUs (irqchip %s)", len(state.vcpus), state.irqchip)


def _check_compatible(machine: Machine, state: MachineState) -> None:
    if len(machine.vcpus) != len(state.vcpus):
        raise MachineError(
            f"restore: the state has {len(state.vcpus)} vCPUs but the machine has "
            f"{len(machine.vcpus)}"
        )
    if machine.irqchip != state.irqchip:
        raise MachineError(
            f"restore: the state was captured with start_all={not state.irqchip} "
            f"(in-kernel irqchip {state.irqchip}) but the machine was created with "
            f"start_all={not machine.irqchip} (in-kernel irqchip {machine.irqchip})"
        )
    _check_consistent(state)
    try:
        has_xsave = bool(machine.vm.check_extension(abi.KVM_CAP_XSAVE))
        xsave_bytes = _xsave_size(machine)
        has_xcrs = bool(machine.vm.check_extension(abi.KVM_CAP_XCRS))
    except KvmError as exc:
        raise MachineError(f"restore: {exc}") from None
    for vs in state.vcpus:
        if vs.xsave is not None:
            if not has_xsave:
                raise MachineError(
                    f"restore: vCPU {vs.index} has XSAVE state but this host has no KVM_CAP_XSAVE"
                )
            if len(vs.xsave) != xsave_bytes:
                raise MachineError(
                    f"restore: vCPU {vs.index}: XSAVE area is {len(vs.xsave)} bytes, this "
                    f"host's is {xsave_bytes} (hosts with different XSAVE features)"
                )
        if vs.xcrs is not None and not has_xcrs:
            raise MachineError(
                f"restore: vCPU {vs.index} has XCRs but this host has no KVM_CAP_XCRS"
            )


def _check_consistent(state: MachineState) -> None:
    """The invariants from_bytes guarantees, for states built in code."""
    for i, vs in enumerate(state.vcpus):
        if vs.index != i:
            raise MachineError(f"restore: vCPU state {i} has index {vs.index}")
        if (vs.xsave is None) == (vs.fpu is None):
            raise MachineError(f"restore: vCPU {i} needs exactly one of xsave and fpu")
        if (vs.lapic is not None) != state.irqchip:
            raise MachineError(f"restore: vCPU {i}: lapic present must equal irqchip")
        for name, spec in _VCPU_STRUCTS.items():
            data = getattr(vs, name)
            if data is not None and spec.size is not None and len(data) != spec.size:
                raise MachineError(
                    f"restore: vCPU {i}: {name} is {len(data)} bytes, expected {spec.size}"
                )
        if len(vs.cpuid) % CPUID_ENTRY_BYTES or not vs.cpuid:
            raise MachineError(f"restore: vCPU {i}: cpuid is {len(vs.cpuid)} bytes")
    for name, spec in _VM_STRUCTS.items():
        data = getattr(state.vm, name)
        wanted = name == "clock" or state.irqchip
        if (data is not None) != wanted or (data is not None and len(data) != spec.size):
            raise MachineError(f"restore: VM {name} does not fit irqchip={state.irqchip}")


def _match_tsc_khz(machine: Machine, state: MachineState) -> None:
    """Scale the TSC if this host's differs from the source's by more than 250 ppm."""
    for vcpu, vs in zip(machine.vcpus, state.vcpus, strict=True):
        try:
            here = vcpu.fd.get_tsc_khz()
        except KvmError as exc:
            raise MachineError(f"restore: vCPU {vcpu.index}: {exc}") from None
        if vs.tsc_khz == 0 or abs(here - vs.tsc_khz) <= vs.tsc_khz * TSC_KHZ_TOLERANCE:
            continue
        try:
            vcpu.fd.set_tsc_khz(vs.tsc_khz)
            log.info("vCPU %d: TSC scaled from %d to %d kHz", vcpu.index, here, vs.tsc_khz)
        except KvmError as exc:
            log.warning(
                "vCPU %d: the guest's TSC ran at %d kHz, this host's runs at %d kHz and "
                "KVM cannot scale it (%s): guest time will run at the wrong rate",
                vcpu.index,
                vs.tsc_khz,
                here,
                exc,
            )


def _restore_vcpu(machine: Machine, vcpu: Vcpu, vs: VcpuState) -> None:
    fd = vcpu.fd
    step = "KVM_SET_CPUID2"
    try:
        # CPUID first: which MSRs exist and the XSAVE layout depend on it.
        fd.set_cpuid2(
            [
                abi.kvm_cpuid_entry2.from_buffer_copy(vs.cpuid, off)
                for off in range(0, len(vs.cpuid), CPUID_ENTRY_BYTES)
            ]
        )
        step = "KVM_SET_MP_STATE"
        fd.set_mp_state(vs.mp_state)
        step = "KVM_SET_REGS"
        # REGS before VCPU_EVENTS: KVM_SET_REGS discards a pending exception.
        fd.set_regs(abi.kvm_regs.from_buffer_copy(vs.regs))
        # SREGS before LAPIC: the APIC base (and x2APIC mode) is in sregs.
        step = "KVM_SET_SREGS"
        fd.set_sregs(abi.kvm_sregs.from_buffer_copy(vs.sregs))
        if vs.xsave is not None:
            step = "KVM_SET_XSAVE"
            _set_xsave(fd, vs.xsave)
        else:
            assert vs.fpu is not None
            step = "KVM_SET_FPU"
            fd.set_fpu(abi.kvm_fpu.from_buffer_copy(vs.fpu))
        if vs.xcrs is not None:
            step = "KVM_SET_XCRS"
            fd.set_xcrs(abi.kvm_xcrs.from_buffer_copy(vs.xcrs))
        step = "KVM_SET_DEBUGREGS"
        fd.set_debugregs(abi.kvm_debugregs.from_buffer_copy(vs.debugregs))
        if vs.lapic is not None:
            step = "KVM_SET_LAPIC"
            fd.set_lapic(abi.kvm_lapic_state.from_buffer_copy(vs.lapic))
        step = "KVM_SET_MSRS"
        _write_msrs(fd, vcpu.index, _msr_restore_order(vs))
        step = "KVM_SET_VCPU_EVENTS"
        fd.set_vcpu_events(_events_for_restore(vs.vcpu_events))
    except KvmError as exc:
        raise MachineError(f"restore: vCPU {vcpu.index}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise MachineError(f"restore: vCPU {vcpu.index}: {step}: bad state: {exc}") from None


def _msr_restore_order(vs: VcpuState) -> dict[int, int]:
    """TSC first (the kvmclock and TSC_DEADLINE writes read the guest TSC), the rest in
    captured order, TSC_DEADLINE last (KVM arms the timer against the TSC and LAPIC)."""
    ordered: dict[int, int] = {}
    if MSR_IA32_TSC in vs.msrs:
        ordered[MSR_IA32_TSC] = vs.msrs[MSR_IA32_TSC]
    for index, value in vs.msrs.items():
        if index not in (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE):
            ordered[index] = value
    if MSR_IA32_TSC_DEADLINE in vs.msrs:
        ordered[MSR_IA32_TSC_DEADLINE] = _tsc_deadline_for_restore(vs)
    return ordered


def _tsc_deadline_for_restore(vs: VcpuState) -> int:
    """A zero deadline in TSC-deadline mode may hide a timer that fired while the vCPU was
    paused: KVM zeroes the MSR when the timer fires and keeps the not-yet-injected
    interrupt in a counter no ioctl returns. Restoring 0 would lose that tick for good
    (Firecracker's fix_zero_tsc_deadline_msr); writing the saved TSC makes it fire at once.
    The cost, when the guest had simply not re-armed it, is one spurious timer interrupt."""
    deadline = vs.msrs[MSR_IA32_TSC_DEADLINE]
    if deadline or vs.lapic is None or MSR_IA32_TSC not in vs.msrs:
        return deadline
    (lvtt,) = struct.unpack_from("<I", vs.lapic, APIC_LVTT)
    deadline_mode = lvtt & APIC_LVT_TIMER_MODE_MASK == APIC_LVT_TIMER_TSCDEADLINE
    if deadline_mode and not lvtt & APIC_LVT_MASKED:
        log.debug("vCPU %d: TSC deadline 0 in deadline mode: re-armed at the TSC", vs.index)
        return vs.msrs[MSR_IA32_TSC]
    return deadline


def _write_msrs(fd: VcpuFd, vcpu_index: int, values: dict[int, int]) -> None:
    """KVM_SET_MSRS in order. KVM stops at the first MSR it refuses; that is harmless when
    this vCPU already holds the saved value (nothing is lost), otherwise an error."""
    items = list(values.items())
    refused: list[int] = []
    while items:
        chunk = dict(items[:MSR_CHUNK])
        done = fd.set_msrs(chunk)
        if done < len(chunk):
            index, value = items[done]
            current = fd.get_msrs([index]).get(index)
            if current != value:
                have = "unreadable" if current is None else f"0x{current:x}"
                raise MachineError(
                    f"restore: vCPU {vcpu_index}: KVM refused MSR 0x{index:x} = 0x{value:x} "
                    f"(this vCPU has {have})"
                )
            refused.append(index)
            done += 1
        items = items[done:]
    if refused:
        log.debug(
            "vCPU %d: KVM refused MSR(s) %s, already holding the saved values",
            vcpu_index,
            ", ".join(f"0x{i:x}" for i in refused),
        )


def _events_for_restore(data: bytes) -> abi.kvm_vcpu_events:
    """KVM_GET_VCPU_EVENTS reports NMI_PENDING | SHADOW | SMM (and PAYLOAD, TRIPLE_FAULT
    when the VM enabled them) but never SIPI_VECTOR, although sipi_vector is always
    filled in. Add it, so KVM takes every field that was captured."""
    events = abi.kvm_vcpu_events.from_buffer_copy(data)
    events.flags = (events.flags | abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR) & KNOWN_EVENT_FLAGS
    return events


def _restore_vm(machine: Machine, vm: VmState) -> None:
    try:
        if vm.irqchip:
            assert vm.pit2 is not None
            machine.vm.set_pit2(abi.kvm_pit_state2.from_buffer_copy(vm.pit2))
        # Flags 0: the guest's clock resumes at the captured value (guest time stands still
        # while it is not running), as Firecracker and QEMU do by default.
        captured = abi.kvm_clock_data.from_buffer_copy(vm.clock)
        machine.vm.set_clock(abi.kvm_clock_data(clock=captured.clock, flags=0))
        if vm.irqchip:
            for name in ("pic_master", "pic_slave", "ioapic"):
                data = getattr(vm, name)
                machine.vm.set_irqchip(abi.kvm_irqchip.from_buffer_copy(data))
    except KvmError as exc:
        raise MachineError(f"restore: VM: {exc}") from None


def _restore_devices(machine: Machine, devices: dict[str, Any]) -> None:
    unknown = set(devices) - KNOWN_DEVICES
    if unknown:
        raise MachineError(f"restore: unknown device(s) {', '.join(sorted(unknown))}")
    if "serial" in devices:
        _check_serial(devices["serial"], len(machine.vcpus), "restore: devices.serial")
        machine.serial.set_state(devices["serial"])
    if "serial2" in devices:
        _check_serial2(devices["serial2"], "restore: devices.serial2")
        if machine.serial2 is None:
            raise MachineError(
                "restore: the state has a COM2 device (serial2) and this machine has none "
                "(pyvmm run --serial2)"
            )
        machine.serial2.set_state(devices["serial2"])


# --- serialisation -----------------------------------------------------------------------------


def _struct_to_json(spec: _Spec, data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"struct": spec.struct, "size": len(data), "base64": base64.b64encode(data).decode()}


def _vcpu_to_json(vs: VcpuState) -> dict[str, Any]:
    doc: dict[str, Any] = {"index": vs.index, "mp_state": vs.mp_state, "tsc_khz": vs.tsc_khz}
    for name, spec in _VCPU_STRUCTS.items():
        doc[name] = _struct_to_json(spec, getattr(vs, name))
    doc["msrs"] = [[index, value] for index, value in vs.msrs.items()]
    return doc


_VCPU_KEYS = frozenset({"index", "mp_state", "tsc_khz", "msrs", *_VCPU_STRUCTS})
_VM_KEYS = frozenset({"irqchip", *_VM_STRUCTS})
_TOP_KEYS = frozenset({"format", "version", "vcpu_count", "irqchip", "vcpus", "vm", "devices"})
_STRUCT_KEYS = frozenset({"struct", "size", "base64"})
_HEX = re.compile(r"[0-9a-f]*")


# The JSON guards (strictjson.py): the item limit is what 64 vCPUs with MAX_MSRS MSRs each
# need (an MSR pair is 3 items, the rest of a vCPU under 100; one real vCPU has about 300
# in all); the real document nests 5 deep (top, vcpus, a vCPU, its msrs, one pair).
MAX_STATE_ITEMS = MAX_VCPUS * (3 * MAX_MSRS + 256) + 1024
MAX_STATE_DEPTH = 8
_JSON = JsonReader(
    MachineError, "machine state", max_bytes=MAX_STATE_BYTES, max_items=MAX_STATE_ITEMS,
    max_depth=MAX_STATE_DEPTH,
)  # fmt: skip
_fail = _JSON.fail
_obj = _JSON.object
_int = _JSON.integer
_bool = _JSON.boolean
_type_name = type_name


def _struct(
    value: object, path: str, spec: _Spec, *, lo: int = 0, hi: int = 0, multiple: int = 1
) -> bytes:
    """A {"struct", "size", "base64"} object: name, exact size and payload all checked."""
    doc = _obj(value, path, _STRUCT_KEYS)
    if doc["struct"] != spec.struct:
        shown = doc["struct"][:40] if isinstance(doc["struct"], str) else _type_name(doc["struct"])
        raise _fail(path, f"struct is {shown!r}, expected {spec.struct!r}")
    if spec.size is not None:
        lo = hi = spec.size
    size = _int(doc["size"], f"{path}.size", 0, MAX_STATE_BYTES)
    if not lo <= size <= hi or size % multiple:
        want = f"{lo}" if lo == hi else f"a multiple of {multiple} in {lo}..{hi}"
        raise _fail(path, f"size {size} is wrong for {spec.struct} (expected {want})")
    text = doc["base64"]
    if not isinstance(text, str):
        raise _fail(f"{path}.base64", f"expected a string, got {_type_name(text)}")
    if len(text) != 4 * math.ceil(size / 3):
        raise _fail(f"{path}.base64", f"{len(text)} characters do not encode {size} bytes")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _fail(f"{path}.base64", "not valid base64") from None
    if len(data) != size:
        raise _fail(f"{path}.base64", f"decodes to {len(data)} bytes, size says {size}")
    return data


def _optional_struct(
    value: object, path: str, spec: _Spec, present: bool, why: str
) -> bytes | None:
    if value is None:
        if present:
            raise _fail(path, f"missing ({why})")
        return None
    if not present:
        raise _fail(path, f"must be null ({why})")
    return _struct(value, path, spec)


def _parse_msrs(value: object, path: str) -> dict[int, int]:
    if not isinstance(value, list):
        raise _fail(path, f"expected an array, got {_type_name(value)}")
    if len(value) > MAX_MSRS:
        raise _fail(path, f"{len(value)} MSRs, at most {MAX_MSRS}")
    msrs: dict[int, int] = {}
    for i, pair in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            raise _fail(where, "expected [index, value]")
        index = _int(pair[0], f"{where} index", 0, 0xFFFFFFFF)
        data = _int(pair[1], f"{where} value", 0, 0xFFFFFFFFFFFFFFFF)
        if index in msrs:
            raise _fail(where, f"MSR 0x{index:x} appears twice")
        msrs[index] = data
    return msrs


def _parse_vcpu(value: object, path: str, i: int, irqchip: bool) -> VcpuState:
    doc = _obj(value, path, _VCPU_KEYS)
    index = _int(doc["index"], f"{path}.index", 0, MAX_VCPUS - 1)
    if index != i:
        raise _fail(f"{path}.index", f"is {index}, expected {i}")
    mp_state = _int(doc["mp_state"], f"{path}.mp_state", 0, 0xFFFFFFFF)
    if mp_state not in KNOWN_MP_STATES:
        raise _fail(f"{path}.mp_state", f"{mp_state} is not an x86 mp_state")
    tsc_khz = _int(doc["tsc_khz"], f"{path}.tsc_khz", 0, MAX_TSC_KHZ)
    specs = _VCPU_STRUCTS
    cpuid = _struct(
        doc["cpuid"],
        f"{path}.cpuid",
        specs["cpuid"],
        lo=CPUID_ENTRY_BYTES,
        hi=CPUID_ENTRY_BYTES * abi.KVM_MAX_CPUID_ENTRIES,
        multiple=CPUID_ENTRY_BYTES,
    )
    if doc["xsave"] is not None and doc["fpu"] is not None:
        raise _fail(path, "has both xsave and fpu; exactly one is allowed")
    if doc["xsave"] is None and doc["fpu"] is None:
        raise _fail(path, "has neither xsave nor fpu")
    xsave = fpu = None
    if doc["xsave"] is not None:
        xsave = _struct(
            doc["xsave"],
            f"{path}.xsave",
            specs["xsave"],
            lo=ctypes.sizeof(abi.kvm_xsave),
            hi=MAX_XSAVE_BYTES,
            multiple=4,
        )
    else:
        fpu = _struct(doc["fpu"], f"{path}.fpu", specs["fpu"])
    xcrs = None
    if doc["xcrs"] is not None:
        xcrs = _struct(doc["xcrs"], f"{path}.xcrs", specs["xcrs"])
    why = f"irqchip is {str(irqchip).lower()}"
    return VcpuState(
        index=index,
        cpuid=cpuid,
        mp_state=mp_state,
        regs=_struct(doc["regs"], f"{path}.regs", specs["regs"]),
        sregs=_struct(doc["sregs"], f"{path}.sregs", specs["sregs"]),
        xsave=xsave,
        fpu=fpu,
        xcrs=xcrs,
        debugregs=_struct(doc["debugregs"], f"{path}.debugregs", specs["debugregs"]),
        lapic=_optional_struct(doc["lapic"], f"{path}.lapic", specs["lapic"], irqchip, why),
        msrs=_parse_msrs(doc["msrs"], f"{path}.msrs"),
        vcpu_events=_struct(doc["vcpu_events"], f"{path}.vcpu_events", specs["vcpu_events"]),
        tsc_khz=tsc_khz,
    )


def _parse_vm(value: object, irqchip: bool) -> VmState:
    doc = _obj(value, "vm", _VM_KEYS)
    if _bool(doc["irqchip"], "vm.irqchip") != irqchip:
        raise _fail("vm.irqchip", "disagrees with the top-level irqchip")
    vm = VmState(irqchip=irqchip, clock=_struct(doc["clock"], "vm.clock", _VM_STRUCTS["clock"]))
    why = f"irqchip is {str(irqchip).lower()}"
    for name in ("pic_master", "pic_slave", "ioapic", "pit2"):
        data = _optional_struct(doc[name], f"vm.{name}", _VM_STRUCTS[name], irqchip, why)
        if data is not None and name in _IRQCHIP_IDS:
            (chip_id,) = struct.unpack_from("<I", data)
            if chip_id != _IRQCHIP_IDS[name]:
                raise _fail(f"vm.{name}", f"chip_id {chip_id}, expected {_IRQCHIP_IDS[name]}")
        setattr(vm, name, data)
    return vm


def _check_serial(value: object, vcpus: int, path: str) -> dict[str, Any]:
    doc = _obj(value, path, frozenset({"buffers", "regs"}))
    buffers = doc["buffers"]
    if not isinstance(buffers, dict):
        raise _fail(f"{path}.buffers", f"expected an object, got {_type_name(buffers)}")
    for key, text in buffers.items():
        if not (key.isascii() and key.isdigit() and int(key) < vcpus and str(int(key)) == key):
            raise _fail(f"{path}.buffers", f"key {key[:20]!r} is not a vCPU index below {vcpus}")
        if not isinstance(text, str):
            raise _fail(f"{path}.buffers.{key}", f"expected a string, got {_type_name(text)}")
        if len(text) > 2 * MAX_LINE_BYTES or len(text) % 2 or not _HEX.fullmatch(text):
            raise _fail(
                f"{path}.buffers.{key}", f"not lower-case hex of at most {MAX_LINE_BYTES} bytes"
            )
    regs = _obj(doc["regs"], f"{path}.regs", frozenset(SERIAL_REGS))
    for key in SERIAL_REGS:
        _int(regs[key], f"{path}.regs.{key}", 0, 0xFF)
    return doc


def _check_serial2(value: object, path: str) -> dict[str, Any]:
    """COM2's state: both queues (hex, at most a FIFO each), their stream offsets, and the
    registers a guest writes (uart.py)."""
    doc = _obj(value, path, SERIAL2_KEYS)
    for key in ("rx", "tx"):
        text = doc[key]
        if not isinstance(text, str):
            raise _fail(f"{path}.{key}", f"expected a string, got {_type_name(text)}")
        if len(text) > 2 * FIFO_MAX_BYTES or len(text) % 2 or not _HEX.fullmatch(text):
            raise _fail(f"{path}.{key}", f"not lower-case hex of at most {FIFO_MAX_BYTES} bytes")
    for key in ("rx_end", "tx_end"):
        _int(doc[key], f"{path}.{key}", 0, MAX_STREAM_OFFSET)
    if doc["rx_end"] < len(doc["rx"]) // 2 or doc["tx_end"] < len(doc["tx"]) // 2:
        raise _fail(path, "a queue holds more bytes than its stream offset counts")
    regs = _obj(doc["regs"], f"{path}.regs", frozenset(STATE_REGS))
    for key in STATE_REGS:
        _int(regs[key], f"{path}.regs.{key}", 0, 0xFF)
    return doc


def _parse_devices(value: object, vcpus: int) -> dict[str, Any]:
    """Known devices only, each optional (a state may carry none)."""
    if not isinstance(value, dict):
        raise _fail("devices", f"expected an object, got {_type_name(value)}")
    doc = _obj(value, "devices", frozenset(value.keys() & KNOWN_DEVICES))
    if "serial" in doc:
        _check_serial(doc["serial"], vcpus, "devices.serial")
    if "serial2" in doc:
        _check_serial2(doc["serial2"], "devices.serial2")
    return doc


def _parse(data: object, vcpus: int, irqchip: bool) -> MachineState:
    doc = _JSON.parse(data)
    top = _obj(doc, "top level", _TOP_KEYS)
    if top["format"] != FORMAT_NAME:
        raise _fail("format", f"expected {FORMAT_NAME!r}")
    version = top["version"]
    if type(version) is not int or version != FORMAT_VERSION:
        shown = version if type(version) is int else _type_name(version)
        raise _fail("version", f"{shown} is not supported (this pyvmm reads {FORMAT_VERSION})")
    count = _int(top["vcpu_count"], "vcpu_count", 1, MAX_VCPUS)
    if count != vcpus:
        raise _fail("vcpu_count", f"the state has {count} vCPUs, the machine has {vcpus}")
    if _bool(top["irqchip"], "irqchip") != irqchip:
        raise _fail(
            "irqchip",
            f"the state has irqchip={str(top['irqchip']).lower()}, "
            f"the machine has irqchip={str(irqchip).lower()}",
        )
    vcpu_docs = top["vcpus"]
    if not isinstance(vcpu_docs, list):
        raise _fail("vcpus", f"expected an array, got {_type_name(vcpu_docs)}")
    if len(vcpu_docs) != count:
        raise _fail("vcpus", f"{len(vcpu_docs)} entries, vcpu_count is {count}")
    states = [_parse_vcpu(v, f"vcpus[{i}]", i, irqchip) for i, v in enumerate(vcpu_docs)]
    vm = _parse_vm(top["vm"], irqchip)
    devices = _parse_devices(top["devices"], count)
    return MachineState(states, vm, devices)
