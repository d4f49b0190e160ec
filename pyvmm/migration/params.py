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
UINT32_MAX = (1 << 32) - 1


class ParameterError(ValueError):
    """A value QEMU would refuse; the message is QEMU's."""


def _range_check(qemu_name: str, low: int, high: int, what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not low <= value <= high:
            raise ParameterError(f"Parameter '{qemu_name}' expects {what}")

    return check


def _colo_check(underscored: str, dashed: str, word: str = "must") -> Callable[[Any], None]:
    """COLO's times and count. Negative: the ORBIT branch's text (qmp_migrate_set_parameters
    there: QERR_INVALID_PARAMETER_VALUE, "is invalid, it must be positive"; "should" for
    x_checkpoint_delay, as upstream QEMU 2.8 had it). Above 2^32-1: upstream's, whose
    x-checkpoint-delay is a uint32 (QAPI's visit_type_uintN)."""

    def check(value: Any) -> None:
        if value < 0:
            message = f"Parameter '{underscored}' expects is invalid, it {word} be positive"
            raise ParameterError(message)
        if value > UINT32_MAX:
            raise ParameterError(f"Parameter '{dashed}' expects uint32_t")

    return check


def _channels_check(value: Any) -> None:
    """multifd-channels, a uint8 in QAPI: above 255 (or negative, which QAPI's input
    visitor accepts as a huge unsigned number) fails the visitor's type check
    (visit_type_uintN); 0 fails migrate_params_check (migration/options.c)."""
    if not 0 <= value <= 255:
        raise ParameterError("Parameter 'multifd-channels' expects uint8_t")
    if value < 1:
        raise ParameterError("Parameter 'multifd_channels' expects a value between 1 and 255")


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
    type: str  # "int", "bool" or "enum" (a QMP string from `choices`)
    default: int | bool | str
    check: Callable[[Any], None] | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()


# x-auto-converge-sync: when auto-converge gets a dirty sync to judge (docs/convergence.md)
SYNC_ITERATION, SYNC_TIMER, SYNC_BACKGROUND = "iteration", "timer", "background"
SYNC_MODES = (SYNC_ITERATION, SYNC_TIMER, SYNC_BACKGROUND)

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
        Parameter("x-switchover-during-bulk", "bool", False, None,
                  "allow the switchover before every page was sent once (QEMU's rule)"),
        Parameter("multifd-channels", "int", 2, _channels_check,
                  "with the multifd capability: connections (and sender threads) for RAM "
                  "pages beside the main stream"),
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
                  "QEMU 1.6's 2013 auto-converge: 7th bad period, then 30 ms sleeps from the "
                  "send loop"),
        Parameter("x-auto-converge-sync", "enum", SYNC_TIMER, None,
                  "when auto-converge syncs: iteration (once per pass, QEMU <= 9.1), timer "
                  "(QEMU 9.2's 5 s timer) or background (the 2024 v1 series' watcher)",
                  SYNC_MODES),
        Parameter("cpu-periodic-throttle", "bool", False, None,
                  "the 2024 RFC's periodic CPU throttle: a sync every interval"),
        Parameter(
            "cpu-periodic-throttle-interval", "int", 5,
            _range_check("cpu_periodic_throttle_interval", 2, 10,
                         "an integer in the range of 2 to 10"),
            "seconds between the RFC's periodic syncs",
        ),
        Parameter("cpu-throttle-responsive", "bool", False, None,
                  "the 2024 series' second trigger: a dirty ratio that is not improving "
                  "(v2's name; v1 and the RFC called it cpu-responsive-throttle)"),
        Parameter("x-throttle-thread-scheduled-leak", "bool", False, None,
                  "pyvmm's own: keep QEMU's leaked per-vCPU throttle_thread_scheduled flag "
                  "across migrations"),
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
            # KVM's range: a ring is at least a page (256 entries), at most 65536 entries.
            _power_of_two_check("x-vcpu-dirty-limit-ring-size", 256, 65536),
            "entries of the virtual dirty ring that counts entries and that the dirty limit "
            "penalises per, on hosts where a full real ring may lose entries (pyvmm's own)",
        ),
        # --- COLO (docs/colo.md): the ORBIT branch's names and defaults ---
        Parameter("x-colo-max-time", "int", 10000,
                  _colo_check("x_colo_max_time", "x-colo-max-time", "should"),
                  "ms: the longest COLO checkpoint without a miscompare"),
        Parameter("x-colo-min-time", "int", 3,
                  _colo_check("x_colo_min_time", "x-colo-min-time", "should"),
                  "ms: the shortest checkpoint after a miscompare (the relax wait)"),
        Parameter("colo-passive-count", "int", 100,
                  _colo_check("colo_passive_count", "colo-passive-count"),
                  "passive checkpoints before COLO is tried again"),
        Parameter("colo-passive-limit", "int", 400,
                  _colo_check("colo_passive_limit", "colo-passive-limit"),
                  "ms: a mean checkpoint length below this switches to passive mode"),
        Parameter("colo-passive-time", "int", 250,
                  _colo_check("colo_passive_time", "colo-passive-time"),
                  "ms: the period of passive checkpoints"),
        Parameter(
            "x-colo-migrate-ram-threshold", "int", 100 << 20,
            _range_check("x_colo_migrate_ram_threshold", 0, UINT64_MAX,
                         f"an integer in the range of 0 to {UINT64_MAX} bytes"),
            "bytes: with more dirty, a checkpoint sends dirty RAM before it stops the primary",
        ),
    ]
}  # fmt: skip

