# cython: language_level=3
"""The one place pyvmm calls ioctl(2).

Why Cython and not fcntl.ioctl (CPython 3.11; docs/machine.md, "vCPU threads and kicks"):
fcntl's integer argument is a C int (0xfffbd000 overflows), buffers over 1 KiB
are passed with the GIL held, and CPython 3.14 retries on EINTR, which would
swallow the signal that kicks a vCPU out of KVM_RUN. Here every call releases
the GIL, takes a full 64-bit argument, never retries, and returns -errno.
"""

from libc.errno cimport errno

cdef extern from "sys/ioctl.h" nogil:
    int ioctl(int fd, unsigned long request, ...)

# Every number below mirrors <linux/kvm.h>; LAYOUT exports them so that
# tests/test_kvm_abi.py can compare each one with the installed header.
cdef unsigned long _KVM_RUN = 0xAE80
cdef unsigned int _KVM_EXIT_IO = 2
cdef size_t _EXIT_REASON_OFFSET = 8  # offsetof(struct kvm_run, exit_reason), a __u32
cdef size_t _IO_OFFSET = 32  # offsetof(struct kvm_run, io): the exit union


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


ctypedef struct _io_exit:  # struct kvm_run's io member
    unsigned char direction
    unsigned char size
    unsigned short port
    unsigned int count
    unsigned long long data_offset


def _layout() -> dict:
    """What this module assumes about kvm_run: 'name': value, offsets and sizes in bytes."""
    cdef _io_exit io
    cdef size_t base = <size_t>&io
    return {
        "KVM_RUN": _KVM_RUN,
        "KVM_EXIT_IO": _KVM_EXIT_IO,
        "offsetof exit_reason": _EXIT_REASON_OFFSET,
        "sizeof exit_reason": sizeof(unsigned int),
        "offsetof io": _IO_OFFSET,
        "offsetof io.direction": _IO_OFFSET + (<size_t>&io.direction - base),
        "sizeof io.direction": sizeof(io.direction),
        "offsetof io.size": _IO_OFFSET + (<size_t>&io.size - base),
        "sizeof io.size": sizeof(io.size),
        "offsetof io.port": _IO_OFFSET + (<size_t>&io.port - base),
        "sizeof io.port": sizeof(io.port),
        "offsetof io.count": _IO_OFFSET + (<size_t>&io.count - base),
        "sizeof io.count": sizeof(io.count),
        "offsetof io.data_offset": _IO_OFFSET + (<size_t>&io.data_offset - base),
        "sizeof io.data_offset": sizeof(io.data_offset),
    }


LAYOUT = _layout()


def run_decoded(int fd, size_t run_addr) -> tuple:
    """KVM_RUN, then the exit decoded in C: (result, exit_reason, direction, size, port,
    count, data_offset). The last five are only meaningful for KVM_EXIT_IO (2).

    Reading kvm_run through nested ctypes structs costs microseconds per exit in
    Python; doing it here keeps the port-I/O path short (see docs/machine.md).
    """
    cdef int r
    cdef unsigned int reason = 0
    cdef _io_exit *io = <_io_exit *>(run_addr + _IO_OFFSET)
    with nogil:
        r = ioctl(fd, _KVM_RUN, 0)
        if r < 0:
            r = -errno
        else:
            reason = (<unsigned int *>(run_addr + _EXIT_REASON_OFFSET))[0]
    if r < 0 or reason != _KVM_EXIT_IO:
        return (r, reason, 0, 0, 0, 0, 0)
    return (r, reason, io.direction, io.size, io.port, io.count, io.data_offset)
