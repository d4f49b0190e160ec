"""The ctypes mirror of the KVM ABI must match the installed kernel headers exactly."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from pyvmm.kvm import Kvm, KvmError, KvmUnavailable, abi

# Python field path -> C member expression, where the two spellings differ.
C_MEMBER = {
    ("kvm_vcpu_events", "triple_fault_pending"): "triple_fault.pending",
    ("kvm_run", "exit"): "io",
}
# Structs that pyvmm mirrors only in part (no sizeof comparison).
PARTIAL = {"kvm_run"}


def _c_program() -> tuple[str, list[str]]:
    lines, keys = [], []
    for struct in abi.STRUCTS:
        name = struct.__name__
        if name not in PARTIAL:
            keys.append(f"sizeof {name}")
            lines.append(f'printf("%zu\\n", sizeof(struct {name}));')
        for field, *_ in struct._fields_:
            member = C_MEMBER.get((name, field), field)
            keys.append(f"offsetof {name}.{field}")
            lines.append(f'printf("%zu\\n", offsetof(struct {name}, {member}));')
    for _request, rname in sorted(abi.IOCTL_NAMES.items(), key=lambda kv: kv[1]):
        if rname.startswith("KVM_") and not rname.startswith("KVM_CAP"):
            keys.append(f"ioctl {rname}")
            lines.append(f'printf("%lu\\n", (unsigned long){rname});')
    body = "\n    ".join(lines)
    src = (
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
        f"int main(void) {{\n    {body}\n    return 0;\n}}\n"
    )
    return src, keys


def _python_values() -> list[int]:
    values = []
    for struct in abi.STRUCTS:
        if struct.__name__ not in PARTIAL:
            values.append(ctypes.sizeof(struct))
        for field, *_ in struct._fields_:
            values.append(getattr(struct, field).offset)
    for _request, rname in sorted(abi.IOCTL_NAMES.items(), key=lambda kv: kv[1]):
        if rname.startswith("KVM_") and not rname.startswith("KVM_CAP"):
            values.append(getattr(abi, rname))
    return values


def test_structs_and_requests_match_installed_header(tmp_path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check the ABI against <linux/kvm.h>"
    src, keys = _c_program()
    (tmp_path / "abi.c").write_text(src)
    subprocess.run([cc, "-o", str(tmp_path / "abi"), str(tmp_path / "abi.c")], check=True)
    out = subprocess.run([str(tmp_path / "abi")], check=True, capture_output=True, text=True)
    c_values = [int(x) for x in out.stdout.split()]
    mismatches = [
        f"{key}: C {c} != Python {py}"
        for key, c, py in zip(keys, c_values, _python_values(), strict=True)
        if c != py
    ]
    assert not mismatches, "\n".join(mismatches)
    assert len(keys) > 150  # the check really covered the ABI


def test_each_request_number_names_one_ioctl() -> None:
    """`pyvmm trace` names calls by number: two names for one number would be ambiguous."""
    requests = {
        name: value
        for name, value in vars(abi).items()
        if name.startswith("KVM_") and isinstance(value, int) and (value >> 8) & 0xFF == abi.KVMIO
    }
    assert len(set(requests.values())) == len(requests) == len(abi.IOCTL_NAMES)
    # The ones QEMU issues that pyvmm does not are there too.
    for name in (
        "KVM_IRQ_LINE_STATUS",
        "KVM_IOEVENTFD",
        "KVM_SET_GSI_ROUTING",
        "KVM_SET_SREGS2",
        "KVM_REGISTER_COALESCED_MMIO",
        "KVM_X86_SET_MSR_FILTER",
        "KVM_TPR_ACCESS_REPORTING",
    ):
        assert abi.IOCTL_NAMES[getattr(abi, name)] == name


def test_constants_match_header(tmp_path) -> None:
    names = [
        n
        for n in dir(abi)
        if n.startswith(("KVM_CAP_", "KVM_EXIT_", "KVM_MEM_", "KVM_DIRTY_"))
        and isinstance(getattr(abi, n), int)
        and n not in ("KVM_DIRTY_RING_RSVD_ENTRIES", "KVM_DIRTY_RING_MAX_ENTRIES")
    ]
    body = "\n".join(f'printf("%ld\\n", (long){n});' for n in names)
    (tmp_path / "c.c").write_text(
        f"#include <stdio.h>\n#include <linux/kvm.h>\nint main(void){{\n{body}\nreturn 0;}}\n"
    )
    subprocess.run(["cc", "-o", str(tmp_path / "c"), str(tmp_path / "c.c")], check=True)
    out = subprocess.run([str(tmp_path / "c")], check=True, capture_output=True, text=True)
    for name, value in zip(names, out.stdout.split(), strict=True):
        assert getattr(abi, name) == int(value), name


def test_missing_device_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm(str(tmp_path / "no-kvm"))


def test_not_a_kvm_device_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "plain"
    path.write_text("")
    with pytest.raises(KvmError, match="KVM_GET_API_VERSION failed"):
        Kvm(str(path))


@pytest.mark.kvm
def test_failed_ioctl_names_itself_and_errno() -> None:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vm.create_vcpu(0)
            # A second vCPU with the same id is refused by KVM.
            with pytest.raises(KvmError) as info:
                vm.create_vcpu(0)
            assert info.value.ioctl_name == "KVM_CREATE_VCPU"
            assert "File exists" in str(info.value) and "EEXIST" in str(info.value)
        finally:
            vm.close()


@pytest.mark.kvm
def test_capabilities_pyvmm_relies_on() -> None:
    with Kvm() as kvm:
        assert kvm.check_extension(abi.KVM_CAP_IMMEDIATE_EXIT) == 1
        assert kvm.check_extension(abi.KVM_CAP_USER_MEMORY) == 1
        assert kvm.vcpu_mmap_size() >= ctypes.sizeof(abi.kvm_run)
        leaves = {e.function for e in kvm.supported_cpuid()}
        assert 0x1 in leaves and 0x40000000 in leaves
        assert 0x10 in kvm.msr_index_list()  # IA32_TSC
