"""The simulator's own parameters: what a bench scenario does not say because a real run
measures it (the guest's unthrottled rate, the link, the cost of zero pages, the state).

Defaults describe this project's machines (docs/sim.md says where each comes from);
`pyvmm sim calibrate` measures the guest's rate instead of assuming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pyvmm.bench.scenario import ScenarioError

MIB = 1 << 20
GIB = 1 << 30


@dataclass
class SimModel:
    # The guest: MiB/s of pages each vCPU rewrites when nothing throttles it (memstress
    # flat out); Hardware.stress_rate, when set, is a rate the guest itself keeps to.
    guest_rate_mib_s: float = 1024.0
    # After a throttle sleep of S ms a vCPU writes nothing for L ms more: "S:L,S:L,..."
    # points, linear between them and flat beyond (empty: none; calibrate measures it).
    wake_lag_ms: str = ""
    jitter_pct: float = 0.0  # each vCPU's rate drawn in rate x (1 +- jitter), per seed
    seed: int = 0
    # The link: with Scenario.link_mbit 0 (loopback) this rate; latency one way.
    loopback_mib_s: float = 3500.0
    latency_ms: float = 0.05
    # Zero pages (never written): what it costs the source to find and send one.
    zero_scan_gib_s: float = 8.0
    # What a dirty sync costs the migration thread per GiB of guest RAM (0: nothing, the
    # default; docs/sim.md uses it to ask what a costly sync would change).
    sync_ms_per_gib: float = 0.0
    # The switchover: machine state per VM and per vCPU, the destination's restore.
    state_bytes: int = 8192
    state_bytes_per_vcpu: int = 4096
    dest_load_ms: float = 1.0
    setup_ms: float = 1.0
    sample_ms: float = 500.0  # progress_history spacing (virtual time)

    def check(self) -> None:
        for name in ("guest_rate_mib_s", "loopback_mib_s", "zero_scan_gib_s", "sample_ms"):
            if getattr(self, name) <= 0:
                raise ScenarioError(f"--{name.replace('_', '-')} must be positive")
        for name in ("jitter_pct", "latency_ms", "dest_load_ms", "setup_ms", "sync_ms_per_gib"):
            if getattr(self, name) < 0:
                raise ScenarioError(f"--{name.replace('_', '-')} must not be negative")
        if self.jitter_pct >= 100:
            raise ScenarioError("--jitter-pct must be below 100")
        lag_points(self.wake_lag_ms)


def lag_points(text: str) -> list[tuple[float, float]]:
    """`--wake-lag-ms` "S:L,S:L" as sorted (sleep ms, lag ms) points."""
    points = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            sleep_ms, lag_ms = (float(x) for x in item.split(":"))
        except ValueError:
            raise ScenarioError(f"--wake-lag-ms: {item!r} is not SLEEP_MS:LAG_MS") from None
        if sleep_ms < 0 or lag_ms < 0:
            raise ScenarioError(f"--wake-lag-ms: {item!r} has a negative time")
        points.append((sleep_ms, lag_ms))
    return sorted(points)


def format_lag(points: list[tuple[float, float]]) -> str:
    return ",".join(f"{s:g}:{lag:.2f}" for s, lag in points)


def model_to_dict(model: SimModel) -> dict[str, Any]:
    return dataclasses.asdict(model)


def model_from_dict(data: dict[str, Any]) -> SimModel:
    known = {f.name for f in dataclasses.fields(SimModel)}
    return SimModel(**{k: v for k, v in data.items() if k in known})
