"""QMP: set-vcpu-dirty-limit, cancel-vcpu-dirty-limit, query-vcpu-dirty-limit (QEMU 7.1+
shapes and error texts, system/dirtylimit.c). See docs/dirty-limit.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.monitor.schema import ArgSpec, QmpError

if TYPE_CHECKING:
    from pyvmm.migration.convergence.dirtylimit import DirtyLimitController
    from pyvmm.monitor.vmm import Vmm

# QEMU's words, including the stray quote at the end of the first one.
NO_RING = "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'"
BAD_INDEX = "incorrect cpu index specified"
SET_REFUSED = "can't set dirty page rate limit while migration is running"
CANCEL_REFUSED = "can't cancel dirty page rate limit while migration is running"
NO_VCPUS = "the dirty page limit needs the guest's vCPUs, which do not exist yet"


def register_dirtylimit_commands(vmm: Vmm) -> None:
    qmp = vmm.qmp
    assert qmp is not None

    def ring_enabled() -> bool:
        machine = vmm.machine
        return machine is not None and bool(machine.config.dirty_ring_entries)

    def cpu_index(args: dict[str, Any]) -> int | None:
        if "cpu-index" not in args:
            return None
        index = args["cpu-index"]
        assert vmm.machine is not None
        if not 0 <= index < vmm.machine.config.vcpus:  # dirtylimit_vcpu_index_valid
            raise QmpError("GenericError", BAD_INDEX)
        return int(index)

    def controller() -> DirtyLimitController:
        found = vmm.dirty_limit_controller()
        if found is None:  # ring mode, but an incoming VM whose vCPUs are not created yet
            raise QmpError("GenericError", NO_VCPUS)
        return found

    def allowed(limit: DirtyLimitController | None) -> bool:
        """dirtylimit_is_allowed: not while a dirty-limit migration has the limit in service.

        (The migration's own calls do not come through QMP, so they are always allowed.)"""
        migration = vmm.migration
        return not (
            migration is not None
            and migration.active
            and vmm.settings.caps.get("dirty-limit")
            and limit is not None
            and limit.in_service
        )

    def set_limit(args: dict[str, Any]) -> None:
        rate = args["dirty-rate"]
        if rate < 0:  # the QAPI type is uint64
            raise QmpError(
                "GenericError", "Invalid parameter type for 'dirty-rate', expected: uint64"
            )
        if not ring_enabled():
            raise QmpError("GenericError", NO_RING)
        index = cpu_index(args)
        limit = controller()
        if not allowed(limit):
            raise QmpError("GenericError", SET_REFUSED)
        if rate == 0:  # QEMU: a zero rate cancels
            if limit.in_service:
                limit.cancel(index)
            return
        limit.set_limit(index, rate)

    def cancel_limit(args: dict[str, Any]) -> None:
        if not ring_enabled():
            return  # QEMU: silently nothing without the dirty ring
        index = cpu_index(args)
        limit = vmm.dirty_limit_controller()
        if not allowed(limit):
            raise QmpError("GenericError", CANCEL_REFUSED)
        if limit is None or not limit.in_service:
            return
        limit.cancel(index)

    def query_limit(args: dict[str, Any]) -> list[dict[str, int]]:
        limit = vmm.dirty_limit_controller() if ring_enabled() else None
        return limit.query() if limit is not None else []

    qmp.register(
        "set-vcpu-dirty-limit",
        set_limit,
        args={"cpu-index": ArgSpec("int", optional=True), "dirty-rate": ArgSpec("int")},
    )
    qmp.register(
        "cancel-vcpu-dirty-limit", cancel_limit, args={"cpu-index": ArgSpec("int", optional=True)}
    )
    qmp.register("query-vcpu-dirty-limit", query_limit, query=True)
