"""Enabling KVM's dirty ring: a VM-wide capability that must precede every vCPU.

Harvesting the rings is dirty tracking's job (pyvmm/dirty/ring.py); the machine
only switches the feature on and maps each vCPU's ring, because KVM insists
that this happens before the first KVM_CREATE_VCPU.
"""

from __future__ import annotations

from pyvmm.kvm import Kvm, VmFd, abi
from pyvmm.machine.errors import MachineError

ENTRY_BYTES = 16


def max_ring_entries(kvm: Kvm) -> int:
    """The largest ring KVM offers (0 if it has none)."""
    best = max(
        kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
        kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING),
    )
    return best // ENTRY_BYTES


def validate_ring_entries(kvm: Kvm, entries: int) -> int:
    """Check a requested ring size; returns its size in bytes or raises MachineError."""
    largest = max_ring_entries(kvm)
    if largest == 0:
        raise MachineError("this kernel's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING is 0)")
    smallest = max(abi.PAGE_SIZE // ENTRY_BYTES, 2 * abi.KVM_DIRTY_RING_RSVD_ENTRIES)
    if entries <= 0 or entries & (entries - 1):
        raise MachineError(f"--dirty-ring {entries}: the ring size must be a power of two")
    if not smallest <= entries <= largest:
        raise MachineError(
            f"--dirty-ring {entries}: out of range; KVM takes {smallest}..{largest} entries"
        )
    return entries * ENTRY_BYTES


def enable_dirty_ring(kvm: Kvm, vm: VmFd, entries: int) -> int:
    """Enable the ring (ACQ_REL flavour when offered); returns the ring size in bytes."""
    ring_bytes = validate_ring_entries(kvm, entries)
    if kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
        vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, ring_bytes)
    else:
        vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING, ring_bytes)
    return ring_bytes
