"""One traced ioctl: who issued it, on which KVM object, how long it took, what it meant."""

from __future__ import annotations

import errno as errno_mod
from dataclasses import dataclass, field
from typing import Any

from pyvmm.trace.fds import vcpu_index


@dataclass(slots=True)
class IoctlCall:
    pid: int  # the traced process
    tid: int  # the thread that issued the call
    fd: int
    kind: str  # "/dev/kvm", "kvm-vm", "kvm-vcpu:N" (see fds.py)
    request: int
    name: str  # KVM_... from pyvmm's ABI tables
    arg: int  # the raw third argument: a value or an address in the tracee
    start_ns: int  # CLOCK_MONOTONIC when the tracer saw the call enter
    end_ns: int = 0  # ... and return
    result: int = 0  # the return value, or -errno
    args: dict[str, Any] = field(default_factory=dict)  # decoded arguments and results

    @property
    def dur_us(self) -> float:
        return (self.end_ns - self.start_ns) / 1000.0

    @property
    def vcpu(self) -> int | None:
        return vcpu_index(self.kind)

    @property
    def error(self) -> str | None:
        """The errno's name (EINTR, ...) if the call failed."""
        if self.result >= 0:
            return None
        return errno_mod.errorcode.get(-self.result, str(-self.result))

    @property
    def exit_reason(self) -> str | None:
        """For a KVM_RUN that returned 0: the exit reason read from kvm_run."""
        return self.args.get("exit")
