"""The KVM ABI mirrored in ctypes: ioctl numbers, constants and structs.

Field names follow /usr/include/linux/kvm.h and asm/kvm.h so that the header
can be read side by side; tests/test_kvm_abi.py compiles a C program against
the installed headers and compares every size, offset and request number.
Nothing here has policy: it is a dictionary of the kernel's interface.
"""

from __future__ import annotations

import ctypes
from ctypes import Structure, Union, c_int64, c_uint8, c_uint16, c_uint32, c_uint64, sizeof

# --- ioctl number encoding (asm-generic/ioctl.h, valid on x86-64) --------------------------

_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (KVMIO << _IOC_TYPESHIFT) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ, nr, sizeof(ctype))


def _iow(nr: int, ctype: type) -> int:
    return _ioc(_IOC_WRITE, nr, sizeof(ctype))


def _iowr(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, sizeof(ctype))


# --- constants -------------------------------------------------------------------------------

KVM_API_VERSION = 12
PAGE_SIZE = 4096

# Capabilities (KVM_CHECK_EXTENSION argument).
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_XSAVE2 = 208
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223

# Further capabilities QEMU asks about (named so `pyvmm trace` can print them).
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_DESTROY_MEMORY_REGION_WORKS = 21
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS = 30
KVM_CAP_MCE = 31
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_HYPERV = 44
KVM_CAP_X86_ROBUST_SINGLESTEP = 51
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_PCI_2_3 = 75
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_VM_ATTRIBUTES = 101
KVM_CAP_X86_SMM = 117
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_HYPERV_VP_INDEX = 149
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_NESTED_STATE = 157
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_SET_GUEST_DEBUG2 = 195
KVM_CAP_SREGS2 = 200
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_SYS_ATTRIBUTES = 209
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218
KVM_CAP_X86_NOTIFY_VMEXIT = 219

CAP_NAMES = {
    value: name[len("KVM_CAP_") :]
    for name, value in globals().items()
    if name.startswith("KVM_CAP_") and isinstance(value, int)
}

# Memory slot flags.
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 arguments.
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# Dirty ring.
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # in pages, on x86
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_MAX_ENTRIES = 65536

# Exit reasons (kvm_run.exit_reason).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

