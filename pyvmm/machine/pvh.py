"""PVH boot: place the image and hvm_start_info in guest RAM, and set the entry state.

The PVH contract (Xen's, also used by Linux and QEMU): the vCPU starts in 32-bit
flat protected mode with paging off at the entry point from the image's
XEN_ELFNOTE_PHYS32_ENTRY note, with EBX holding the guest-physical address of a
`struct hvm_start_info` that points to the command line and an E820-style
memory map. pyvmm puts those in low memory, below the 1 MiB where images load.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.kvm import abi
from pyvmm.machine.elf import PvhImage
from pyvmm.machine.errors import ImageError
from pyvmm.machine.memory import GuestMemory

HVM_START_MAGIC = 0x336EC578
START_INFO_GPA = 0x6000
MEMMAP_GPA = 0x6040
CMDLINE_GPA = 0x7000
CMDLINE_MAX_BYTES = 0x1000 - 1
BOOT_INFO_END = 0x8000
E820_RAM, E820_RESERVED = 1, 2
LOW_RESERVED_START, LOW_RESERVED_END = 0x9FC00, 0x100000

# Flat segments of the PVH entry state (selectors as Linux's PVH path expects: non-zero).
CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR = 0x10, 0x18, 0x20
CR0_PE, CR0_ET = 1 << 0, 1 << 4


@dataclass
class BootInfo:
    entry: int
    start_info_gpa: int


def memory_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: RAM, the legacy hole below 1 MiB reserved."""
    entries: list[tuple[int, int, int]] = []
    for region in memory.regions:
        if region.gpa == 0 and region.end > LOW_RESERVED_END:
            entries.append((0, LOW_RESERVED_START, E820_RAM))
            entries.append(
                (LOW_RESERVED_START, LOW_RESERVED_END - LOW_RESERVED_START, E820_RESERVED)
            )
            entries.append((LOW_RESERVED_END, region.end - LOW_RESERVED_END, E820_RAM))
        else:
            entries.append((region.gpa, region.size_bytes, E820_RAM))
    return entries


def load(memory: GuestMemory, image: PvhImage, cmdline: str) -> BootInfo:
    """Copy the image's segments and the boot information into guest RAM."""
    for seg in image.segments:
        if seg.paddr < BOOT_INFO_END:
            raise ImageError(
                f"{image.path}: segment at 0x{seg.paddr:x} overlaps pyvmm's boot information "
                f"below 0x{BOOT_INFO_END:x}"
            )
        if not memory.contains(seg.paddr, seg.memsz):
            need_mib = -(-(seg.paddr + seg.memsz) // (1 << 20))
            raise ImageError(
                f"{image.path}: segment at 0x{seg.paddr:x}-0x{seg.paddr + seg.memsz:x} lies "
                f"outside guest RAM ({memory.describe()}); it needs --mem of at least {need_mib}M"
            )
        memory.write(seg.paddr, seg.data)
        if seg.memsz > len(seg.data):
            memory.fill(seg.paddr + len(seg.data), seg.memsz - len(seg.data), 0)
    if not memory.contains(image.entry32, 1):
        raise ImageError(f"{image.path}: PVH entry 0x{image.entry32:x} is outside guest RAM")

    raw_cmdline = cmdline.encode()
    if len(raw_cmdline) > CMDLINE_MAX_BYTES:
        raise ImageError(
            f"command line is {len(raw_cmdline)} bytes; the limit is {CMDLINE_MAX_BYTES}"
        )
    memory.write(CMDLINE_GPA, raw_cmdline + b"\0")
    mmap_entries = memory_map(memory)
    memory.write(MEMMAP_GPA, b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in mmap_entries))
    start_info = struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        1,  # version
        0,  # flags
        0,  # nr_modules
        0,  # modlist_paddr
        CMDLINE_GPA,
        0,  # rsdp_paddr
        MEMMAP_GPA,
        len(mmap_entries),
        0,
    )
    memory.write(START_INFO_GPA, start_info)
    return BootInfo(image.entry32, START_INFO_GPA)


def _flat_segment(selector: int, seg_type: int) -> abi.kvm_segment:
    return abi.kvm_segment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=seg_type, present=1, dpl=0, db=1, s=1,
        l=0, g=1,
    )  # fmt: skip


def entry_state(
    regs: abi.kvm_regs, sregs: abi.kvm_sregs, boot: BootInfo
) -> tuple[abi.kvm_regs, abi.kvm_sregs]:
    """The PVH initial register state, applied on top of the vCPU's reset state."""
    regs = abi.kvm_regs(rflags=0x2, rip=boot.entry, rbx=boot.start_info_gpa)
    sregs.cs = _flat_segment(CODE_SELECTOR, 0xB)  # execute/read, accessed
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _flat_segment(DATA_SELECTOR, 0x3))  # read/write, accessed
    sregs.tr = abi.kvm_segment(base=0, limit=0x67, selector=TSS_SELECTOR, type=0xB, present=1)
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    return regs, sregs
