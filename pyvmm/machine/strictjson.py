"""JSON from another process, read as hostile input: parsed within fixed limits, every
value read with its exact type and range.

Two formats use it: the machine state (state.py, the STATE record of a migration) and the
migration stream's HEADER record (pyvmm/migration/stream.py). Python's `json` module alone
is too trusting for that: it takes NaN and Infinity, keeps the last of two equal keys,
turns `1e400` into an infinite float, and builds every object of its input before anyone
can look at it, so 16 MiB of `[],` become four million lists (about 470 MiB measured on a
destination). The guards, in the order they run:

1. the input is bytes of at most `max_bytes`, UTF-8;
2. at most `max_items` values: the count of `,` `:` `[` `{` in the input bounds the
   number of values and keys json would build (every value after the first in an array or
   object follows a comma, every key is followed by a colon, every container opens with a
   bracket), so this is checked on the raw bytes, before a single object is made, and the
   memory of a parse stays within a few times the input;
3. no NaN, Infinity or -Infinity, no duplicate keys, no integer of more than 4300 digits
   (CPython's own limit);
4. nesting at most `max_depth` deep (json's own recursion limit stops a deeper input
   early; the walk after parsing enforces the format's real limit).

Then the format's parser reads the document with `object` (exact key set), `integer`
(an int, not a bool or float, within lo..hi), `boolean` and `array`. Every defect is one
exception of the caller's class: "<prefix>: <path>: <what>".
"""

from __future__ import annotations

import json
from typing import Any


def type_name(value: object) -> str:
    """JSON's name for a parsed value's type."""
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key {key[:40]!r}")
        doc[key] = value
    return doc


def count_items(data: bytes | bytearray | memoryview) -> int:
    """An upper bound on the values and keys json would build from data (guard 2)."""
    raw = data if isinstance(data, bytes | bytearray) else bytes(data)
    return raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{") + 1


def depth(doc: object) -> int:
    """How deeply arrays and objects nest in a parsed document (a scalar is 0)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


class JsonReader:
    """The guards and readers for one format; errors are `error(f"{prefix}: {path}: ...")`."""

    def __init__(
        self, error: type[Exception], prefix: str, *, max_bytes: int, max_items: int,
        max_depth: int,
    ) -> None:  # fmt: skip
        self.error = error
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.max_depth = max_depth

    def fail(self, path: str, what: str) -> Exception:
        return self.error(f"{self.prefix}: {path}: {what}")

    def parse(self, data: object) -> Any:
        """Guards 1-4; returns the document."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise self.fail("input", f"expected bytes, got {type(data).__name__}")
        if len(data) > self.max_bytes:
            raise self.fail("input", f"{len(data)} bytes, at most {self.max_bytes}")
        items = count_items(data)
        if items > self.max_items:
            raise self.fail(
                "input", f"up to {items} JSON values, at most {self.max_items} (refused unparsed)"
            )
        try:
            text = data.decode("utf-8") if not isinstance(data, memoryview) else str(data, "utf-8")
            doc = json.loads(
                text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
            )
        except UnicodeDecodeError as exc:
            raise self.fail("input", f"not UTF-8 (byte {exc.start})") from None
        except RecursionError:
            raise self.fail("input", f"JSON nested too deeply (limit {self.max_depth})") from None
        except ValueError as exc:  # JSONDecodeError, over-long integers, our hooks
            raise self.fail("input", f"not valid JSON: {str(exc).splitlines()[0][:120]}") from None
        if depth(doc) > self.max_depth:
            raise self.fail("input", f"JSON nested too deeply (limit {self.max_depth})")
        return doc

    def object(self, value: object, path: str, keys: frozenset[str]) -> dict[str, Any]:
        """An object with exactly these keys."""
        if not isinstance(value, dict):
            raise self.fail(path, f"expected an object, got {type_name(value)}")
        missing = keys - value.keys()
        if missing:
            raise self.fail(path, f"missing key {sorted(missing)[0]!r}")
        extra = value.keys() - keys
        if extra:
            raise self.fail(path, f"unknown key {sorted(extra)[0][:40]!r}")
        return value

    def integer(self, value: object, path: str, lo: int, hi: int) -> int:
        """An integer (not a boolean, not a float such as 1.0 or 1e400) in lo..hi."""
        if type(value) is not int:
            raise self.fail(path, f"expected an integer, got {type_name(value)}")
        if not lo <= value <= hi:
            shown = str(value) if abs(value) < 1 << 70 else f"a {value.bit_length()}-bit number"
            raise self.fail(path, f"{shown} is out of range {lo}..{hi}")
        return value

    def boolean(self, value: object, path: str) -> bool:
        if type(value) is not bool:
            raise self.fail(path, f"expected true or false, got {type_name(value)}")
        return value

    def array(self, value: object, path: str, lo: int = 0, hi: int | None = None) -> list[Any]:
        """An array of lo..hi entries."""
        if not isinstance(value, list):
            raise self.fail(path, f"expected an array, got {type_name(value)}")
        if len(value) < lo or (hi is not None and len(value) > hi):
            want = f"at least {lo}" if hi is None else f"{lo}..{hi}"
            raise self.fail(path, f"{len(value)} entries, expected {want}")
        return value
