# cython: language_level=3
"""The one place pyvmm calls ioctl(2).

Why Cython and not fcntl.ioctl (measured on CPython 3.11, see DESIGN.md):
fcntl's integer argument is a C int (0xfffbd000 overflows), buffers over 1 KiB
are passed with the GIL held, and CPython 3.14 retries on EINTR, which would
swallow the signal that kicks a vCPU out of KVM_RUN. Here every call releases
the GIL, takes a full 64-bit argument, never retries, and returns -errno.
"""

from libc.errno cimport errno

cdef extern from "sys/ioctl.h" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef unsigned long _KVM_RUN = 0xAE80


def ioctl_arg(int fd, unsigned long request, unsigned long arg=0) -> int:
    """ioctl(fd, request, arg) without the GIL; the result, or -errno on failure.

    `arg` is an integer: a value, or the address of a buffer the caller keeps alive.
    """
    cdef long r
    with nogil:
        r = ioctl(fd, request, arg)
        if r < 0:
            r = -errno
    return r


def run(int fd) -> int:
    """KVM_RUN on a vCPU fd: 0 after an exit to user space, or -errno (-EINTR after a kick)."""
    cdef int r
    with nogil:
        r = ioctl(fd, _KVM_RUN, 0)
        if r < 0:
            r = -errno
    return r