# Other names for a parameter, each accepted and listed by query-migrate-parameters.
ALIASES: dict[str, str] = {
    "cpu-responsive-throttle": "cpu-throttle-responsive",
    # Upstream QEMU's name for the longest interval without a checkpoint; one value with
    # x-colo-max-time, the RFC branch's default (10000 ms, not upstream's 20000).
    "x-checkpoint-delay": "x-colo-max-time",
}
# An alias whose errors name it differently from its parameter's.
ALIAS_CHECKS: dict[str, Callable[[Any], None]] = {
    "x-checkpoint-delay": _colo_check("x_checkpoint_delay", "x-checkpoint-delay", "should"),
}
# What migrate-set-parameters accepts: every parameter and every alias.
QMP_PARAMETERS: dict[str, Parameter] = {
    **PARAMETERS,
    **{alias: PARAMETERS[name] for alias, name in ALIASES.items()},
}

CAPABILITIES: dict[str, str] = {
    "events": "emit MIGRATION and MIGRATION_PASS events",
    "auto-converge": "throttle every vCPU when the guest dirties memory faster than it is sent",
    "dirty-limit": "limit each vCPU's dirty rate (needs --dirty-ring)",
    "x-record-checksum": "an xxHash64 checksum on every stream record and reply (pyvmm's own)",
    "multifd": "send RAM pages over multifd-channels extra connections, one thread each",
    "x-colo": "after the migration, both VMs run and the primary checkpoints to the secondary "
    "(COLO fault tolerance)",
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

    explicit: set[str] = field(default_factory=set)  # parameters a user has set

    def set_parameters(self, changes: dict[str, Any]) -> None:
        """Validate all, then apply all (QEMU applies nothing if one is invalid)."""
        canonical: dict[str, Any] = {}
        for name, value in changes.items():
            param = QMP_PARAMETERS.get(name)
            if param is None:
                raise ParameterError(f"Parameter '{name}' is unexpected")
            check_type(name, param, value)
            check = ALIAS_CHECKS.get(name, param.check)
            if check is not None:
                check(value)
            if param.name in canonical and canonical[param.name] != value:
                raise ParameterError(
                    f"Parameters '{param.name}' and '{_alias_of(param.name)}' are one "
                    "parameter: give it one value"
                )
            canonical[param.name] = value
        self.values.update(canonical)
        self.explicit.update(canonical)

    def auto_converge_sync(self) -> str:
        """The sync generation auto-converge runs: x-auto-converge-sync, except that the
        RFC's periodic throttle and the 2013 mode, written against syncs once per pass, get
        `iteration` while x-auto-converge-sync was left at its default."""
        sync = str(self.values["x-auto-converge-sync"])
        values = self.values
        once_per_pass = values["cpu-periodic-throttle"] or values["x-auto-converge-legacy"]
        if once_per_pass and "x-auto-converge-sync" not in self.explicit:
            return SYNC_ITERATION
        return sync

    def check_migrate(self) -> None:
        """Combinations refused at `migrate` (each parameter is valid on its own)."""
        sync = self.values["x-auto-converge-sync"]
        if "x-auto-converge-sync" not in self.explicit or sync == SYNC_ITERATION:
            return
        for name in ("cpu-periodic-throttle", "x-auto-converge-legacy"):
            if self.values[name]:
                raise ParameterError(
                    f"Parameter '{name}' syncs once per pass: it cannot run with "
                    f"'x-auto-converge-sync' set to '{sync}' (set it to 'iteration')"
                )

    def set_capabilities(self, changes: dict[str, bool], dirty_ring: bool) -> None:
        for name in changes:
            if name not in CAPABILITIES:
                raise ParameterError(f"Parameter 'capability' does not accept value '{name}'")
        merged = {**self.caps, **changes}
        check_capabilities(merged, dirty_ring)
        self.caps = merged

    def query_parameters(self) -> dict[str, Any]:
        out = dict(self.values)
        for alias, name in ALIASES.items():
            out[alias] = self.values[name]
        return out

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": n, "state": s} for n, s in self.caps.items()]


def _alias_of(name: str) -> str:
    return next(alias for alias, target in ALIASES.items() if target == name)


def check_type(name: str, param: Parameter, value: Any) -> None:
    """QMP's type check for one parameter, with QEMU's words."""
    if param.type == "bool" and not isinstance(value, bool):
        raise ParameterError(f"Invalid parameter type for '{name}', expected: boolean")
    if param.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParameterError(f"Invalid parameter type for '{name}', expected: integer")
    if param.type == "enum":
        if not isinstance(value, str):
            raise ParameterError(f"Invalid parameter type for '{name}', expected: string")
        if value not in param.choices:  # QEMU's qapi input_type_enum
            raise ParameterError(f"Parameter '{name}' does not accept value '{value}'")


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
    param = QMP_PARAMETERS.get(name)
    if param is None:
        raise ParameterError(
            f"unknown migration parameter '{name}' (known: {', '.join(QMP_PARAMETERS)})"
        )
    if param.type == "bool":
        if text not in ("true", "false"):
            raise ParameterError(f"parameter '{name}' takes true or false, not '{text}'")
        return text == "true"
    if param.type == "enum":
        if text not in param.choices:
            raise ParameterError(
                f"parameter '{name}' takes one of {', '.join(param.choices)}, not '{text}'"
            )
        return text
    try:
        return int(text, 0)
    except ValueError:
        raise ParameterError(f"parameter '{name}' takes an integer, not '{text}'") from None
