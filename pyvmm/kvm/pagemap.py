"""/proc/self/pagemap: which pages of this process's mappings the kernel has populated.

Not KVM's ABI but procfs's; it lives in this layer because this layer is the only one
that issues ioctls. Two ways in, both on the same file:

- PAGEMAP_SCAN (Linux 6.7, include/uapi/linux/fs.h, "fs/proc/task_mmu: implement IOCTL
  to get and optionally clear info about PTEs"): the kernel walks the page tables and
  returns *ranges* of pages with the categories asked for; holes cost nothing per page.
  A 64 GiB mapping with 1 GiB populated is answered in about 0.1 ms here.
- reading the file (Documentation/admin-guide/mm/pagemap.rst): one u64 per page, bit 63
  "present", bit 62 "swapped". It works on every kernel but costs 8 bytes of copying per
  page: about 40 ms for 64 GiB here.

The structs are copied from include/uapi/linux/fs.h of Linux 6.7 (the installed headers
are older and do not have them).
"""

from __future__ import annotations

import ctypes
import errno
import os

from pyvmm.kvm import _ioctl
from pyvmm.kvm.errors import KvmError

PAGEMAP_PATH = "/proc/self/pagemap"
PAGEMAP_ENTRY_BYTES = 8
PM_PRESENT = 1 << 63  # pagemap entry: the page is in RAM (its own or the shared zero page)
PM_SWAP = 1 << 62  # pagemap entry: swapped out, or a migration entry

# struct page_region categories (PAGE_IS_*)
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5  # mapped to the shared zero page (read, never written)


class pm_scan_arg(ctypes.Structure):  # the kernel's name
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


class page_region(ctypes.Structure):  # the kernel's name
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    ]


# _IOWR('f', 16, struct pm_scan_arg)
PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(pm_scan_arg) << 16) | (ord("f") << 8) | 16


class PagemapFd:
    """/proc/self/pagemap, open for reading. OSError from the constructor if it cannot be
    opened (a restricted /proc)."""

    def __init__(self) -> None:
        self.fd = os.open(PAGEMAP_PATH, os.O_RDONLY | os.O_CLOEXEC)
        self._arg = pm_scan_arg()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def scan(
        self, start: int, end: int, vec: ctypes.Array, anyof: int, inverted: int, mask: int,
        return_mask: int,
    ) -> tuple[int, int]:  # fmt: skip
        """PAGEMAP_SCAN over [start, end): fills vec (page_region entries) with ranges of
        pages that have at least one category of `anyof` and, for the categories in
        `mask`, the value 1, or 0 for those also in `inverted`. Returns (regions, walk_end):
        walk_end < end means vec was full, continue from there. KvmError (errno ENOTTY or
        EINVAL) on a kernel without PAGEMAP_SCAN."""
        arg = self._arg
        arg.size = ctypes.sizeof(pm_scan_arg)
        arg.flags = 0
        arg.start = start
        arg.end = end
        arg.walk_end = 0
        arg.vec = ctypes.addressof(vec)
        arg.vec_len = len(vec)
        arg.max_pages = 0
        arg.category_inverted = inverted
        arg.category_mask = mask
        arg.category_anyof_mask = anyof
        arg.return_mask = return_mask
        result = _ioctl.ioctl_arg(self.fd, PAGEMAP_SCAN, ctypes.addressof(arg))
        if result < 0:
            raise KvmError("PAGEMAP_SCAN", -result)
        return result, arg.walk_end

    def read(self, addr: int, out: memoryview) -> None:
        """The pagemap entries of the pages from addr on, one u64 each, into out (bytes)."""
        offset = addr // 4096 * PAGEMAP_ENTRY_BYTES
        done = 0
        while done < len(out):
            n = os.preadv(self.fd, [out[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short read of {PAGEMAP_PATH} at offset {offset + done}")
            done += n


def scan_unsupported(exc: KvmError) -> bool:
    """Whether a PAGEMAP_SCAN failure means "this kernel has no PAGEMAP_SCAN"."""
    return exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)
