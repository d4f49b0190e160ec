"""Migration parameters and capabilities, with QEMU's names, defaults, ranges and errors.

QMP's migrate-set-parameters / migrate-set-capabilities talk in these names, so
scripts written for QEMU work unchanged. Each parameter is declared once, in
PARAMETERS, with its default and its check; everything else (QMP schema,
query output, `pyvmm migrate --set`) is derived from that table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_DOWNTIME_MS = 2_000_000  # QEMU: MAX_MIGRATE_DOWNTIME_SECONDS = 2000
UINT64_MAX = (1 << 64) - 1


class ParameterError(ValueError):
    """A value QEMU would refuse; the message is QEMU's."""


def _range_check(qemu_name: str, low: int, high: int, what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not low <= value <= high:
            raise ParameterError(f"Parameter '{qemu_name}' expects {what}")

    return check


def _power_of_two_check(qemu_name: str, low: int, high: int) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not low <= value <= high or value & (value - 1):
            raise ParameterError(
                f"Parameter '{qemu_name}' expects a power of two between {low} and {high}"
            )

    return check


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # "int" or "bool", the QMP type
    default: int | bool
    check: Callable[[Any], None] | None = None
    doc: str = ""


PARAMETERS: dict[str, Parameter] = {
    p.name: p
    for p in [
        Parameter(
            "downtime-limit", "int", 300,
            _range_check("downtime_limit", 0, MAX_DOWNTIME_MS,
                         "an integer in the range of 0 to 2000 seconds"),
            "the longest acceptable pause at switchover, in ms",
        ),
        Parameter(
            "max-bandwidth", "int", 128 << 20,
            _range_check("max_bandwidth", 0, UINT64_MAX,
                         f"an integer in the range of 0 to {UINT64_MAX} bytes/second"),
            "bytes per second the migration may use before switchover (0 = no limit)",
        ),
        Parameter(
            "avail-switchover-bandwidth", "int", 0,
            _range_check("avail_switchover_bandwidth", 0, UINT64_MAX,
                         f"an integer in the range of 0 to {UINT64_MAX} bytes/second"),
            "bytes per second to assume at switchover instead of the estimate (0 = estimate)",
        ),
        # --- convergence (docs/convergence.md) ---
        Parameter(
            "throttle-trigger-threshold", "int", 50,
            _range_check("throttle_trigger_threshold", 1, 100,
                         "an integer in the range of 1 to 100"),
            "a period is too dirty when dirtied bytes exceed this % of the bytes sent",
        ),
        Parameter(
            "cpu-throttle-initial", "int", 20,
            _range_check("cpu_throttle_initial", 1, 99, "an integer in the range of 1 to 99"),
            "auto-converge's first throttle step, %",
        ),
        Parameter(
            "cpu-throttle-increment", "int", 10,
            _range_check("cpu_throttle_increment", 1, 99, "an integer in the range of 1 to 99"),
            "auto-converge's later steps, %",
        ),
        Parameter("cpu-throttle-tailslow", "bool", False, None,
                  "smaller steps near the end, scaled by allowed/actual dirty bytes"),
        Parameter(
            "max-cpu-throttle", "int", 99,
            _range_check("max_cpu_throttle", 1, 99, "an integer in the range of 1 to 99"),
            "auto-converge never throttles beyond this %",
        ),
        Parameter("x-auto-converge-legacy", "bool", False, None,
                  "QEMU 1.6's 2013 auto-converge: 6th bad period, then 30 ms sleeps every 40 ms"),
        Parameter("x-cpu-throttle-periodic-sync", "bool", True, None,
                  "QEMU 9.2's periodic dirty sync while auto-converge is on (false: <= 9.1)"),
        Parameter(
            "x-cpu-throttle-periodic-sync-interval", "int", 5000,
            _range_check("x-cpu-throttle-periodic-sync-interval", 100, 600_000,
                         "a value between 100 and 600000"),
            "ms between periodic sync ticks",
        ),
        Parameter("cpu-throttle-responsive", "bool", False, None,
                  "the 2024 series' second trigger: a dirty ratio that is not improving"),
        Parameter(
            "x-vcpu-dirty-limit-period", "int", 1000,
            _range_check("x-vcpu-dirty-limit-period", 1, 1000, "a value between 1 and 1000"),
            "ms: the dirty limit's measurement period during migration",
        ),
        Parameter(
            "vcpu-dirty-limit", "int", 1,
            _range_check("vcpu_dirty_limit", 1, UINT64_MAX,
                         "is invalid, it must greater then 1 MB/s"),
            "MB/s per vCPU that the dirty limit enforces during migration",
        ),
        Parameter(
            "x-vcpu-dirty-limit-ring-size", "int", 4096,
            _power_of_two_check("x-vcpu-dirty-limit-ring-size", 64, 65536),
            "entries of the virtual dirty ring the dirty limit penalises per (pyvmm's own)",
        ),
    ]
}  # fmt: skip

CAPABILITIES: dict[str, str] = {
    "events": "emit MIGRATION and MIGRATION_PASS events",
    "auto-converge": "throttle every vCPU when the guest dirties memory faster than it is sent",
    "dirty-limit": "limit each vCPU's dirty rate (needs --dirty-ring)",
    "x-record-checksum": "an xxHash64 checksum on every stream record and reply (pyvmm's own)",
}
# Defaults other than off (QEMU's are all off). x-record-checksum is on by default only
# if it costs under 5 % of tools/bench_migrate.py's figure 1 (--checksum-cost measures
# it); on this project's shared 2-core machines it cost more, so it is off.
CAPABILITY_DEFAULTS: dict[str, bool] = {"x-record-checksum": False}


@dataclass
class MigrationSettings:
    """Current parameters and capabilities of one VM (they persist across migrations)."""

    values: dict[str, Any] = field(
        default_factory=lambda: {n: p.default for n, p in PARAMETERS.items()}
    )
    caps: dict[str, bool] = field(
        default_factory=lambda: {n: CAPABILITY_DEFAULTS.get(n, False) for n in CAPABILITIES}
    )

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def set_parameters(self, changes: dict[str, Any]) -> None:
        """Validate all, then apply all (QEMU applies nothing if one is invalid)."""
        for name, value in changes.items():
            param = PARAMETERS.get(name)
            if param is None:
                raise ParameterError(f"Parameter '{name}' is unexpected")
            if param.type == "bool" and not isinstance(value, bool):
                raise ParameterError(f"Invalid parameter type for '{name}', expected: boolean")
            if param.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ParameterError(f"Invalid parameter type for '{name}', expected: integer")
            if param.check is not None:
                param.check(value)
        self.values.update(changes)

    def set_capabilities(self, changes: dict[str, bool], dirty_ring: bool) -> None:
        for name in changes:
            if name not in CAPABILITIES:
                raise ParameterError(f"Parameter 'capability' does not accept value '{name}'")
        merged = {**self.caps, **changes}
        check_capabilities(merged, dirty_ring)
        self.caps = merged

    def query_parameters(self) -> dict[str, Any]:
        return dict(self.values)

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": n, "state": s} for n, s in self.caps.items()]


def check_capabilities(caps: dict[str, bool], dirty_ring: bool) -> None:
    """Combinations QEMU refuses, with QEMU's words (migrate_caps_check)."""
    if caps.get("dirty-limit"):
        if caps.get("auto-converge"):
            raise ParameterError("dirty-limit conflicts with auto-converge either enable one")
        if not dirty_ring:
            raise ParameterError(
                "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set"
            )


def parse_cli_value(name: str, text: str) -> Any:
    """`pyvmm migrate --set NAME=VALUE`: VALUE in QMP's own type (true/false for booleans)."""
    param = PARAMETERS.get(name)
    if param is None:
        raise ParameterError(
            f"unknown migration parameter '{name}' (known: {', '.join(PARAMETERS)})"
        )
    if param.type == "bool":
        if text not in ("true", "false"):
            raise ParameterError(f"parameter '{name}' takes true or false, not '{text}'")
        return text == "true"
    try:
        return int(text, 0)
    except ValueError:
        raise ParameterError(f"parameter '{name}' takes an integer, not '{text}'") from None
