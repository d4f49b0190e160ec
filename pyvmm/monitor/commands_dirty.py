"""QMP: calc-dirty-rate and query-dirty-rate (qapi/migration.json, QEMU 8.2 shapes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.dirty.rate import DirtyRateError, DirtyRateRequest
from pyvmm.monitor.schema import ArgSpec, QmpError

if TYPE_CHECKING:
    from pyvmm.monitor.vmm import Vmm


def register_dirty_commands(vmm: Vmm) -> None:
    qmp = vmm.qmp
    assert qmp is not None

    def calc_dirty_rate(args: dict[str, Any]) -> None:
        req = DirtyRateRequest(
            calc_time=args["calc-time"],
            calc_time_unit=args.get("calc-time-unit", "second"),
            mode=args.get("mode", "page-sampling"),
            sample_pages=args.get("sample-pages"),
        )
        try:
            vmm.dirty_rate.start(req)
        except DirtyRateError as exc:
            raise QmpError("GenericError", str(exc)) from None

    def query_dirty_rate(args: dict[str, Any]) -> dict[str, Any]:
        unit = args.get("calc-time-unit", "second")
        if unit not in ("second", "millisecond"):
            raise QmpError(
                "GenericError", f"Parameter 'calc-time-unit' does not accept value '{unit}'"
            )
        return vmm.dirty_rate.query(unit)

    qmp.register(
        "calc-dirty-rate",
        calc_dirty_rate,
        args={
            "calc-time": ArgSpec("int"),
            "calc-time-unit": ArgSpec("str", optional=True),
            "sample-pages": ArgSpec("int", optional=True),
            "mode": ArgSpec("str", optional=True),
        },
    )
    qmp.register(
        "query-dirty-rate",
        query_dirty_rate,
        args={"calc-time-unit": ArgSpec("str", optional=True)},
        query=True,
    )
