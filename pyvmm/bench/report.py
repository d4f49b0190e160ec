"""One benchmark run's JSON report: its schema, writing, loading and validation.

The schema is JSON Schema (draft 2020-12) kept here as data, so that the harness, the
plot and table commands and the tests check reports against the same definition;
docs/bench.md explains each field. `pyvmm bench schema` prints it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

VERSION = 2  # 2: the sync generations (sync, periodic_throttle, ...), iteration counts
SIDES = ("src", "dst")

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}


def _object(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or list(props)}


def _per_side_per_vcpu(sample: dict[str, Any]) -> dict[str, Any]:
    """{"src": {"0": [sample, ...], ...}, "dst": {...}}: vCPU indexes as keys."""
    per_vcpu = {
        "type": "object",
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {"type": "array", "items": sample},
    }
    return _object({side: per_vcpu for side in SIDES})


SCENARIO = _object(
    {
        "name": _STR,
        "downtime": _INT,
        "bandwidth": _INT,
        "max_iters": _INT,
        "max_time": _INT,
        "auto_converge": _BOOL,
        "auto_converge_step": _INT,
        "dirty_limit": _BOOL,
        "x_vcpu_dirty_limit_period": _INT,
        "vcpu_dirty_limit": _INT,
        "sync": {"enum": ["iteration", "timer", "background"]},
        "periodic_throttle": _BOOL,
        "responsive": _BOOL,
        "auto_converge_legacy": _BOOL,
        "link_mbit": _INT,
        "transport": {"enum": ["unix", "tcp"]},
    }
)

HARDWARE = _object(
    {
        "cpus": _INT,
        "mem": _INT,
        "dirty_ring_size": _INT,
        "stress_mem": _INT,
        "stress_rate": _INT,
        "stress_pattern": {"enum": ["word", "page"]},
        "vmm": {"enum": ["pyvmm", "qemu"]},
        "binary": _STR,
        "vmm_version": _STR,
        "host": _object(
            {"kernel": _STR, "cpu_model": _STR, "cpus": _INT, "tsc_khz": _INT, "python": _STR}
        ),
    }
)

PROGRESS = _object(
    {
        "now": _NUM,  # host epoch seconds
        "elapsed": _NUM,  # seconds since `migrate` was sent
        "status": _STR,
        "total_time": _INT,  # ms
        "downtime": _INT,  # ms (final)
        "expected_downtime": _INT,  # ms
        "setup_time": _INT,  # ms
        "throttle_pcent": _INT,
        "dirty_limit_throttle_time_per_round": _INT,  # us
        "dirty_limit_ring_full_time": _INT,  # us
        "ram": _object(
            {
                "transferred": _INT,
                "remaining": _INT,
                "total": _INT,
                "duplicate": _INT,
                "normal": _INT,
                "normal_bytes": _INT,
                "dirty_pages_rate": _INT,
                "mbps": _NUM,
                "dirty_sync_count": _INT,
                "iteration_count": _INT,
            }
        ),
    }
)

RESULT = _object(
    {
        "status": {"enum": ["completed", "cancelled", "failed"]},
        "success": _BOOL,  # completed (guestperf's meaning)
        "cancelled": _BOOL,
        "cancel_reason": {"enum": [None, "max-time", "max-iters"]},
        "error": {"type": ["string", "null"]},
        "started_at": _NUM,  # host epoch seconds of `migrate`
        "total_time": _INT,  # ms
        "downtime": {"type": ["integer", "null"]},  # ms; null unless completed
        "dirty_syncs": _INT,
        "iteration_count": _INT,
        "max_throttle_pcent": _INT,
        "transferred_bytes": _INT,
    }
)

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "pyvmm bench report",
    **_object(
        {
            "version": {"const": VERSION},
            "scenario": SCENARIO,
            "hardware": HARDWARE,
            "progress_history": {"type": "array", "items": PROGRESS},
            "guest_timings": _per_side_per_vcpu(_object({"t": _NUM, "mib": _INT})),
            "vcpu_cpu": _per_side_per_vcpu(_object({"t": _NUM, "cpu_ms": _NUM, "tid": _INT})),
            "result": RESULT,
        }
    ),
}

# Optional sections, present only when asked for (not in "required"):
# `pyvmm bench --heatmap` (docs/timeline.md; pyvmm/bench/heatmap.py reads and draws it).
HEATMAP_ROW = _object(
    {"sync": _INT, "elapsed": _NUM, "dirty_pages": _INT, "new_pages": _INT, "cells": _STR}
)
HEATMAP = _object(
    {
        "cells": _INT,  # at most 4096
        "pages_per_cell": _INT,
        "total_pages": _INT,
        "page_size": _INT,
        "encoding": {"const": "zlib+base64 uint32le"},
        "dropped_rows": _INT,
        "rows": {"type": "array", "items": HEATMAP_ROW},
    }
)
SCHEMA["properties"]["heatmap"] = HEATMAP
# `pyvmm sim` (docs/sim.md): the report of a simulated run says so, with its model.
SIMULATION = _object(
    {
        "model": {"type": "object"},  # pyvmm/sim/model.py's SimModel, field by field
        "link_mbit": _NUM,
        "guest_rate_mib_s": _NUM,  # per vCPU, unthrottled
        "throttle_sleeps": _INT,
        "wall_s": _NUM,  # how long the simulation took
    }
)
SCHEMA["properties"]["simulation"] = SIMULATION


class ReportError(ValueError):
    """A report file that cannot be used; the message is one line naming file and cause."""


def validate(report: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if `report` does not match SCHEMA."""
    jsonschema.validate(report, SCHEMA)


def write(report: dict[str, Any], path: Path) -> None:
    validate(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)  # a reader never sees half a report


def load(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from None
    try:
        validate(report)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise ReportError(f"{path}: not a pyvmm bench report ({where}: {exc.message})") from None
    return report


def label(report: dict[str, Any]) -> str:
    """How tables and plots name a run: the scenario, and the VMM when it is not pyvmm
    (a simulated run is "[sim]")."""
    name = report["scenario"]["name"]
    vmm = "sim" if "simulation" in report else report["hardware"]["vmm"]
    return name if vmm == "pyvmm" else f"{name} [{vmm}]"
