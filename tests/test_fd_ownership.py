"""Every fd has one owner that closes it, on success and on every error path.

Failures are injected by replacing the typed ioctl wrapper that a module imported
(pyvmm.kvm.system.ioctl, pyvmm.kvm.vm.ioctl): the rest is real /dev/kvm.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest

import guestgen
import pyvmm.kvm.system
import pyvmm.kvm.vm
from pyvmm.kvm import Kvm, KvmError, KvmUnavailable, abi
from pyvmm.machine.elf import parse_pvh_image
from pyvmm.machine.errors import MachineError
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.monitor.vmm import RunOptions, Vmm

pytestmark = pytest.mark.kvm


def fd_targets() -> list[str]:
    """What each of this process's fds points at (sorted), for a readable diff on a leak."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir used, closed since
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
    return sorted(targets)


@contextmanager
def no_fd_leak() -> Iterator[None]:
    before = fd_targets()
    yield
    after = fd_targets()
    leaked = list(after)
    for target in before:
        if target in leaked:
            leaked.remove(target)
    assert len(after) <= len(before), f"leaked fds: {leaked}"


def fail_ioctl(
    monkeypatch: pytest.MonkeyPatch,
    module: ModuleType,
    name: str,
    *,
    err: int = errno.EIO,
    result: int | None = None,
    after: int = 0,
) -> None:
    """Make request `name` through module.ioctl fail with err (or return `result`) from
    its (after+1)-th call on; every other request goes to the real ioctl."""
    real = module.ioctl
    request = getattr(abi, name)
    calls = [0]

    def ioctl(fd: int, req: int, arg: object = 0) -> int:
        if req == request:
            calls[0] += 1
            if calls[0] > after:
                if result is not None:
                    return result
                raise KvmError(name, err)
        return real(fd, req, arg)

    monkeypatch.setattr(module, "ioctl", ioctl)


def image() -> object:
    return parse_pvh_image(guestgen.make_elf(guestgen.CLI_HLT), "test-image")


# --- Kvm ---------------------------------------------------------------------------------------


def test_kvm_closes_its_fd_when_get_api_version_fails(monkeypatch) -> None:
    fail_ioctl(monkeypatch, pyvmm.kvm.system, "KVM_GET_API_VERSION")
    with no_fd_leak(), pytest.raises(KvmError, match="KVM_GET_API_VERSION failed"):
        Kvm()


def test_kvm_closes_its_fd_on_a_wrong_api_version(monkeypatch) -> None:
    fail_ioctl(monkeypatch, pyvmm.kvm.system, "KVM_GET_API_VERSION", result=11)
    with no_fd_leak(), pytest.raises(KvmUnavailable, match="API version 11"):
        Kvm()


def test_create_vm_leaves_no_vm_fd_when_a_later_step_fails(monkeypatch) -> None:
    with Kvm() as kvm:
        fail_ioctl(monkeypatch, pyvmm.kvm.system, "KVM_GET_VCPU_MMAP_SIZE")
        with no_fd_leak(), pytest.raises(KvmError, match="KVM_GET_VCPU_MMAP_SIZE"):
            kvm.create_vm()


def test_vcpufd_closes_its_fd_when_kvm_run_cannot_be_mapped(monkeypatch) -> None:
    # A mapping smaller than struct kvm_run: the ctypes view of it fails after mmap worked.
    fail_ioctl(monkeypatch, pyvmm.kvm.system, "KVM_GET_VCPU_MMAP_SIZE", result=64)
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            with no_fd_leak(), pytest.raises(ValueError):
                vm.create_vcpu(0)
        finally:
            vm.close()


# --- Machine -----------------------------------------------------------------------------------


def test_machine_closes_its_kvm_when_create_vm_fails(monkeypatch) -> None:
    fail_ioctl(monkeypatch, pyvmm.kvm.system, "KVM_CREATE_VM", err=errno.ENOMEM)
    with no_fd_leak(), pytest.raises(KvmError, match=r"KVM_CREATE_VM failed.*ENOMEM"):
        Machine(MachineConfig(16 << 20, 1))


def test_machine_owns_a_kvm_it_is_given_also_when_it_fails(monkeypatch) -> None:
    with no_fd_leak():
        kvm = Kvm()
        with pytest.raises(MachineError, match="--vcpus 0"):
            Machine(MachineConfig(16 << 20, 0), kvm=kvm)
        assert kvm.fd == -1
    fail_ioctl(monkeypatch, pyvmm.kvm.system, "KVM_CREATE_VM")
    with no_fd_leak():
        kvm = Kvm()
        with pytest.raises(KvmError):
            Machine(MachineConfig(16 << 20, 1), kvm=kvm)
        assert kvm.fd == -1
    monkeypatch.undo()
    with no_fd_leak():
        kvm = Kvm()
        Machine(MachineConfig(16 << 20, 1), kvm=kvm).close()
        assert kvm.fd == -1


def test_machine_releases_everything_when_a_memory_slot_fails(monkeypatch) -> None:
    fail_ioctl(monkeypatch, pyvmm.kvm.vm, "KVM_SET_USER_MEMORY_REGION", err=errno.EINVAL)
    with no_fd_leak(), pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION"):
        Machine(MachineConfig(16 << 20, 1))


@pytest.mark.parametrize(
    ("module", "name", "kw"),
    [
        (pyvmm.kvm.vm, "KVM_CREATE_VCPU", {"after": 1}),  # the second vCPU
        (pyvmm.kvm.system, "KVM_GET_VCPU_MMAP_SIZE", {"result": 64}),  # kvm_run unmappable
    ],
    ids=["create-vcpu", "map-kvm-run"],
)
def test_machine_close_releases_vcpus_after_a_failed_boot(monkeypatch, module, name, kw) -> None:
    with no_fd_leak():
        fail_ioctl(monkeypatch, module, name, **kw)
        machine = Machine(MachineConfig(16 << 20, 2))
        try:
            with pytest.raises((KvmError, ValueError)):
                machine.boot(image())
        finally:
            machine.close()


# --- Vmm: the whole process's life, 50 times ---------------------------------------------------


def test_fifty_vmm_runs_leak_no_fds_or_threads() -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run_hello() -> None:
        out = io.StringIO()
        result = Vmm(RunOptions(image="hello", mem_bytes=32 << 20, vcpus=2), out).run()
        assert (result.code, result.error) == (0, False), result
        assert "hello from pyvmm guest" in out.getvalue()

    try:
        run_hello()  # warm up what is created once per process
        threads = threading.active_count()
        with no_fd_leak():
            for _ in range(50):
                run_hello()
        assert threading.active_count() == threads
    finally:
        for signum, handler in saved.items():  # Vmm.run installed its own
            signal.signal(signum, handler)
