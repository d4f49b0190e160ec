"""The VM fd: memory slots, VM-wide devices, dirty logging, vCPU creation."""

from __future__ import annotations

import ctypes
import os

from pyvmm.kvm import abi
from pyvmm.kvm.ioctl import ioctl, ioctl_read
from pyvmm.kvm.vcpu import VcpuFd


class VmFd:
    """Owns its fd from construction on; close() releases it (safe to call twice)."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        req = abi.kvm_enable_cap(cap=cap, flags=flags)
        for i, value in enumerate(args):
            req.args[i] = value
        ioctl(self.fd, abi.KVM_ENABLE_CAP, req)

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """Map host memory into the guest. The caller keeps the host memory alive."""
        region = abi.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, abi.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        ioctl(self.fd, abi.KVM_CREATE_PIT2, abi.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq=irq, level=level))

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        chip = abi.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        ioctl(self.fd, abi.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> abi.kvm_pit_state2:
        return ioctl_read(self.fd, abi.KVM_GET_PIT2, abi.kvm_pit_state2)

    def set_pit2(self, state: abi.kvm_pit_state2) -> None:
        ioctl(self.fd, abi.KVM_SET_PIT2, state)

    def get_clock(self) -> abi.kvm_clock_data:
        return ioctl_read(self.fd, abi.KVM_GET_CLOCK, abi.kvm_clock_data)

    def set_clock(self, data: abi.kvm_clock_data) -> None:
        ioctl(self.fd, abi.KVM_SET_CLOCK, data)

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        """KVM_GET_DIRTY_LOG into a caller-owned bitmap (address of ceil(pages/64) u64 words)."""
        ioctl(
            self.fd, abi.KVM_GET_DIRTY_LOG, abi.kvm_dirty_log(slot=slot, dirty_bitmap=bitmap_addr)
        )

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap_addr: int) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set in the bitmap."""
        req = abi.kvm_clear_dirty_log(
            slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=bitmap_addr
        )
        ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG, req)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle harvested ring entries; returns how many."""
        return ioctl(self.fd, abi.KVM_RESET_DIRTY_RINGS)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """A new vCPU; the caller owns the returned VcpuFd and closes it."""
        fd = ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(fd, vcpu_id, self.vcpu_mmap_size)  # closes fd itself if it fails
