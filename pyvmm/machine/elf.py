"""Reading a PVH guest image: ELF32 or ELF64, PT_LOAD segments and PT_NOTE notes.

Only what booting needs is parsed, and every offset and length is checked
against the file before use, so a truncated or hostile image gives an
ImageError naming the problem instead of a traceback.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.machine.errors import ImageError

PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
PYVMM_NOTE_START_ALL_VCPUS = 1
PYVMM_NOTE_NAME = b"pyvmm"
MAX_IMAGE_BYTES = 256 << 20


@dataclass
class Segment:
    paddr: int
    data: bytes = field(repr=False)
    memsz: int = 0


@dataclass
class PvhImage:
    """What the loader needs from a guest image."""

    path: str
    entry32: int  # the PVH 32-bit physical entry point
    segments: list[Segment]
    start_all_vcpus: bool  # pyvmm's note: every vCPU starts at the entry

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple:
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise ImageError(f"truncated ELF: {what} at offset {offset} runs past the file's end")
    return struct.unpack_from(fmt, data, offset)


def parse_notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of each ELF note; names and descriptors are 4-byte aligned."""
    notes, pos = [], 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name_end = pos + namesz
        desc_start = pos + ((namesz + 3) & ~3)
        desc_end = desc_start + descsz
        if desc_end > len(blob):
            raise ImageError("truncated ELF: a note runs past the end of its PT_NOTE segment")
        notes.append((blob[pos:name_end].rstrip(b"\0"), ntype, blob[desc_start:desc_end]))
        pos = desc_start + ((descsz + 3) & ~3)
    return notes


def load_pvh_image(path: str | Path) -> PvhImage:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: {size} bytes is larger than the {MAX_IMAGE_BYTES} limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such guest image") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a guest image") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    return parse_pvh_image(data, str(path))


def parse_pvh_image(data: bytes, name: str = "<image>") -> PvhImage:
    if len(data) < 16 or data[:4] != b"\x7fELF":
        raise ImageError(f"{name}: not an ELF file (no \\x7fELF magic)")
    elf_class, endian = data[4], data[5]
    if endian != 1:
        raise ImageError(f"{name}: big-endian ELF is not an x86 image")
    if elf_class == 1:  # ELF32
        ehdr, phdr = "<HHIIIIIHHHHHH", "<IIIIIIII"
        e = _unpack(ehdr, data, 16, "ELF header")
        phoff, phentsize, phnum = e[4], e[8], e[9]
    elif elf_class == 2:  # ELF64
        ehdr, phdr = "<HHIQQQIHHHHHH", "<IIQQQQQQ"
        e = _unpack(ehdr, data, 16, "ELF header")
        phoff, phentsize, phnum = e[4], e[8], e[9]
    else:
        raise ImageError(f"{name}: unknown ELF class {elf_class}")
    if e[1] not in (3, 62):  # EM_386, EM_X86_64
        raise ImageError(f"{name}: ELF machine {e[1]} is not x86")
    if phnum == 0:
        raise ImageError(f"{name}: ELF has no program headers")
    if phentsize < struct.calcsize(phdr):
        raise ImageError(f"{name}: program header size {phentsize} is too small")

    segments: list[Segment] = []
    entry32: int | None = None
    start_all = False
    for i in range(phnum):
        h = _unpack(phdr, data, phoff + i * phentsize, f"program header {i}")
        if elf_class == 1:
            p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = h[:6]
        else:
            p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = h[:7]
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if p_offset + p_filesz > len(data):
            raise ImageError(
                f"truncated ELF: segment {i} needs bytes {p_offset}..{p_offset + p_filesz} "
                f"but the file has {len(data)}"
            )
        blob = data[p_offset : p_offset + p_filesz]
        if p_type == PT_LOAD:
            if p_memsz < p_filesz:
                raise ImageError(f"{name}: segment {i} has memsz {p_memsz} < filesz {p_filesz}")
            if p_memsz:
                segments.append(Segment(p_paddr, blob, p_memsz))
            continue
        for note_name, ntype, desc in parse_notes(blob):
            if note_name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) not in (4, 8):
                    raise ImageError(f"{name}: PVH entry note has a {len(desc)}-byte descriptor")
                entry32 = int.from_bytes(desc, "little")
            elif note_name == PYVMM_NOTE_NAME and ntype == PYVMM_NOTE_START_ALL_VCPUS:
                start_all = bool(desc) and int.from_bytes(desc[:4], "little") != 0
    if entry32 is None:
        raise ImageError(
            f"{name}: no PVH entry note (Xen note type 18, XEN_ELFNOTE_PHYS32_ENTRY); "
            "pyvmm boots PVH images only"
        )
    if not segments:
        raise ImageError(f"{name}: ELF has no loadable segments")
    if entry32 >= 1 << 32:
        raise ImageError(f"{name}: PVH entry 0x{entry32:x} is not a 32-bit address")
    return PvhImage(name, entry32, segments, start_all)
