"""Names and arguments of KVM ioctls, from pyvmm's own ABI tables (pyvmm/kvm/abi.py).

An ioctl's third argument is a value or the address of a struct in the caller's
memory. The tracer stops the caller when the call returns, so both what the caller
passed in and what KVM wrote back can be read there; `Decoder.decode` turns them into a
small dict of named fields, using the same ctypes structs pyvmm issues its ioctls with.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from pyvmm.kvm import abi
from pyvmm.trace.calls import IoctlCall

ReadMemory = Callable[[int, int], bytes]  # (address, size) -> bytes, OSError if unreadable

REQUEST_NAMES: dict[int, str] = dict(abi.IOCTL_NAMES)
NAME_TO_REQUEST: dict[str, int] = {name: req for req, name in REQUEST_NAMES.items()}
DIRTY_LOG_CALLS = ("KVM_GET_DIRTY_LOG", "KVM_CLEAR_DIRTY_LOG", "KVM_RESET_DIRTY_RINGS")
_DIRS = {0: "IO", 1: "IOW", 2: "IOR", 3: "IOWR"}

# Architectural MSRs a VMM commonly saves and restores (Intel SDM vol. 4; KVM's
# paravirtual ones from Documentation/virt/kvm/x86/msr.rst), named for readability.
MSR_NAMES = {
    0x10: "TSC",
    0x1B: "APIC_BASE",
    0x3A: "FEATURE_CONTROL",
    0x3B: "TSC_ADJUST",
    0x174: "SYSENTER_CS",
    0x175: "SYSENTER_ESP",
    0x176: "SYSENTER_EIP",
    0x1A0: "MISC_ENABLE",
    0x277: "PAT",
    0x6E0: "TSC_DEADLINE",
    0xC0000080: "EFER",
    0xC0000081: "STAR",
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0xC0000084: "SFMASK",
    0xC0000100: "FS_BASE",
    0xC0000101: "GS_BASE",
    0xC0000102: "KERNEL_GS_BASE",
    0xC0000103: "TSC_AUX",
    0x4B564D00: "KVM_WALL_CLOCK_NEW",
    0x4B564D01: "KVM_SYSTEM_TIME_NEW",
}
MP_STATE_NAMES = {
    value: name[len("KVM_MP_STATE_") :]
    for name, value in vars(abi).items()
    if name.startswith("KVM_MP_STATE_") and isinstance(value, int)
}
MSRS_SHOWN = 8  # MSR calls list this many entries, then "+N"


def request_name(request: int) -> str:
    """KVM_... for a request in pyvmm's tables, else its _IOC fields, e.g. KVM_IOW_0xc8."""
    name = REQUEST_NAMES.get(request)
    if name is not None:
        return name
    direction, nr = (request >> 30) & 3, request & 0xFF
    return f"KVM_{_DIRS[direction]}_0x{nr:02x}"


def cap_name(cap: int) -> str:
    return abi.CAP_NAMES.get(cap, str(cap))


def exit_name(reason: int) -> str:
    return abi.EXIT_REASON_NAMES.get(reason, str(reason))


def msr_name(index: int) -> str:
    return MSR_NAMES.get(index, f"0x{index:x}")


def flag_names(value: int, names: dict[int, str]) -> str:
    """'A|B' for the set bits that have names, '0x..' for the rest, '0' for none."""
    parts = [name for bit, name in names.items() if value & bit]
    rest = value & ~sum(names)
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) or "0"


def popcount(data: bytes) -> int:
    return int.from_bytes(data, "little").bit_count()


def _read_struct(read: ReadMemory, address: int, ctype: type[ctypes.Structure]) -> Any:
    return ctype.from_buffer_copy(read(address, ctypes.sizeof(ctype)))


def _read_u64(read: ReadMemory, address: int) -> int:
    return int.from_bytes(read(address, 8), "little")


