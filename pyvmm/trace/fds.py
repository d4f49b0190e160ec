"""Which of a process's file descriptors are KVM objects, and where its kvm_run pages are.

KVM hands out a file for each object: /dev/kvm itself (the system fd), and anonymous
inodes named "kvm-vm" for a VM and "kvm-vcpu:N" for vCPU N (virt/kvm/kvm_main.c,
kvm_dev_ioctl_create_vm and create_vcpu_fd). /proc/PID/fd/N links to "/dev/kvm" or
"anon_inode:kvm-vm" / "anon_inode:kvm-vcpu:N", so one readlink classifies an fd.

A vCPU's kvm_run structure is the first page of the vCPU fd's mmap; /proc/PID/maps
shows that mapping with the same anon_inode name and file offset 0 (the dirty ring is
mapped from the same fd at offset KVM_DIRTY_LOG_PAGE_OFFSET pages).
"""

from __future__ import annotations

import os

KVM_SYSTEM = "/dev/kvm"
KVM_VM = "kvm-vm"
VCPU_PREFIX = "kvm-vcpu:"
ANON_PREFIX = "anon_inode:"


def classify_link(target: str) -> str | None:
    """ "/dev/kvm", "kvm-vm", "kvm-vcpu:N" (or another "kvm-*" device), None if not KVM."""
    if target == KVM_SYSTEM:
        return KVM_SYSTEM
    if target.startswith(ANON_PREFIX + "kvm"):
        return target[len(ANON_PREFIX) :]
    return None


def fd_kind(pid: int, fd: int) -> str | None:
    try:
        return classify_link(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except OSError:
        return None


def kvm_fds(pid: int) -> dict[int, str]:
    """Every KVM fd of a process, by number. Raises OSError if /proc/PID/fd is unreadable."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        kind = fd_kind(pid, int(name))
        if kind is not None:
            found[int(name)] = kind
    return found


def vcpu_index(kind: str) -> int | None:
    if kind.startswith(VCPU_PREFIX):
        try:
            return int(kind[len(VCPU_PREFIX) :])
        except ValueError:
            return None
    return None


def run_page_address(pid: int, kind: str) -> int | None:
    """The address of the kvm_run page of the vCPU fd named `kind`, from /proc/PID/maps.

    None when there is no such mapping or several (two VMs with a vCPU of the same index
    both mapped: the names alone cannot tell them apart)."""
    wanted = ANON_PREFIX + kind
    starts = []
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[5].rstrip("\n") != wanted:
                    continue
                if int(fields[2], 16) == 0:  # file offset 0: kvm_run, not the dirty ring
                    starts.append(int(fields[0].split("-")[0], 16))
    except OSError:
        return None
    return starts[0] if len(starts) == 1 else None
