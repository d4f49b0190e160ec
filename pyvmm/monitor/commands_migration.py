"""QMP migration commands, shaped like QEMU's (qapi/migration.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.migration.params import QMP_PARAMETERS, ParameterError
from pyvmm.migration.transport import parse_uri
from pyvmm.monitor.schema import ArgSpec, QmpError
from pyvmm.unixsocket import socket_is_live

if TYPE_CHECKING:
    from pyvmm.monitor.vmm import Vmm


def _generic(exc: Exception) -> QmpError:
    return QmpError("GenericError", str(exc))


def register_migration_commands(vmm: Vmm) -> None:
    qmp = vmm.qmp
    assert qmp is not None

    def migrate(args: dict[str, Any]) -> None:
        if "uri" not in args:  # QEMU: migration_channel_parse_input
            raise QmpError("GenericError", "need either 'uri' or 'channels' argument")
        if args.get("resume"):
            raise QmpError("GenericError", "Cannot resume: pyvmm has no postcopy")
        if vmm.migration is not None and (vmm.migration.active or vmm.migration.in_colo):
            raise QmpError("GenericError", "There's a migration process in progress")
        if vmm.run_state in ("inmigrate", "prelaunch") or vmm.machine is None:
            raise QmpError("GenericError", "Guest is waiting for an incoming migration")
        if vmm.run_state in ("shutdown", "internal-error"):
            raise QmpError("GenericError", f"cannot migrate a VM in state '{vmm.run_state}'")
        try:
            parse_uri(args["uri"])
            vmm.settings.check_migrate()
        except ValueError as exc:  # ParameterError is one
            raise _generic(exc) from None
        compare = vmm.options.colo_compare
        if vmm.settings.caps.get("x-colo") and compare and not socket_is_live(compare[5:]):
            raise QmpError("GenericError", f"the COLO comparator at {compare} does not answer")
        vmm.start_migration(args["uri"])

    def migrate_cancel(args: dict[str, Any]) -> None:
        # QEMU's qmp_migrate_cancel: nothing when no migration runs or it has ended; on a
        # destination it fails the incoming migration in progress.
        if vmm.migration is not None:
            vmm.migration.cancel()
        vmm.cancel_incoming()

    def migrate_incoming(args: dict[str, Any]) -> None:
        if vmm.options.incoming != "defer":
            raise QmpError("GenericError", "'-incoming' was not specified on the command line")
        if vmm.incoming is not None:
            raise QmpError("GenericError", "The incoming migration has already been started")
        try:
            vmm.listen_incoming(args["uri"], exit_on_error=args.get("exit-on-error", True))
        except (ValueError, OSError) as exc:
            raise _generic(exc) from None

    def query_migrate(args: dict[str, Any]) -> dict[str, Any]:
        if vmm.migration is not None:
            return vmm.migration.query()
        return vmm.incoming_status.to_qmp()

    def set_parameters(args: dict[str, Any]) -> None:
        try:
            vmm.settings.set_parameters(args)
        except ParameterError as exc:
            raise _generic(exc) from None
        vmm.record_event("migrate-set-parameters", args)

    def set_capabilities(args: dict[str, Any]) -> None:
        changes: dict[str, bool] = {}
        for i, item in enumerate(args["capabilities"]):
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise QmpError("GenericError", f"Invalid parameter type for 'capabilities[{i}]', "
                               "expected: object with 'capability' and 'state'")  # fmt: skip
            if not isinstance(item["capability"], str):
                desc = (
                    f"Invalid parameter type for 'capabilities[{i}].capability', expected: string"
                )
                raise QmpError("GenericError", desc)
            if not isinstance(item["state"], bool):
                desc = f"Invalid parameter type for 'capabilities[{i}].state', expected: boolean"
                raise QmpError("GenericError", desc)
            changes[item["capability"]] = item["state"]
        if vmm.migration is not None and (vmm.migration.active or vmm.migration.in_colo):
            raise QmpError("GenericError", "There's a migration process in progress")
        try:
            ring = vmm.machine is not None and vmm.machine.ring_bytes > 0
            vmm.settings.set_capabilities(changes, dirty_ring=ring)
        except ParameterError as exc:
            raise _generic(exc) from None
        vmm.record_event("migrate-set-capabilities", changes)

    qmp.register(
        "migrate",
        migrate,
        args={
            "uri": ArgSpec("str", optional=True),
            "detach": ArgSpec("bool", optional=True),
            "resume": ArgSpec("bool", optional=True),
        },
    )
    qmp.register("migrate_cancel", migrate_cancel)
    qmp.register(
        "migrate-incoming",
        migrate_incoming,
        args={"uri": ArgSpec("str"), "exit-on-error": ArgSpec("bool", optional=True)},
    )
    qmp.register("query-migrate", query_migrate, query=True)
    qmp.register(
        "migrate-set-parameters",
        set_parameters,
        args={
            name: ArgSpec("str" if p.type == "enum" else p.type, optional=True, choices=p.choices)
            for name, p in QMP_PARAMETERS.items()
        },
    )
    qmp.register(
        "query-migrate-parameters", lambda args: vmm.settings.query_parameters(), query=True
    )
    qmp.register(
        "migrate-set-capabilities", set_capabilities, args={"capabilities": ArgSpec("list")}
    )
    qmp.register(
        "query-migrate-capabilities", lambda args: vmm.settings.query_capabilities(), query=True
    )
