"""QMP: calc-dirty-rate and query-dirty-rate (qapi/migration.json, QEMU 8.2 shapes), and
pyvmm's x-pyvmm-query-dirty-ring (the ring, its host quirk and its ring-full counters)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.kvm import abi
from pyvmm.monitor.schema import ArgSpec, QmpError

if TYPE_CHECKING:
    from pyvmm.monitor.vmm import Vmm


def register_dirty_commands(vmm: Vmm) -> None:
    qmp = vmm.qmp
    assert qmp is not None

    def calc_dirty_rate(args: dict[str, Any]) -> None:
        from pyvmm.dirty.rate import DirtyRateError, DirtyRateRequest  # numpy: on first use
        from pyvmm.dirty.ring import RingTracker

        req = DirtyRateRequest(
            calc_time=args["calc-time"],
            calc_time_unit=args.get("calc-time-unit", "second"),
            mode=args.get("mode", "page-sampling"),
            sample_pages=args.get("sample-pages"),
        )
        tracker = vmm.dirty_tracker if req.mode == "dirty-ring" and vmm.machine else None
        if isinstance(tracker, RingTracker):  # the virtual counted rings' size, if virtual
            tracker.use_virtual_ring(int(vmm.settings["x-vcpu-dirty-limit-ring-size"]))
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

    def query_dirty_ring(args: dict[str, Any]) -> dict[str, Any]:
        machine = vmm.machine
        if machine is None or not machine.config.dirty_ring_entries or vmm.ring_quirk is None:
            return {"enabled": False}
        entries = vmm.ring_quirk.ring_entries
        info: dict[str, Any] = {
            "enabled": True,
            "entries": entries,
            "soft-limit": entries - abi.KVM_DIRTY_RING_RSVD_ENTRIES,
            "reaper": vmm.options.dirty_ring_reaper,
            "quirk": vmm.ring_quirk.to_qmp(),
            "ring-full-exits": 0,
            "full-harvests": 0,
            "resends": 0,
        }
        # The tracker exists once the vCPUs (and their rings) do; before that, nothing ran.
        tracker = vmm.dirty_tracker if machine.vcpus else None
        from pyvmm.dirty.ring import RingTracker

        if isinstance(tracker, RingTracker):
            info["ring-full-exits"] = tracker.ring_full_exits
            info["full-harvests"] = tracker.full_harvests
            info["resends"] = tracker.resends
            info["counted-ring"] = {
                "virtual": tracker.virtual,
                "entries": tracker.counted_entries,
                "full": sum(tracker.model.fulls),
            }
            info["limit-in-service"] = tracker.limit_in_service
            info["reaper-reaps"] = tracker.reaper_reaps
            info["reaper-skips"] = tracker.reaper_skips
            info["reaper-harvests"] = tracker.reaper_harvests
        return info

    qmp.register("x-pyvmm-query-dirty-ring", query_dirty_ring, query=True)
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
