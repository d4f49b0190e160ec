"""QMP commands about the VM itself: status, stop/cont, vCPUs, quit.

Shapes follow QEMU's QAPI schema (qapi/run-state.json, qapi/machine.json) so
that scripts written for QEMU read pyvmm's replies unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.monitor.schema import QmpError

if TYPE_CHECKING:
    from pyvmm.monitor.vmm import Vmm


def register_machine_commands(vmm: Vmm) -> None:
    qmp = vmm.qmp
    assert qmp is not None

    def query_status(args: dict[str, Any]) -> dict[str, Any]:
        status = vmm.run_state
        return {"running": status == "running", "singlestep": False, "status": status}

    def stop(args: dict[str, Any]) -> None:
        vmm.pause_guest()

    def cont(args: dict[str, Any]) -> None:
        if vmm.run_state in (
            "postmigrate",
            "finish-migrate",
            "shutdown",
            "inmigrate",
            "internal-error",
        ):
            raise QmpError("GenericError", f"cannot continue a VM in state '{vmm.run_state}'")
        vmm.resume_guest()

    def query_cpus_fast(args: dict[str, Any]) -> list[dict[str, Any]]:
        cpus = []
        for vcpu in vmm.machine.vcpus if vmm.machine else []:
            thread = vcpu.thread
            cpus.append(
                {
                    "cpu-index": vcpu.index,
                    "qom-path": f"/machine/unattached/device[{vcpu.index}]",
                    "thread-id": thread.native_id if thread and thread.native_id else 0,
                    "props": {"core-id": 0, "thread-id": 0, "socket-id": vcpu.index},
                    "target": "x86_64",
                }
            )
        return cpus

    def quit_(args: dict[str, Any]) -> None:
        # QEMU replies first, then shuts down; the reply is sent when we return.
        vmm.request_quit()

    def memory_hash(args: dict[str, Any]) -> dict[str, Any]:
        """pyvmm's own command: a SHA-256 of all guest RAM, to compare the two sides of a
        migration. Meaningful only while the guest is stopped."""
        if vmm.machine is None or vmm.machine.memory is None:
            raise QmpError("GenericError", "no guest memory")
        import hashlib

        digest = hashlib.sha256()
        for region in vmm.machine.memory.regions:
            digest.update(region.mm)
        return {"sha256": digest.hexdigest(), "status": vmm.run_state}

    def query_exits(args: dict[str, Any]) -> dict[str, Any]:
        """pyvmm's own command: how many times each vCPU's KVM_RUN returned to pyvmm (an
        exit; a kick's EINTR is not one), the figure `pyvmm trace` counts from outside."""
        machine = vmm.machine
        per_vcpu = machine.stats().exits_per_vcpu if machine else []
        vcpus = [{"cpu-index": i, "exits": n} for i, n in enumerate(per_vcpu)]
        return {"vcpus": vcpus, "total": sum(per_vcpu)}

    qmp.register("x-pyvmm-query-memory-hash", memory_hash, query=True)
    qmp.register("x-pyvmm-query-exits", query_exits, query=True)
    qmp.register("query-status", query_status, query=True)
    qmp.register("stop", stop)
    qmp.register("cont", cont)
    qmp.register("query-cpus-fast", query_cpus_fast, query=True)
    qmp.register("quit", quit_)
