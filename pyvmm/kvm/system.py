"""The system fd: /dev/kvm itself."""

from __future__ import annotations

import ctypes
import errno
import os

from pyvmm.kvm import abi
from pyvmm.kvm.errors import KvmError, KvmUnavailable
from pyvmm.kvm.ioctl import ioctl
from pyvmm.kvm.vm import VmFd

DEFAULT_DEVICE = "/dev/kvm"


class Kvm:
    """An open /dev/kvm: capability queries and VM creation."""

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: KVM is not available on this machine "
                "(load the kvm module or run on a host with virtualization)"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path}: permission denied (add your user to the kvm group or run as root)"
            ) from None
        except OSError as exc:
            raise KvmUnavailable(f"{path}: {exc.strerror}") from None
        self._cpuid_cache: list[abi.kvm_cpuid_entry2] | None = None
        try:
            version = ioctl(self.fd, abi.KVM_GET_API_VERSION)
            if version != abi.KVM_API_VERSION:
                raise KvmUnavailable(f"{path}: KVM API version {version}, pyvmm needs 12")
        except BaseException:
            self.close()  # nobody else can: the constructor did not return
            raise

    def close(self) -> None:
        """Close /dev/kvm. Safe to call twice; VMs created from it stay valid."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID; the buffer grows until the kernel stops saying E2BIG."""
        if self._cpuid_cache is None:
            n = 64
            while True:
                buf = abi.cpuid2_struct(n)()
                buf.nent = n
                try:
                    ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
                    break
                except KvmError as exc:
                    if exc.errno != errno.E2BIG or n >= 4096:
                        raise
                    n *= 2
            self._cpuid_cache = [_copy_entry(buf.entries[i]) for i in range(buf.nent)]
        return [_copy_entry(e) for e in self._cpuid_cache]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs that KVM saves and restores."""
        n = 256
        while True:
            buf = abi.msr_list_struct(n)()
            buf.nmsrs = n
            try:
                ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, buf)
                return list(buf.indices[: buf.nmsrs])
            except KvmError as exc:
                if exc.errno != errno.E2BIG or n >= 65536:
                    raise
                n = max(n * 2, buf.nmsrs)

    def create_vm(self) -> VmFd:
        """A new VM; the caller owns the returned VmFd and closes it."""
        mmap_size = self.vcpu_mmap_size()  # first: nothing can fail once the VM fd exists
        return VmFd(ioctl(self.fd, abi.KVM_CREATE_VM, 0), mmap_size)


def _copy_entry(entry: abi.kvm_cpuid_entry2) -> abi.kvm_cpuid_entry2:
    copy = abi.kvm_cpuid_entry2()
    ctypes.pointer(copy)[0] = entry
    return copy
