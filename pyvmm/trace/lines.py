"""The live view: one line per traced ioctl, optionally filtered by name or fd kind."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pyvmm.trace.calls import IoctlCall
from pyvmm.trace.decode import REQUEST_NAMES
from pyvmm.trace.errors import TraceError
from pyvmm.trace.fds import KVM_SYSTEM, KVM_VM, VCPU_PREFIX

FD_KIND_ALIASES = {
    "kvm": KVM_SYSTEM,
    "system": KVM_SYSTEM,
    KVM_SYSTEM: KVM_SYSTEM,
    "vm": KVM_VM,
    KVM_VM: KVM_VM,
    "vcpu": VCPU_PREFIX,
    "kvm-vcpu": VCPU_PREFIX,
}


@dataclass
class CallFilter:
    """Which calls to show: any of the names, or any of the fd kinds (empty = all).

    Accepted words: an ioctl name with or without KVM_ (any case), or an fd kind:
    kvm (/dev/kvm), vm (kvm-vm), vcpu (every kvm-vcpu:N), vcpu:N (kvm-vcpu:N)."""

    names: set[str] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)  # exact kinds, or VCPU_PREFIX for every vCPU

    @classmethod
    def parse(cls, words: Iterable[str]) -> CallFilter:
        known = set(REQUEST_NAMES.values())
        flt = cls()
        for raw in words:
            for word in filter(None, (w.strip() for w in raw.split(","))):
                lower = word.lower()
                if lower in FD_KIND_ALIASES:
                    flt.kinds.add(FD_KIND_ALIASES[lower])
                    continue
                vcpu = lower.removeprefix("kvm-")
                if vcpu.startswith("vcpu:") and vcpu[5:].isdigit():
                    flt.kinds.add(VCPU_PREFIX + str(int(vcpu[5:])))
                    continue
                name = word.upper()
                name = name if name.startswith("KVM_") else "KVM_" + name
                if name not in known:
                    raise TraceError(
                        f"--filter {word}: neither an ioctl in pyvmm's ABI tables nor an fd kind "
                        "(kvm, vm, vcpu, vcpu:N)"
                    )
                flt.names.add(name)
        return flt

    def __bool__(self) -> bool:
        return bool(self.names or self.kinds)

    def matches(self, call: IoctlCall) -> bool:
        if not self:
            return True
        if call.name in self.names or call.kind in self.kinds:
            return True
        return VCPU_PREFIX in self.kinds and call.kind.startswith(VCPU_PREFIX)


def format_args(args: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in args.items())


def format_line(call: IoctlCall, t0_ns: int) -> str:
    """`   0.012345 12345 kvm-vcpu:0 KVM_RUN() = 0 <13 us> exit=IO io=out port=0x80 ...`.

    A negative result is shown as -1 with the errno name, as strace does."""
    t = (call.start_ns - t0_ns) / 1e9
    result = f"-1 {call.error}" if call.result < 0 else str(call.result)
    # KVM_RUN's fields describe the exit it returned with: they follow the result.
    args, out = ({}, call.args) if call.name == "KVM_RUN" else (call.args, {})
    text = f"{t:11.6f} {call.tid:>7} {call.kind:<12} {call.name}({format_args(args)}) = {result}"
    text += f" <{call.dur_us:.0f} us>"
    return text + (" " + format_args(out) if out else "")
