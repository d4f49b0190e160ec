"""What a QMP command accepts, and how it fails.

QEMU generates argument checking from its QAPI schema; pyvmm declares the
arguments of each command with a small `ArgSpec` per argument and checks
them here, with QEMU's error texts, before the handler runs. QMP clients
match on those texts rarely, but people read them, and scripts written
against QEMU print them: keep them word for word.

Nothing here knows about sockets or JSON framing; see server.py for that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "ArgSpec",
    "ErrorClass",
    "QmpError",
    "check_arguments",
]


class ErrorClass(StrEnum):
    """QEMU's error classes (qapi/error.json, QapiErrorClass). Nothing else goes on the wire."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


_ERROR_CLASSES = frozenset(c.value for c in ErrorClass)


class QmpError(Exception):
    """A command failed; becomes `{"error": {"class": ..., "desc": ...}}` on the wire.

    Handlers raise it: `raise QmpError("DeviceNotFound", "Device 'foo' not found")`.
    """

    def __init__(self, error_class: str, desc: str) -> None:
        if error_class not in _ERROR_CLASSES:
            raise ValueError(
                f"unknown QMP error class {error_class!r}; use one of {sorted(_ERROR_CLASSES)}"
            )
        super().__init__(desc)
        self.error_class = str(error_class)
        self.desc = desc

    def to_json(self) -> dict[str, str]:
        """The value of the reply's "error" member."""
        return {"class": self.error_class, "desc": self.desc}


# Our type names -> (accepts value?, QEMU's word for the expected type).
# bool is a subclass of int in Python, but never an integer in QMP.
def _is_int(v: Any) -> bool:
    # QEMU numbers are int64 or uint64; anything wider is not an integer to it.
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**64


_TYPES: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "string"),
    "int": (_is_int, "integer"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "number": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "number"),
    "dict": (lambda v: isinstance(v, dict), "object"),
    "list": (lambda v: isinstance(v, list), "array"),
    "any": (lambda v: True, "any"),
}


@dataclass(frozen=True)
class ArgSpec:
    """One command argument: its JSON type and whether it may be left out.

    type is one of "str", "int", "bool", "number", "dict", "list", "any".
    A "str" with `choices` is a QAPI enum: any other string is refused with QEMU's
    "Parameter 'NAME' does not accept value 'VALUE'". An optional argument that is
    absent is absent from the handler's dict too (handlers use `args.get(name, default)`).
    JSON null is not a value of any of these types except "any", as in QEMU.
    """

    type: str = "any"
    optional: bool = False
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"unknown ArgSpec type {self.type!r}; use one of {sorted(_TYPES)}")

    def accepts(self, value: Any) -> bool:
        return bool(_TYPES[self.type][0](value))

    @property
    def qapi_name(self) -> str:
        """QEMU's word for this type in 'Invalid parameter type' errors."""
        return _TYPES[self.type][1]


def check_arguments(
    specs: Mapping[str, ArgSpec] | None,
    args: Mapping[str, Any],
    *,
    allow_extra: bool = False,
) -> dict[str, Any]:
    """Check `args` against `specs` as QEMU's QAPI input visitor does.

    Members are checked in declaration order (missing, then wrong type),
    and only then are unknown members reported, so the first error QEMU
    would report is the one raised. Returns a new dict for the handler.
    """
    specs = specs or {}
    for name, spec in specs.items():
        if name not in args:
            if not spec.optional:
                raise QmpError(ErrorClass.GENERIC_ERROR, f"Parameter '{name}' is missing")
            continue
        if not spec.accepts(args[name]):
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                f"Invalid parameter type for '{name}', expected: {spec.qapi_name}",
            )
        if spec.choices and args[name] not in spec.choices:  # QEMU's input_type_enum
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                f"Parameter '{name}' does not accept value '{args[name]}'",
            )
    if not allow_extra:
        for name in args:
            if name not in specs:
                raise QmpError(ErrorClass.GENERIC_ERROR, f"Parameter '{name}' is unexpected")
    return dict(args)
