"""L0: the KVM ABI and nothing else (structs, ioctl numbers, one wrapper per fd kind)."""

from pyvmm.kvm.errors import KvmError, KvmUnavailable
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import VcpuFd
from pyvmm.kvm.vm import VmFd

__all__ = ["Kvm", "KvmError", "KvmUnavailable", "VcpuFd", "VmFd"]
