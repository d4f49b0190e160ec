"""What one benchmark run does: the migration scenario and the guest's shape.

Field names follow QEMU's guestperf (tests/migration-stress/guestperf) where it has one,
with the same defaults, except `mem`, which is MiB here, not GiB: pyvmm's experiments run
at small scale. Everything after the guestperf fields is pyvmm's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MIB = 1 << 20
PATTERNS = ("word", "page")
SYNC_MODES = ("iteration", "timer", "background")  # x-auto-converge-sync
TRANSPORTS = ("unix", "tcp")
HEADROOM_MIB = 256  # guest RAM above the working set: image, page tables, stacks


class ScenarioError(ValueError):
    """A scenario that cannot run; the message is one line for the user."""


@dataclass
class Scenario:
    """The migration: its limits, tunables and convergence policy."""

    name: str = "perfreport"
    downtime: int = 500  # ms, downtime-limit
    bandwidth: int = 125000  # MiB/s, max-bandwidth ("effectively unlimited")
    max_iters: int = 30  # cancel when dirty-sync-count goes above this
    max_time: int = 300  # s, cancel after this long since `migrate`
    auto_converge: bool = False
    auto_converge_step: int = 10  # %, cpu-throttle-increment
    dirty_limit: bool = False
    x_vcpu_dirty_limit_period: int = 500  # ms (guestperf's default; QEMU's is 1000)
    vcpu_dirty_limit: int = 1  # MB/s
    # pyvmm's own: each auto-converge generation in its parameter's words
    sync: str = "timer"  # x-auto-converge-sync: iteration (<= 9.1), timer (9.2), background (v1)
    periodic_throttle: bool = False  # cpu-periodic-throttle (the 2024 RFC; syncs per pass)
    responsive: bool = False  # cpu-throttle-responsive (v2) = cpu-responsive-throttle (v1)
    auto_converge_legacy: bool = False  # x-auto-converge-legacy (2013; syncs per pass)
    link_mbit: int = 0  # 0: loopback; N: destination behind a veth pair shaped to N Mbit/s
    transport: str = "unix"

    def check(self) -> None:
        for name in ("downtime", "bandwidth", "max_iters", "max_time", "auto_converge_step",
                     "x_vcpu_dirty_limit_period", "vcpu_dirty_limit"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ScenarioError(f"--{name.replace('_', '-')} must be positive")
        if self.link_mbit < 0:
            raise ScenarioError("--link-mbit must be positive")
        if self.transport not in TRANSPORTS:
            raise ScenarioError(f"--transport must be one of {', '.join(TRANSPORTS)}")
        if self.link_mbit and self.transport != "tcp":
            raise ScenarioError("--link-mbit shapes a network link: it needs --transport tcp")
        if self.dirty_limit and self.auto_converge:
            raise ScenarioError("--dirty-limit and --auto-converge are mutually exclusive")
        if self.sync not in SYNC_MODES:
            raise ScenarioError(f"--sync must be one of {', '.join(SYNC_MODES)}")
        once_per_pass = self.periodic_throttle or self.auto_converge_legacy
        if (self.responsive or once_per_pass) and not self.auto_converge:
            raise ScenarioError(
                "--responsive, --periodic-throttle and --auto-converge-legacy need --auto-converge"
            )
        if once_per_pass and self.sync != "iteration":
            which = "--periodic-throttle" if self.periodic_throttle else "--auto-converge-legacy"
            raise ScenarioError(
                f"{which} syncs once per pass: it cannot run with --sync {self.sync}"
            )

    def capabilities(self) -> dict[str, bool]:
        caps = {}
        if self.auto_converge:
            caps["auto-converge"] = True
        if self.dirty_limit:
            caps["dirty-limit"] = True
        return caps

    def parameters(self) -> dict[str, Any]:
        """migrate-set-parameters for the source, in QMP's names."""
        params: dict[str, Any] = {
            "max-bandwidth": self.bandwidth * MIB,
            "downtime-limit": self.downtime,
        }
        if self.auto_converge:
            params["cpu-throttle-increment"] = self.auto_converge_step
            # The RFC and the 2013 mode imply syncs once per pass: their scripts never
            # named x-auto-converge-sync, and neither does the scenario.
            if self.periodic_throttle:
                params["cpu-periodic-throttle"] = True
            if self.auto_converge_legacy:
                params["x-auto-converge-legacy"] = True
            if not (self.periodic_throttle or self.auto_converge_legacy):
                params["x-auto-converge-sync"] = self.sync
            if self.responsive:
                params["cpu-throttle-responsive"] = True
        if self.dirty_limit:
            params["x-vcpu-dirty-limit-period"] = self.x_vcpu_dirty_limit_period
            params["vcpu-dirty-limit"] = self.vcpu_dirty_limit
        return params


@dataclass
class Hardware:
    """The guest: vCPUs, RAM, dirty ring, and the memstress workload it runs."""

    cpus: int = 1
    mem: int = 1024  # MiB of working set in total; the VM gets HEADROOM_MIB more
    dirty_ring_size: int = 0  # entries; 0: dirty bitmap
    stress_mem: int = 0  # MiB per vCPU; 0: mem / cpus
    stress_rate: int = 0  # MiB/s per vCPU; 0: flat out
    stress_pattern: str = "word"  # memstress: one store per page, or every word

    def check(self) -> None:
        if self.cpus <= 0 or self.mem <= 0:
            raise ScenarioError("--cpus and --mem must be positive")
        if self.stress_mem < 0 or self.stress_rate < 0:
            raise ScenarioError("--stress-mem and --stress-rate must not be negative")
        if self.stress_pattern not in PATTERNS:
            raise ScenarioError(f"--stress-pattern must be one of {', '.join(PATTERNS)}")
        if self.dirty_ring_size and self.dirty_ring_size & (self.dirty_ring_size - 1):
            raise ScenarioError("--dirty-ring-size must be a power of two")
        if self.working_set_mib() * self.cpus > self.mem:
            raise ScenarioError(
                f"--stress-mem {self.stress_mem} x {self.cpus} vCPUs exceeds --mem {self.mem}"
            )

    def working_set_mib(self) -> int:
        """MiB that each vCPU's memstress rewrites."""
        return self.stress_mem or self.mem // self.cpus

    def vm_mem_mib(self) -> int:
        return self.mem + HEADROOM_MIB

    def guest_cmdline(self) -> str:
        return f"mb={self.working_set_mib()} rate={self.stress_rate} pattern={self.stress_pattern}"


def to_dict(obj: Scenario | Hardware) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    known = {f.name for f in dataclasses.fields(Scenario)}
    return Scenario(**{k: v for k, v in data.items() if k in known})


def hardware_from_dict(data: dict[str, Any]) -> Hardware:
    known = {f.name for f in dataclasses.fields(Hardware)}
    return Hardware(**{k: v for k, v in data.items() if k in known})
