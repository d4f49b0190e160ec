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
    ]
}  # fmt: skip

CAPABILITIES: dict[str, str] = {
    "events": "emit MIGRATION and MIGRATION_PASS events",
}


@dataclass
class MigrationSettings:
    """Current parameters and capabilities of one VM (they persist across migrations)."""

    values: dict[str, Any] = field(
        default_factory=lambda: {n: p.default for n, p in PARAMETERS.items()}
    )
    caps: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(CAPABILITIES, False))

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

    def set_capabilities(self, changes: dict[str, bool]) -> None:
        for name in changes:
            if name not in CAPABILITIES:
                raise ParameterError(f"Parameter 'capability' does not accept value '{name}'")
        merged = {**self.caps, **changes}
        check_capabilities(merged)
        self.caps = merged

    def query_parameters(self) -> dict[str, Any]:
        return dict(self.values)

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": n, "state": s} for n, s in self.caps.items()]


def check_capabilities(caps: dict[str, bool]) -> None:
    """Combinations QEMU refuses (grows with the convergence features)."""


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
