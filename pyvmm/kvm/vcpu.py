"""The vCPU fd: KVM_RUN, the shared kvm_run page, and every piece of vCPU state."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
from collections.abc import Callable

from pyvmm.kvm import _ioctl, abi
from pyvmm.kvm.ioctl import ioctl, ioctl_read

# (result, exit_reason, direction, size, port, count, data_offset): see VcpuFd.run_decoded.
DecodedExit = tuple[int, int, int, int, int, int, int]


class VcpuFd:
    """Owns a vCPU fd and its kvm_run mapping from construction on; close() releases both."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_id = vcpu_id
        self.ring_mmap: mmap.mmap | None = None
        # Guards the kvm_run mapping against close() while another thread kicks. Reentrant:
        # a signal handler may kick on a thread that is inside close() or a kick already.
        self._lock = threading.RLock()
        try:
            self.run_mmap = mmap.mmap(
                fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            try:
                self.kvm_run = abi.kvm_run.from_buffer(self.run_mmap)
            except BaseException:
                self.run_mmap.close()
                raise
        except BaseException:
            os.close(fd)  # the caller never got an object that could close it
            self.fd = -1
            raise
        self.run_addr = ctypes.addressof(self.kvm_run)

    def close(self) -> None:
        """Unmap kvm_run (and the dirty ring) and close the fd. Safe to call twice, and
        while other threads call set_immediate_exit (it becomes a no-op)."""
        with self._lock:
            fd, self.fd = self.fd, -1  # first: a kick that re-enters from here sees it closed
            if fd < 0:
                return
            try:
                # The ctypes view holds an export of the mmap; drop it before closing.
                del self.kvm_run
                self.run_mmap.close()
                if self.ring_mmap is not None:
                    self.ring_mmap.close()
                    self.ring_mmap = None
            finally:
                os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def set_immediate_exit(self, value: int = 1) -> bool:
        """Store kvm_run.immediate_exit; False (and nothing done) once close() has begun.

        Safe from any thread and from a signal handler, at any moment of close()."""
        with self._lock:
            if self.fd < 0:
                return False
            self.run_mmap[abi.KVM_RUN_IMMEDIATE_EXIT_OFFSET] = value
            return True

    def run(self) -> int:
        """KVM_RUN without the GIL: 0 after an exit, or -errno (-EINTR when kicked)."""
        return _ioctl.run(self.fd)

    def run_decoded(self) -> DecodedExit:
        """KVM_RUN, then (result, exit_reason, direction, size, port, count, data_offset)."""
        return _ioctl.run_decoded(self.fd, self.run_addr)

    def decoded_runner(self) -> Callable[[], DecodedExit]:
        """run_decoded as one C-level callable without arguments, for the vCPU loop's hot
        path (a bound method would add a Python frame per exit). Valid until close()."""
        return functools.partial(_ioctl.run_decoded, self.fd, self.run_addr)

    def map_dirty_ring(self, ring_bytes: int) -> mmap.mmap:
        self.ring_mmap = mmap.mmap(
            self.fd,
            ring_bytes,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=abi.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE,
        )
        return self.ring_mmap

    # --- registers and state -----------------------------------------------------------------

    def get_regs(self) -> abi.kvm_regs:
        return ioctl_read(self.fd, abi.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return ioctl_read(self.fd, abi.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return ioctl_read(self.fd, abi.KVM_GET_FPU, abi.kvm_fpu)

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def get_xsave(self) -> abi.kvm_xsave:
        return ioctl_read(self.fd, abi.KVM_GET_XSAVE, abi.kvm_xsave)

    def set_xsave(self, xsave: abi.kvm_xsave) -> None:
        ioctl(self.fd, abi.KVM_SET_XSAVE, xsave)

    def get_xsave2(self, size_bytes: int) -> bytes:
        """KVM_GET_XSAVE2 into a buffer of size_bytes, which must be at least the VM's
        KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) (larger than kvm_xsave's 4096 with AMX)."""
        buf = (ctypes.c_uint8 * size_bytes)()
        ioctl(self.fd, abi.KVM_GET_XSAVE2, buf)
        return bytes(buf)

    def set_xsave_bytes(self, data: bytes) -> None:
        """KVM_SET_XSAVE from raw bytes: with KVM_CAP_XSAVE2 larger than 4096, KVM reads
        that many bytes, so the buffer is the whole area KVM_GET_XSAVE2 returned."""
        ioctl(self.fd, abi.KVM_SET_XSAVE, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))

    def get_xcrs(self) -> abi.kvm_xcrs:
        return ioctl_read(self.fd, abi.KVM_GET_XCRS, abi.kvm_xcrs)

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        ioctl(self.fd, abi.KVM_SET_XCRS, xcrs)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; KVM stops at the first it cannot read, so only those returned are valid."""
        buf = abi.msrs_struct(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = ioctl(self.fd, abi.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs in the given order; returns how many KVM accepted."""
        buf = abi.msrs_struct(len(values))()
        buf.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return ioctl(self.fd, abi.KVM_SET_MSRS, buf)

    def get_lapic(self) -> abi.kvm_lapic_state:
        return ioctl_read(self.fd, abi.KVM_GET_LAPIC, abi.kvm_lapic_state)

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        ioctl(self.fd, abi.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        return ioctl_read(self.fd, abi.KVM_GET_MP_STATE, abi.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(mp_state=state))

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        return ioctl_read(self.fd, abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events)

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> abi.kvm_debugregs:
        return ioctl_read(self.fd, abi.KVM_GET_DEBUGREGS, abi.kvm_debugregs)

    def set_debugregs(self, regs: abi.kvm_debugregs) -> None:
        ioctl(self.fd, abi.KVM_SET_DEBUGREGS, regs)

    def set_cpuid2(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        buf = abi.cpuid2_struct(len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        ioctl(self.fd, abi.KVM_SET_CPUID2, buf)

    def get_cpuid2(self) -> list[abi.kvm_cpuid_entry2]:
        buf = abi.cpuid2_struct(abi.KVM_MAX_CPUID_ENTRIES)()
        buf.nent = abi.KVM_MAX_CPUID_ENTRIES
        ioctl(self.fd, abi.KVM_GET_CPUID2, buf)
        out = []
        for i in range(buf.nent):
            entry = abi.kvm_cpuid_entry2()
            ctypes.pointer(entry)[0] = buf.entries[i]
            out.append(entry)
        return out

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, abi.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        ioctl(self.fd, abi.KVM_KVMCLOCK_CTRL)
