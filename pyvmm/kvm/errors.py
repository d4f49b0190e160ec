"""Errors of the KVM layer: every failed ioctl becomes one KvmError."""

from __future__ import annotations

import errno as errno_mod
import os


class KvmUnavailable(RuntimeError):
    """/dev/kvm cannot be used here (missing, not permitted, wrong API version)."""


class KvmError(OSError):
    """An ioctl failed. Carries the ioctl's name and errno; str() includes strerror."""

    def __init__(self, ioctl_name: str, err: int, detail: str = "") -> None:
        self.ioctl_name = ioctl_name
        message = f"{ioctl_name} failed: {os.strerror(err)} ({errno_mod.errorcode.get(err, err)})"
        if detail:
            message += f"; {detail}"
        super().__init__(err, message)

    def __str__(self) -> str:
        return self.args[1]
