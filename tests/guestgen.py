"""Build tiny PVH ELF images in Python, for tests of the loader and of fatal exits.

The code runs in the PVH entry state: 32-bit protected mode, paging off.
"""

from __future__ import annotations

import struct

LOAD_ADDR = 0x100000
PT_LOAD, PT_NOTE = 1, 4


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(
    code: bytes,
    *,
    elf_class: int = 64,
    entry_desc_bytes: int = 4,
    pvh_note: bool = True,
    start_all: bool = True,
    load_addr: int = LOAD_ADDR,
    extra_memsz: int = 0,
) -> bytes:
    notes = b""
    if pvh_note:
        notes += note(b"Xen", 18, load_addr.to_bytes(entry_desc_bytes, "little"))
    if start_all:
        notes += note(b"pyvmm", 1, (1).to_bytes(4, "little"))
    if elf_class == 64:
        ehsize, phentsize = 64, 56
    else:
        ehsize, phentsize = 52, 32
    phnum = 2 if notes else 1
    code_off = ehsize + phnum * phentsize
    note_off = code_off + len(code)
    phdrs = []
    segs = [(PT_LOAD, code_off, load_addr, len(code), len(code) + extra_memsz)]
    if notes:
        segs.append((PT_NOTE, note_off, load_addr + len(code), len(notes), len(notes)))
    for p_type, off, addr, filesz, memsz in segs:
        if elf_class == 64:
            phdrs.append(struct.pack("<IIQQQQQQ", p_type, 5, off, addr, addr, filesz, memsz, 4))
        else:
            phdrs.append(struct.pack("<IIIIIIII", p_type, off, addr, addr, filesz, memsz, 5, 4))
    ident = b"\x7fELF" + bytes([1 if elf_class == 32 else 2, 1, 1]) + b"\0" * 9
    if elf_class == 64:
        ehdr = ident + struct.pack(
            "<HHIQQQIHHHHHH", 2, 62, 1, load_addr, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0
        )
    else:
        ehdr = ident + struct.pack(
            "<HHIIIIIHHHHHH", 2, 3, 1, load_addr, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0
        )
    return ehdr + b"".join(phdrs) + code + notes


# 32-bit machine code snippets.
def exit_with(code: int) -> bytes:
    """mov eax, code; mov dx, 0x501; out dx, eax; cli; hlt."""
    return b"\xb8" + struct.pack("<I", code) + b"\x66\xba\x01\x05" + b"\xef" + b"\xfa\xf4"


CLI_HLT = b"\xfa\xf4\xeb\xfc"  # cli; hlt; jmp back to hlt
UD2 = b"\x0f\x0b"
# xor ecx, ecx; div ecx: #DE with no usable IDT -> double fault -> triple fault.
DIVIDE_ERROR = b"\x31\xc9\xf7\xf1"
# int3 with a zero-limit IDT: PVM's emulator fails on it (KVM_EXIT_INTERNAL_ERROR).
INT3_NO_IDT = b"\x0f\x01\x1d" + struct.pack("<I", LOAD_ADDR + 9) + b"\xcc\x90" + b"\x00" * 6
# mov eax, cr4; or eax, 0x200 (CR4.OSFXSR); mov cr4, eax; pxor xmm0, xmm0; then exit 0.
# The guest runs at CPL0, where a host that emulates kernel code (kvm_pvm) cannot emulate
# SSE: KVM_EXIT_INTERNAL_ERROR, emulation failure. Hardware virtualization just runs it.
PXOR = b"\x66\x0f\xef\xc0"
SSE_AT_CPL0 = b"\x0f\x20\xe0" + b"\x0d\x00\x02\x00\x00" + b"\x0f\x22\xe0" + PXOR + exit_with(0)
# in al, 0x99 (an unhandled port: reads 0xff); then exit with that value.
READ_UNHANDLED_PORT_AND_EXIT = (
    b"\x31\xc0" + b"\xe4\x99" + b"\x66\xba\x01\x05" + b"\xef" + b"\xfa\xf4"
)


def write_pages(gpas: list[int]) -> bytes:
    """mov dword [gpa], 0x5a5a5a5a for each address, then cli; hlt (32-bit code)."""
    stores = b"".join(b"\xc7\x05" + struct.pack("<II", gpa, 0x5A5A5A5A) for gpa in gpas)
    return stores + CLI_HLT
