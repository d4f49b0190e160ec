"""The CPUID each vCPU sees: KVM's supported set, personalised per vCPU.

- leaf 1: initial APIC ID = vCPU index (EBX[31:24]); logical processor count
  (EBX[23:16]) with HTT; the hypervisor bit. pyvmm's guests find their index
  and the vCPU count this way.
- leaves 0xB/0x1F: x2APIC ID = vCPU index.
- leaf 0x40000010: EAX = TSC frequency in kHz, EBX = APIC bus frequency in kHz
  (the VMware convention QEMU also follows); 0x40000000.EAX is raised to cover it.
"""

from __future__ import annotations

from pyvmm.kvm import abi

HYPERVISOR_TIMING_LEAF = 0x40000010
APIC_BUS_KHZ = 1_000_000  # 1 GHz, as QEMU reports
CPUID1_ECX_HYPERVISOR = 1 << 31
CPUID1_EDX_HTT = 1 << 28


def vcpu_cpuid(
    supported: list[abi.kvm_cpuid_entry2], index: int, vcpu_count: int, tsc_khz: int
) -> list[abi.kvm_cpuid_entry2]:
    entries = []
    for entry in supported:
        if entry.function == HYPERVISOR_TIMING_LEAF:
            continue
        if entry.function == 0x1:
            entry.ebx = (entry.ebx & 0x0000FFFF) | (index << 24) | (min(vcpu_count, 255) << 16)
            entry.ecx |= CPUID1_ECX_HYPERVISOR
            if vcpu_count > 1:
                entry.edx |= CPUID1_EDX_HTT
            else:
                entry.edx &= ~CPUID1_EDX_HTT
        elif entry.function in (0xB, 0x1F):
            entry.edx = index
        elif entry.function == 0x40000000:
            entry.eax = max(entry.eax, HYPERVISOR_TIMING_LEAF)
        entries.append(entry)
    timing = abi.kvm_cpuid_entry2(function=HYPERVISOR_TIMING_LEAF, eax=tsc_khz, ebx=APIC_BUS_KHZ)
    entries.append(timing)
    return entries
