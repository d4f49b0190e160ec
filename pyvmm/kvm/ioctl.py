"""Typed ioctl calls: structs in, structs out, KvmError on failure."""

from __future__ import annotations

import ctypes

from pyvmm.kvm import _ioctl, abi
from pyvmm.kvm.errors import KvmError


def request_name(request: int) -> str:
    return abi.IOCTL_NAMES.get(request, hex(request))


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | ctypes.Array = 0) -> int:
    """Issue one ioctl; `arg` is an integer value or a ctypes object passed by address."""
    value = arg if isinstance(arg, int) else ctypes.addressof(arg)
    result = _ioctl.ioctl_arg(fd, request, value)
    if result < 0:
        raise KvmError(request_name(request), -result)
    return result


def ioctl_read(fd: int, request: int, ctype: type[ctypes.Structure]) -> ctypes.Structure:
    """An ioctl that fills a fresh struct of `ctype` and returns it."""
    buf = ctype()
    ioctl(fd, request, buf)
    return buf