class Decoder:
    """Decodes calls; remembers what later calls need (memory slot sizes, kvm_run pages)."""

    def __init__(self) -> None:
        # (pid, vm fd, slot) -> pages, from KVM_SET_USER_MEMORY_REGION: the size of the
        # bitmap a later KVM_GET_DIRTY_LOG on that slot fills.
        self.slot_pages: dict[tuple[int, int, int], int] = {}
        # Where the calling process maps a vCPU's kvm_run; set by the tracer.
        self.run_page: Callable[[IoctlCall], int | None] = lambda call: None
        self._handlers: dict[str, Callable[[IoctlCall, ReadMemory], dict[str, Any]]] = {
            "KVM_RUN": self._run,
            "KVM_CHECK_EXTENSION": lambda c, r: {"cap": cap_name(c.arg)},
            "KVM_CREATE_VM": lambda c, r: {"type": c.arg},
            "KVM_CREATE_VCPU": lambda c, r: {"id": c.arg},
            "KVM_SET_USER_MEMORY_REGION": self._memory_region,
            "KVM_GET_DIRTY_LOG": self._get_dirty_log,
            "KVM_CLEAR_DIRTY_LOG": self._clear_dirty_log,
            "KVM_RESET_DIRTY_RINGS": lambda c, r: {"entries": c.result} if c.result >= 0 else {},
            "KVM_ENABLE_CAP": _enable_cap,
            "KVM_GET_MSRS": _msrs,
            "KVM_SET_MSRS": _msrs,
            "KVM_GET_MSR_INDEX_LIST": _msr_list,
            "KVM_GET_MSR_FEATURE_INDEX_LIST": _msr_list,
            "KVM_GET_REGS": _regs,
            "KVM_SET_REGS": _regs,
            "KVM_GET_SREGS": lambda c, r: _sregs(c, r, abi.kvm_sregs),
            "KVM_SET_SREGS": lambda c, r: _sregs(c, r, abi.kvm_sregs),
            "KVM_GET_SREGS2": lambda c, r: _sregs(c, r, abi.kvm_sregs2),
            "KVM_SET_SREGS2": lambda c, r: _sregs(c, r, abi.kvm_sregs2),
            "KVM_GET_SUPPORTED_CPUID": _cpuid,
            "KVM_GET_EMULATED_CPUID": _cpuid,
            "KVM_SET_CPUID2": _cpuid,
            "KVM_GET_CPUID2": _cpuid,
            "KVM_SET_TSS_ADDR": lambda c, r: {"addr": hex(c.arg)},
            "KVM_SET_IDENTITY_MAP_ADDR": lambda c, r: {"addr": hex(_read_u64(r, c.arg))},
            "KVM_SET_TSC_KHZ": lambda c, r: {"khz": c.arg},
            "KVM_SET_BOOT_CPU_ID": lambda c, r: {"id": c.arg},
            "KVM_IRQ_LINE": _irq_level,
            "KVM_IRQ_LINE_STATUS": _irq_level,
            "KVM_GET_MP_STATE": _mp_state,
            "KVM_SET_MP_STATE": _mp_state,
            "KVM_IOEVENTFD": _ioeventfd,
            "KVM_IRQFD": _irqfd,
            "KVM_SET_GSI_ROUTING": lambda c, r: {
                "nr": _read_struct(r, c.arg, abi.kvm_irq_routing).nr
            },
            "KVM_REGISTER_COALESCED_MMIO": _coalesced,
            "KVM_UNREGISTER_COALESCED_MMIO": _coalesced,
            "KVM_GET_CLOCK": _clock,
            "KVM_SET_CLOCK": _clock,
            "KVM_SET_DEVICE_ATTR": _device_attr,
            "KVM_GET_DEVICE_ATTR": _device_attr,
            "KVM_HAS_DEVICE_ATTR": _device_attr,
            "KVM_X86_SETUP_MCE": lambda c, r: {"mcg_cap": hex(_read_u64(r, c.arg))},
            "KVM_INTERRUPT": lambda c, r: {"irq": _read_struct(r, c.arg, abi.kvm_interrupt).irq},
        }  # fmt: skip

    def decode(self, call: IoctlCall, read: ReadMemory) -> None:
        """Fill call.args; a struct that cannot be read leaves the fields it would give out."""
        handler = self._handlers.get(call.name)
        if handler is None:
            return
        try:
            call.args.update(handler(call, read))
        except (OSError, ValueError):
            call.args["unreadable"] = hex(call.arg)

    def _run(self, call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
        if call.result != 0:
            return {}
        page = self.run_page(call)
        if page is None:
            return {"exit": "?"}
        return decode_run_exit(read(page, 64))

    def _memory_region(self, call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
        region = _read_struct(read, call.arg, abi.kvm_userspace_memory_region)
        self.slot_pages[(call.pid, call.fd, region.slot)] = region.memory_size // abi.PAGE_SIZE
        flags = {abi.KVM_MEM_LOG_DIRTY_PAGES: "LOG_DIRTY_PAGES", abi.KVM_MEM_READONLY: "READONLY"}
        return {
            "slot": region.slot,
            "flags": flag_names(region.flags, flags),
            "gpa": hex(region.guest_phys_addr),
            "size_bytes": region.memory_size,
            "hva": hex(region.userspace_addr),
        }

    def _get_dirty_log(self, call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
        log = _read_struct(read, call.arg, abi.kvm_dirty_log)
        out: dict[str, Any] = {"slot": log.slot}
        pages = self.slot_pages.get((call.pid, call.fd, log.slot))
        if pages and call.result == 0:
            out["dirty_pages"] = popcount(read(log.dirty_bitmap, (pages + 63) // 64 * 8))
            out["slot_pages"] = pages
        return out

    def _clear_dirty_log(self, call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
        clear = _read_struct(read, call.arg, abi.kvm_clear_dirty_log)
        out: dict[str, Any] = {
            "slot": clear.slot,
            "first_page": clear.first_page,
            "num_pages": clear.num_pages,
        }
        if clear.num_pages:
            raw = read(clear.dirty_bitmap, (clear.num_pages + 63) // 64 * 8)
            bits = int.from_bytes(raw, "little")
            out["pages"] = (bits & ((1 << clear.num_pages) - 1)).bit_count()
        return out


def decode_run_exit(page: bytes) -> dict[str, Any]:
    """The exit in the first 64 bytes of a kvm_run (abi.kvm_run's layout)."""
    reason = struct.unpack_from("<I", page, 8)[0]
    out: dict[str, Any] = {"exit": exit_name(reason)}
    if reason == abi.KVM_EXIT_IO:
        direction, size, port, count = struct.unpack_from("<BBHI", page, 32)
        out.update(io="out" if direction == abi.KVM_EXIT_IO_OUT else "in", port=hex(port),
                   size=size, count=count)  # fmt: skip
    elif reason == abi.KVM_EXIT_MMIO:
        phys, length, is_write = struct.unpack_from("<Q8xIB", page, 32)
        out.update(mmio="write" if is_write else "read", addr=hex(phys), len=length)
    elif reason in (abi.KVM_EXIT_SYSTEM_EVENT, abi.KVM_EXIT_INTERNAL_ERROR):
        key = "type" if reason == abi.KVM_EXIT_SYSTEM_EVENT else "suberror"
        out[key] = struct.unpack_from("<I", page, 32)[0]
    elif reason == abi.KVM_EXIT_FAIL_ENTRY:
        out["hardware_reason"] = hex(struct.unpack_from("<Q", page, 32)[0])
    return out


def _enable_cap(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    cap = _read_struct(read, call.arg, abi.kvm_enable_cap)
    return {"cap": cap_name(cap.cap), "flags": cap.flags, "args0": hex(cap.args[0])}


def _msrs(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    """nmsrs and the first entries: index=value (for GET, only those KVM returned)."""
    nmsrs = _read_struct(read, call.arg, abi.kvm_msrs).nmsrs
    valid = nmsrs if call.name == "KVM_SET_MSRS" else max(call.result, 0)
    shown = min(nmsrs, MSRS_SHOWN)
    size = ctypes.sizeof(abi.kvm_msr_entry)
    raw = read(call.arg + ctypes.sizeof(abi.kvm_msrs), shown * size) if shown else b""
    parts = []
    for i in range(shown):
        entry = abi.kvm_msr_entry.from_buffer_copy(raw, i * size)
        value = f"=0x{entry.data:x}" if i < valid else ""
        parts.append(msr_name(entry.index) + value)
    if nmsrs > shown:
        parts.append(f"+{nmsrs - shown}")
    return {"nmsrs": nmsrs, "msrs": " ".join(parts)}


def _msr_list(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    return {"nmsrs": _read_struct(read, call.arg, abi.kvm_msr_list).nmsrs}


def _regs(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    if call.result < 0:
        return {}
    regs = _read_struct(read, call.arg, abi.kvm_regs)
    return {"rip": hex(regs.rip), "rsp": hex(regs.rsp), "rflags": hex(regs.rflags)}


EFER_LMA = 1 << 10
CR0_PE = 1 << 0


def _sregs(call: IoctlCall, read: ReadMemory, ctype: type[ctypes.Structure]) -> dict[str, Any]:
    if call.result < 0:
        return {}
    sregs = _read_struct(read, call.arg, ctype)
    if sregs.efer & EFER_LMA and sregs.cs.l:
        mode = "64-bit"
    elif sregs.cr0 & CR0_PE:
        mode = "32-bit protected" if sregs.cs.db else "16-bit protected"
    else:
        mode = "real"
    return {"mode": mode, "cr0": hex(sregs.cr0), "cr3": hex(sregs.cr3), "cr4": hex(sregs.cr4),
            "efer": hex(sregs.efer), "cs": hex(sregs.cs.selector)}  # fmt: skip


def _cpuid(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    return {"nent": _read_struct(read, call.arg, abi.kvm_cpuid2).nent}


def _irq_level(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    irq = _read_struct(read, call.arg, abi.kvm_irq_level)
    return {"irq": irq.irq, "level": irq.level}


def _mp_state(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    state = _read_struct(read, call.arg, abi.kvm_mp_state).mp_state
    return {"state": MP_STATE_NAMES.get(state, str(state))}


def _ioeventfd(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    ev = _read_struct(read, call.arg, abi.kvm_ioeventfd)
    flags = {abi.KVM_IOEVENTFD_FLAG_DATAMATCH: "DATAMATCH", abi.KVM_IOEVENTFD_FLAG_PIO: "PIO",
             abi.KVM_IOEVENTFD_FLAG_DEASSIGN: "DEASSIGN"}  # fmt: skip
    return {"addr": hex(ev.addr), "len": ev.len, "eventfd": ev.fd,
            "flags": flag_names(ev.flags, flags)}  # fmt: skip


def _irqfd(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    irqfd = _read_struct(read, call.arg, abi.kvm_irqfd)
    return {"eventfd": irqfd.fd, "gsi": irqfd.gsi, "flags": irqfd.flags}


def _coalesced(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    zone = _read_struct(read, call.arg, abi.kvm_coalesced_mmio_zone)
    return {"addr": hex(zone.addr), "size": zone.size, "pio": zone.pio}


def _clock(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    if call.result < 0:
        return {}
    clock = _read_struct(read, call.arg, abi.kvm_clock_data)
    return {"clock_ns": clock.clock, "flags": hex(clock.flags)}


def _device_attr(call: IoctlCall, read: ReadMemory) -> dict[str, Any]:
    attr = _read_struct(read, call.arg, abi.kvm_device_attr)
    return {"group": attr.group, "attr": attr.attr}