EXIT_REASON_NAMES = {
    value: name[len("KVM_EXIT_") :]
    for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# MP states.
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# Irqchip ids for KVM_GET/SET_IRQCHIP.
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_PIT_SPEAKER_DUMMY = 1

# Clock flags.
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# kvm_vcpu_events validity flags.
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

KVM_MAX_XCRS = 16
KVM_MAX_CPUID_ENTRIES = 256

# --- structs -----------------------------------------------------------------------------------


class kvm_userspace_memory_region(Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


REGS_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip


class kvm_regs(Structure):
    _fields_ = [(name, c_uint64) for name in REGS_NAMES]


class kvm_segment(Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(Structure):
    _fields_ = [
        *[(seg, kvm_segment) for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(reg, c_uint64) for reg in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class kvm_fpu(Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_xsave(Structure):
    _fields_ = [("region", c_uint32 * 1024)]


class kvm_xcr(Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_msr_entry(Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(Structure):
    """Header only; use msrs_struct(n) for a buffer with n entries."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(Structure):
    _fields_ = [("nmsrs", c_uint32)]


class kvm_cpuid_entry2(Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(Structure):
    """Header only; use cpuid2_struct(n) for a buffer with n entries."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # sic: the kernel's spelling


class kvm_lapic_state(Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_mp_state(Structure):
    _fields_ = [("mp_state", c_uint32)]


class _events_exception(Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _events_interrupt(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _events_nmi(Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _events_smi(Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class kvm_vcpu_events(Structure):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _events_smi),
        ("triple_fault_pending", c_uint8),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_debugregs(Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_clock_data(Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class kvm_irqchip(Structure):
    """The chip state stays opaque bytes: pyvmm saves and restores it unchanged."""

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", c_uint8 * 512)]


class kvm_pit_channel_state(Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class kvm_pit_state2(Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class kvm_pit_config(Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_irq_level(Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_enable_cap(Structure):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


class kvm_dirty_log(Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_clear_dirty_log(Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("num_pages", c_uint32),
        ("first_page", c_uint64),
        ("dirty_bitmap", c_uint64),
    ]


class kvm_dirty_gfn(Structure):
    _fields_ = [("flags", c_uint32), ("slot", c_uint32), ("offset", c_uint64)]


# kvm_run and its exit union (only the members pyvmm decodes; the union is 256 bytes).


class _exit_hw(Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _exit_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _exit_ex(Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _exit_io(Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class _exit_mmio(Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class _exit_internal(Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _exit_emulation_failure(Structure):
    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),
        ("insn_size", c_uint8),
        ("insn_bytes", c_uint8 * 15),
    ]


class _exit_system_event(Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_exit(Union):
    _fields_ = [
        ("hw", _exit_hw),
        ("fail_entry", _exit_fail_entry),
        ("ex", _exit_ex),
        ("io", _exit_io),
        ("mmio", _exit_mmio),
        ("internal", _exit_internal),
        ("emulation_failure", _exit_emulation_failure),
        ("system_event", _exit_system_event),
        ("padding", ctypes.c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", _kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", c_uint8 * SYNC_REGS_SIZE_BYTES),  # struct kvm_sync_regs, unused by pyvmm
    ]


# Structs of ioctls that QEMU issues and pyvmm does not: mirrored so that `pyvmm trace`
# can name and decode them, and checked against the header like the rest.


class kvm_sregs2(Structure):
    _fields_ = [
        *[(seg, kvm_segment) for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(reg, c_uint64) for reg in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("flags", c_uint64),
        ("pdptrs", c_uint64 * 4),
    ]


class kvm_ioeventfd(Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_irqfd(Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_msi(Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


class kvm_irq_routing(Structure):
    """Header only: `nr` entries of 64 bytes follow."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


class kvm_coalesced_mmio_zone(Structure):
    # The header's last member is a union of `pad` and `pio`; pio is the one that means something.
    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("pio", c_uint32)]


class kvm_tpr_access_ctl(Structure):
    _fields_ = [("enabled", c_uint32), ("flags", c_uint32), ("reserved", c_uint32 * 8)]


class kvm_vapic_addr(Structure):
    _fields_ = [("vapic_addr", c_uint64)]


class kvm_device_attr(Structure):
    _fields_ = [("flags", c_uint32), ("group", c_uint32), ("attr", c_uint64), ("addr", c_uint64)]


class kvm_create_device(Structure):
    _fields_ = [("type", c_uint32), ("fd", c_uint32), ("flags", c_uint32)]


KVM_MSR_FILTER_MAX_RANGES = 16


class kvm_msr_filter_range(Structure):
    _fields_ = [("flags", c_uint32), ("nmsrs", c_uint32), ("base", c_uint32), ("bitmap", c_uint64)]


class kvm_msr_filter(Structure):
    _fields_ = [("flags", c_uint32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


class kvm_signal_mask(Structure):
    """Header only: `len` bytes of sigset follow."""

    _fields_ = [("len", c_uint32)]


class kvm_interrupt(Structure):
    _fields_ = [("irq", c_uint32)]


class kvm_guest_debug(Structure):
    # x86's kvm_guest_debug_arch is eight debug registers.
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", c_uint64 * 8)]


class kvm_x86_mce(Structure):
    _fields_ = [
        ("status", c_uint64),
        ("addr", c_uint64),
        ("misc", c_uint64),
        ("mcg_status", c_uint64),
        ("bank", c_uint8),
        ("pad1", c_uint8 * 7),
        ("pad2", c_uint64 * 3),
    ]


class kvm_translation(Structure):
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class kvm_nested_state(Structure):
    """Header only (the vendor header stays opaque); `size` bytes in all."""

    _fields_ = [
        ("flags", c_uint16),
        ("format", c_uint16),
        ("size", c_uint32),
        ("hdr", c_uint8 * 120),
    ]


# Byte offset of kvm_run.immediate_exit: the vCPU loop and kicks store to it through the mmap.
KVM_RUN_IMMEDIATE_EXIT_OFFSET = kvm_run.immediate_exit.offset


def cpuid2_struct(n: int) -> type[Structure]:
    """A kvm_cpuid2 with room for n entries."""

    class kvm_cpuid2_n(Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * n)]

    return kvm_cpuid2_n


def msrs_struct(n: int) -> type[Structure]:
    """A kvm_msrs with room for n entries."""

    class kvm_msrs_n(Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * n)]

    return kvm_msrs_n


def msr_list_struct(n: int) -> type[Structure]:
    class kvm_msr_list_n(Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * n)]

    return kvm_msr_list_n


# --- ioctl request numbers -------------------------------------------------------------------

# System (/dev/kvm).
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
KVM_GET_EMULATED_CPUID = _iowr(0x09, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, kvm_msr_list)
KVM_X86_GET_MCE_CAP_SUPPORTED = _ior(0x9D, c_uint64)

# VM.
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _iowr(0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, kvm_irqchip)  # sic: declared _IOR in the header
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)
KVM_SET_CLOCK = _iow(0x7B, kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, kvm_pit_state2)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _io(0xC7)
# VM ioctls only QEMU issues (named and decoded by `pyvmm trace`).
KVM_IRQ_LINE_STATUS = _iowr(0x67, kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, kvm_coalesced_mmio_zone)
KVM_SET_GSI_ROUTING = _iow(0x6A, kvm_irq_routing)
KVM_IRQFD = _iow(0x76, kvm_irqfd)
KVM_SET_BOOT_CPU_ID = _io(0x78)
KVM_IOEVENTFD = _iow(0x79, kvm_ioeventfd)
KVM_SIGNAL_MSI = _iow(0xA5, kvm_msi)
KVM_X86_SET_MSR_FILTER = _iow(0xC6, kvm_msr_filter)
KVM_CREATE_DEVICE = _iowr(0xE0, kvm_create_device)
KVM_SET_DEVICE_ATTR = _iow(0xE1, kvm_device_attr)
KVM_GET_DEVICE_ATTR = _iow(0xE2, kvm_device_attr)
KVM_HAS_DEVICE_ATTR = _iow(0xE3, kvm_device_attr)
KVM_GET_STATS_FD = _io(0xCE)

# vCPU.
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _iowr(0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, kvm_debugregs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, kvm_xcrs)
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_XSAVE2 = _ior(0xCF, kvm_xsave)
# vCPU ioctls only QEMU issues.
KVM_TRANSLATE = _iowr(0x85, kvm_translation)
KVM_INTERRUPT = _iow(0x86, kvm_interrupt)
KVM_SET_SIGNAL_MASK = _iow(0x8B, kvm_signal_mask)
KVM_TPR_ACCESS_REPORTING = _iowr(0x92, kvm_tpr_access_ctl)
KVM_SET_VAPIC_ADDR = _iow(0x93, kvm_vapic_addr)
KVM_NMI = _io(0x9A)
KVM_SET_GUEST_DEBUG = _iow(0x9B, kvm_guest_debug)
KVM_X86_SETUP_MCE = _iow(0x9C, c_uint64)
KVM_X86_SET_MCE = _iow(0x9E, kvm_x86_mce)
KVM_SMI = _io(0xB7)
KVM_GET_NESTED_STATE = _iowr(0xBE, kvm_nested_state)
KVM_SET_NESTED_STATE = _iow(0xBF, kvm_nested_state)
KVM_GET_SREGS2 = _ior(0xCC, kvm_sregs2)
KVM_SET_SREGS2 = _iow(0xCD, kvm_sregs2)

# Request numbers are recognised by their type byte (KVMIO); plain constants are all smaller.
IOCTL_NAMES = {
    value: name
    for name, value in globals().items()
    if name.startswith("KVM_") and isinstance(value, int) and (value >> 8) & 0xFF == KVMIO
}

# Every struct and request mirrored here, for the header cross-check test.
STRUCTS = [
    kvm_userspace_memory_region,
    kvm_regs,
    kvm_segment,
    kvm_dtable,
    kvm_sregs,
    kvm_fpu,
    kvm_xsave,
    kvm_xcr,
    kvm_xcrs,
    kvm_msr_entry,
    kvm_msrs,
    kvm_msr_list,
    kvm_cpuid_entry2,
    kvm_cpuid2,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_vcpu_events,
    kvm_debugregs,
    kvm_clock_data,
    kvm_irqchip,
    kvm_pit_channel_state,
    kvm_pit_state2,
    kvm_pit_config,
    kvm_irq_level,
    kvm_enable_cap,
    kvm_dirty_log,
    kvm_clear_dirty_log,
    kvm_dirty_gfn,
    kvm_run,
    kvm_sregs2,
    kvm_ioeventfd,
    kvm_irqfd,
    kvm_msi,
    kvm_irq_routing,
    kvm_coalesced_mmio_zone,
    kvm_tpr_access_ctl,
    kvm_vapic_addr,
    kvm_device_attr,
    kvm_create_device,
    kvm_msr_filter_range,
    kvm_msr_filter,
    kvm_signal_mask,
    kvm_interrupt,
    kvm_guest_debug,
    kvm_x86_mce,
    kvm_translation,
    kvm_nested_state,
]
