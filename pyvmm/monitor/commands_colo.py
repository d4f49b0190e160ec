"""QMP commands for COLO: query-colo-status, x-colo-lost-heartbeat (QEMU's, from
qapi/migration.json) and x-query-colo-stats (pyvmm's own). docs/colo.md."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pyvmm.migration.colo.secondary import vcpu_seconds
from pyvmm.migration.colo.status import ColoStatusError
from pyvmm.monitor.schema import QmpError

if TYPE_CHECKING:
    from pyvmm.monitor.vmm import Vmm


def register_colo_commands(vmm: Vmm) -> None:
    qmp = vmm.qmp
    assert qmp is not None

    def query_colo_status(args: dict[str, Any]) -> dict[str, Any]:
        return vmm.colo_status.to_qmp()

    def lost_heartbeat(args: dict[str, Any]) -> None:
        """On the control loop: record the request, then wake the COLO thread, which does
        the failover (primary: leave COLO; secondary: take over)."""
        try:
            vmm.colo_status.request_failover()
        except ColoStatusError as exc:
            raise QmpError("GenericError", str(exc)) from None
        session = vmm.colo_session
        if session is not None:
            session.lost_heartbeat()

    def query_colo_stats(args: dict[str, Any]) -> dict[str, Any]:
        out = vmm.colo_stats.to_qmp(time.monotonic())
        machine = vmm.machine
        if machine is not None:
            out["vcpu-seconds"] = round(vcpu_seconds(machine), 4)
            if machine.serial2 is not None:
                out["serial2"] = machine.serial2.stream_positions()
        if vmm.colo_stats.role == "primary" and vmm.colo_stats.secondary_vcpu_s is not None:
            out["secondary-vcpu-seconds"] = round(vmm.colo_stats.secondary_vcpu_s, 4)
        return out

    qmp.register("query-colo-status", query_colo_status, query=True)
    qmp.register("x-colo-lost-heartbeat", lost_heartbeat)
    qmp.register("x-query-colo-stats", query_colo_stats, query=True)
