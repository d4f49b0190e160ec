"""The ctypes mirror of the KVM ABI must match the installed kernel headers exactly."""

from __future__ import annotations

import ast
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.kvm import Kvm, KvmError, KvmUnavailable, _ioctl, abi

PYVMM_DIR = Path(__file__).resolve().parent.parent / "pyvmm"

# Python field path -> C member expression, where the two spellings differ.
C_MEMBER = {
    ("kvm_vcpu_events", "triple_fault_pending"): "triple_fault.pending",
    ("kvm_run", "exit"): "io",
}
# Structs that pyvmm mirrors only in part (no sizeof comparison).
PARTIAL: set[str] = set()


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


def _c_values(tmp_path: Path, exprs: list[str]) -> list[int]:
    """Compile a program against <linux/kvm.h> that prints each C expression; its values."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check the ABI against <linux/kvm.h>"
    body = "\n    ".join(f'printf("%lu\\n", (unsigned long)({e}));' for e in exprs)
    src = (
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
        f"int main(void) {{\n    {body}\n    return 0;\n}}\n"
    )
    (tmp_path / "values.c").write_text(src)
    subprocess.run([cc, "-o", str(tmp_path / "values"), str(tmp_path / "values.c")], check=True)
    out = subprocess.run([str(tmp_path / "values")], check=True, capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _c_expr(key: str) -> str:
    """'offsetof io.port' -> offsetof(struct kvm_run, io.port); 'sizeof x' -> member size."""
    kind, _, member = key.partition(" ")
    if kind == "offsetof":
        return f"offsetof(struct kvm_run, {member})"
    if kind == "sizeof":
        return f"sizeof(((struct kvm_run *)0)->{member})"
    return key  # a macro: KVM_RUN, KVM_EXIT_IO


def test_kvm_run_size_and_the_offsets_the_cython_module_hard_codes(tmp_path) -> None:
    # _ioctl.pyx reads exit_reason and the io exit straight from the kvm_run page in C;
    # LAYOUT is every number it uses, computed by the compiled module itself.
    keys = sorted(_ioctl.LAYOUT)
    assert {"KVM_RUN", "offsetof exit_reason", "offsetof io.data_offset"} <= set(keys)
    exprs = [_c_expr(k) for k in keys]
    exprs += ["sizeof(struct kvm_run)", "offsetof(struct kvm_run, immediate_exit)"]
    c_values = _c_values(tmp_path, exprs)
    mismatches = [
        f"{key}: <linux/kvm.h> {c} != _ioctl.pyx {_ioctl.LAYOUT[key]}"
        for key, c in zip(keys, c_values, strict=False)
        if c != _ioctl.LAYOUT[key]
    ]
    assert not mismatches, "\n".join(mismatches)
    kvm_run_bytes, immediate_exit = c_values[len(keys) :]
    assert ctypes.sizeof(abi.kvm_run) == kvm_run_bytes
    assert immediate_exit == abi.KVM_RUN_IMMEDIATE_EXIT_OFFSET  # the vCPU loop's mm[...] store


def test_exit_union_members_match_header(tmp_path) -> None:
    # The members of kvm_run's exit union that vcpu.py decodes through ctypes.
    keys, py_values = [], []
    base = abi.kvm_run.exit.offset
    for member, member_type in abi._kvm_run_exit._fields_:
        if member == "padding":
            continue
        for field, *_ in member_type._fields_:
            keys.append(f"offsetof {member}.{field}")
            py_values.append(base + getattr(member_type, field).offset)
            keys.append(f"sizeof {member}.{field}")
            py_values.append(getattr(member_type, field).size)
    c_values = _c_values(tmp_path, [_c_expr(k) for k in keys])
    mismatches = [
        f"{key}: C {c} != Python {py}"
        for key, c, py in zip(keys, c_values, py_values, strict=True)
        if c != py
    ]
    assert not mismatches, "\n".join(mismatches)
    assert len(keys) > 40


# Modules whose import means "I issue ioctls myself". (fcntl is not one: flock is fine; a
# call of fcntl.ioctl is caught as a call named ioctl.)
IOCTL_MODULES = {"pyvmm.kvm._ioctl", "pyvmm.kvm.ioctl"}


def _ioctl_uses(path: Path) -> list[str]:
    """Where a file outside pyvmm/kvm imports an ioctl module or calls something named ioctl."""
    text = path.read_text()
    rel = path.relative_to(PYVMM_DIR.parent)
    if path.suffix == ".pyx":  # Cython: no ast; any ioctl call or _ioctl mention counts
        return [
            f"{rel}:{n}: {line.strip()}"
            for n, line in enumerate(text.splitlines(), 1)
            if re.search(r"\bioctl\s*\(|\b_ioctl\b|fcntl", line)
        ]
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name in IOCTL_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {a.name for a in node.names}
            if module in IOCTL_MODULES or (module == "pyvmm.kvm" and names & {"_ioctl", "ioctl"}):
                found.append(f"{where}: from {module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("ioctl", "ioctl_arg", "ioctl_read"):
                found.append(f"{where}: calls {name}()")
    return found


def test_no_ioctl_outside_the_kvm_layer() -> None:
    files = [
        p
        for p in sorted(PYVMM_DIR.rglob("*"))
        if p.suffix in (".py", ".pyx") and PYVMM_DIR / "kvm" not in p.parents
    ]
    assert len(files) > 30  # the scan really saw the package
    uses = [use for path in files for use in _ioctl_uses(path)]
    assert not uses, "ioctls belong in pyvmm/kvm (one wrapper per fd kind):\n" + "\n".join(uses)


def test_the_ioctl_scan_finds_what_it_forbids(tmp_path) -> None:
    # The scan above must be able to fail: feed it each forbidden form.
    global PYVMM_DIR
    saved, PYVMM_DIR = PYVMM_DIR, tmp_path / "pyvmm"
    try:
        PYVMM_DIR.mkdir()
        samples = {
            "a.py": "from pyvmm.kvm import VcpuFd, _ioctl\n",
            "b.py": "from pyvmm.kvm.ioctl import ioctl\n",
            "c.py": "import fcntl\nfcntl.ioctl(3, 0xAE80)\n",
            "d.py": "def f(fd):\n    return fd.ioctl(1)\n",
            "e.pyx": "cdef extern from 'sys/ioctl.h':\n    int ioctl(int fd, unsigned long r)\n",
        }
        for name, text in samples.items():
            (PYVMM_DIR / name).write_text(text)
            assert _ioctl_uses(PYVMM_DIR / name), name
        (PYVMM_DIR / "ok.py").write_text("# an ioctl in a comment\nx = 'ioctl(fd)'\n")
        assert _ioctl_uses(PYVMM_DIR / "ok.py") == []
    finally:
        PYVMM_DIR = saved


@pytest.mark.kvm
def test_xsave2_round_trips_through_vcpufd() -> None:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                size = max(ctypes.sizeof(abi.kvm_xsave), vm.check_extension(abi.KVM_CAP_XSAVE2))
                area = vcpu.get_xsave2(size)
                assert len(area) == size
                # The legacy area (x87 control word at byte 0) is what KVM_GET_XSAVE returns.
                assert area[:512] == bytes(vcpu.get_xsave())[:512]
                changed = bytearray(area)
                changed[24:28] = (0x1F80 | 0x8000).to_bytes(4, "little")  # MXCSR with FZ set
                xstate_bv = int.from_bytes(changed[512:520], "little") | 0b11  # x87, SSE valid
                changed[512:520] = xstate_bv.to_bytes(8, "little")
                vcpu.set_xsave_bytes(bytes(changed))
                assert vcpu.get_xsave2(size)[24:28] == changed[24:28]
            finally:
                vcpu.close()
        finally:
            vm.close()
