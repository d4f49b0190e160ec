"""One benchmark run, start to finish (guestperf's engine, for pyvmm and QEMU alike).

1. start the destination (waiting for the stream) and the source (memstress), each its
   own process, optionally in network namespaces joined by a shaped veth pair;
2. wait for steady state: every vCPU has rewritten its working set once, then --sleep s;
3. set capabilities and parameters on the source over QMP (qemu.qmp), `migrate`;
4. every 50 ms: `query-migrate` (one progress sample), the consoles (guest progress),
   and every 0.5 s the vCPU threads' CPU time; `migrate_cancel` past --max-iters or
   --max-time (the run still succeeds and records `cancelled`);
5. after completion, --sleep more seconds of the guest on the destination;
6. stop both VMs and remove every socket, file and namespace, whatever happened.

With --trace both VMs record their own timelines from just before `migrate` (the
source's stops when the migration ends, the destination's after its --sleep) and the
harness writes them as one Trace Event Format file; with --heatmap the source records a
dirty-page heatmap row per sync, which goes into the report (docs/timeline.md).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.bench import heatmap, netns, report
from pyvmm.bench.display import Display, Quiet
from pyvmm.bench.scenario import Hardware, Scenario, ScenarioError, to_dict
from pyvmm.bench.vms import (
    BenchError,
    VmProcess,
    free_tcp_port,
    host_tsc_khz,
    is_qemu,
    start_vm,
    vm_command,
    wait_for_socket,
)
from pyvmm.monitor.client import QmpClientError, SyncQmp
from pyvmm.monitor.recording_client import (
    RecordingError,
    fetch_heatmap,
    fetch_timeline,
    start_recording,
    stop_recording,
)
from pyvmm.timeline import merge, write

log = logging.getLogger("pyvmm.bench")

POLL_S = 0.05
CPU_EVERY = 10  # polls between CPU-time samples (0.5 s)
CANCEL_GRACE_S = 30.0  # after migrate_cancel, how long the source may take to stop
EXIT_GRACE_S = 3.0  # how long a VM whose QMP socket or peer went away may take to be reaped
FINAL = ("completed", "failed", "cancelled")


@dataclass
class RunOptions:
    binary: str = "pyvmm"  # or a QEMU binary's path
    sleep_s: float = 5.0  # steady state before, guest time on the destination after
    steady_timeout_s: float = 180.0
    trace: Path | None = None  # write both VMs' timelines here (pyvmm only)
    heatmap: bool = False  # record the source's dirty-page heatmap in the report


def _version(q: SyncQmp) -> str:
    v = q.execute("query-version")
    qemu = v.get("qemu", {})
    return f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')} {v.get('package', '')}"


def _host(tsc_khz: int) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpu_model": model,
        "cpus": os.cpu_count() or 0,
        "tsc_khz": tsc_khz,
        "python": platform.python_version(),
    }


def progress_sample(info: dict[str, Any], started_at: float, now: float) -> dict[str, Any]:
    """One `query-migrate` answer in the report's names (missing fields are 0)."""
    ram = info.get("ram", {})
    return {
        "now": now,
        "elapsed": round(now - started_at, 4),
        "status": info.get("status", "setup"),
        "total_time": int(info.get("total-time", 0)),
        "downtime": int(info.get("downtime", 0)),
        "expected_downtime": int(info.get("expected-downtime", 0)),
        "setup_time": int(info.get("setup-time", 0)),
        "throttle_pcent": int(info.get("cpu-throttle-percentage", 0)),
        "dirty_limit_throttle_time_per_round": int(
            info.get("dirty-limit-throttle-time-per-round", 0)
        ),
        "dirty_limit_ring_full_time": int(info.get("dirty-limit-ring-full-time", 0)),
        "ram": {
            "transferred": int(ram.get("transferred", 0)),
            "remaining": int(ram.get("remaining", 0)),
            "total": int(ram.get("total", 0)),
            "duplicate": int(ram.get("duplicate", 0)),
            "normal": int(ram.get("normal", 0)),
            "normal_bytes": int(ram.get("normal-bytes", 0)),
            "dirty_pages_rate": int(ram.get("dirty-pages-rate", 0)),
            "mbps": float(ram.get("mbps", 0)),
            "dirty_sync_count": int(ram.get("dirty-sync-count", 0)),
            "iteration_count": int(ram.get("iteration-count", 0)),
        },
    }


def qemu_parameters(q: SyncQmp, scenario: Scenario, version: str) -> dict[str, Any]:
    """The scenario's parameters as this QEMU can take them, or a ScenarioError naming
    what it lacks. QEMU has no x-auto-converge-sync: up to 9.1 it syncs once per pass
    (iteration), from 9.2 on also on its 5 s timer (timer); nothing else."""
    number = version.split()[0]
    have = set(q.execute("query-migrate-parameters"))
    caps = {c["capability"] for c in q.execute("query-migrate-capabilities")}
    for cap in scenario.capabilities():
        if cap not in caps:
            raise ScenarioError(f"QEMU {number} has no {cap} capability")
    major_minor = tuple(int(x) for x in number.split(".")[:2])
    native = "timer" if major_minor >= (9, 2) else "iteration"
    params = {}
    for name, value in scenario.parameters().items():
        if name in have:
            params[name] = value
        elif name == "x-auto-converge-sync":
            if value != native:
                how = ("syncs on its 5 s timer too (9.2 made it unconditional under "
                       "auto-converge)" if native == "timer" else
                       "syncs once per pass (the 5 s timer came in 9.2)")  # fmt: skip
                raise ScenarioError(f"QEMU {number} cannot run --sync {value}: it {how}")
        else:
            raise ScenarioError(f"QEMU {number} cannot run this scenario: no {name}={value}")
    return params


class Run:
    """One run; `execute()` returns the report (a dict that validates against the schema)."""

    def __init__(self, scenario: Scenario, hw: Hardware, options: RunOptions,
                 display: Display | None = None) -> None:  # fmt: skip
        scenario.check()
        hw.check()
        if scenario.dirty_limit and not hw.dirty_ring_size:
            raise ScenarioError("--dirty-limit needs --dirty-ring-size")
        if (options.trace or options.heatmap) and is_qemu(options.binary):
            raise ScenarioError("--trace and --heatmap need pyvmm: the VMM records them itself")
        self.scenario, self.hw, self.options = scenario, hw, options
        self.display = display or Quiet()
        self.progress: list[dict[str, Any]] = []
        self.vms: dict[str, VmProcess] = {}
        self.migrating: bool | None = None  # None before `migrate`, then True, then False
        self.started_monotonic = 0.0  # time.monotonic() when `migrate` was sent

    # --- the run -------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        with ExitStack() as stack:
            work = Path(tempfile.mkdtemp(prefix="pyvmm-bench-"))
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            src_prefix: list[str] = []
            dst_prefix: list[str] = []
            if self.scenario.link_mbit:
                reason = netns.unavailable()
                if reason:
                    raise BenchError(f"--link-mbit: {reason}")
                link = stack.enter_context(netns.veth_pair(self.scenario.link_mbit))
                src_prefix, dst_prefix = link.prefix("a"), link.prefix("b")
                uri = f"tcp:{link.addr_b}:{free_tcp_port()}"
            elif self.scenario.transport == "tcp":
                uri = f"tcp:127.0.0.1:{free_tcp_port()}"
            else:
                uri = f"unix:{work}/migrate.sock"
            tsc_khz = host_tsc_khz()
            for side, prefix, incoming in (("dst", dst_prefix, uri), ("src", src_prefix, None)):
                qmp, serial = work / f"{side}.qmp", work / f"{side}.serial"
                cmd = vm_command(self.options.binary, self.hw, qmp, serial, incoming, tsc_khz)
                self.display.phase(f"starting the {side} VM")
                log.info("%s: %s", side, " ".join([*prefix, *cmd]))
                vm = start_vm(side, [*prefix, *cmd], work, qmp, serial)
                stack.callback(vm.stop)
                self.vms[side] = vm
                wait_for_socket(vm)
            stack.push(self._explain_qmp_error)  # runs before the VMs are stopped
            src_q = stack.enter_context(SyncQmp(f"unix:{self.vms['src'].qmp}", timeout_s=30))
            dst_q = stack.enter_context(SyncQmp(f"unix:{self.vms['dst'].qmp}", timeout_s=30))
            version = _version(src_q)
            params = self.scenario.parameters()
            if is_qemu(self.options.binary):
                params = qemu_parameters(src_q, self.scenario, version)
            elif self.hw.dirty_ring_size:
                params["x-vcpu-dirty-limit-ring-size"] = self.hw.dirty_ring_size
            self.vms["src"].vcpu_tids = self._tids(src_q)
            self._steady_state()
            caps = self.scenario.capabilities()
            if caps:
                src_q.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": c, "state": v} for c, v in caps.items()]})  # fmt: skip
            log.info("src: capabilities %s, parameters %s", caps, params)
            self._start_recording(src_q, dst_q)
            src_q.execute("migrate-set-parameters", params)
            result = self._migrate(src_q, dst_q, uri)
            extra = self._recordings(src_q, dst_q)
            return {
                **extra,
                "version": report.VERSION,
                "scenario": to_dict(self.scenario),
                "hardware": {
                    **to_dict(self.hw),
                    "vmm": "qemu" if is_qemu(self.options.binary) else "pyvmm",
                    "binary": self.options.binary,
                    "vmm_version": version.strip(),
                    "host": _host(tsc_khz),
                },
                "progress_history": self.progress,
                "guest_timings": {
                    side: {
                        str(v): [{"t": t, "mib": mib} for t, mib in s]
                        for v, s in vm.console.samples.items()
                    }
                    for side, vm in self.vms.items()
                },
                "vcpu_cpu": {
                    side: {
                        str(v): [{"t": t, "cpu_ms": ms, "tid": tid} for t, ms, tid in s]
                        for v, s in vm.cpu.items()
                    }
                    for side, vm in self.vms.items()
                },
                "result": result,
            }

    def _start_recording(self, src_q: SyncQmp, dst_q: SyncQmp) -> None:
        opts = self.options
        try:
            if opts.trace or opts.heatmap:
                start_recording(src_q, "source", heatmap=opts.heatmap)
            if opts.trace:
                start_recording(dst_q, "destination")
        except RecordingError as exc:
            raise BenchError(str(exc)) from None

    def _recordings(self, src_q: SyncQmp, dst_q: SyncQmp) -> dict[str, Any]:
        """Fetch what the VMs recorded: the trace file is written, the heatmap returned for
        the report (under "heatmap")."""
        opts, out = self.options, {}
        if opts.heatmap:
            out["heatmap"] = heatmap.from_qmp(fetch_heatmap(src_q), self.started_monotonic)
        if opts.trace:
            traces = [fetch_timeline(src_q)]
            try:  # a cancelled or failed migration ends the destination, maybe right now
                traces.append(fetch_timeline(dst_q))
            except (QmpClientError, RecordingError) as exc:
                log.warning("the destination has ended: its timeline is lost (%s)", exc)
            merged = merge(*traces)
            opts.trace.parent.mkdir(parents=True, exist_ok=True)
            write(opts.trace, merged)
            log.info("timeline: %s (%d events)", opts.trace, len(merged["traceEvents"]))
        return out

    def _explain_qmp_error(self, _type: object, exc: BaseException | None, _tb: object) -> bool:
        """A lost QMP connection usually means a VM died: say that instead."""
        if isinstance(exc, QmpClientError):
            for side in sorted(self.vms, key=lambda side: side != "src"):  # the source first
                if side == "src" or not self.migrating:
                    _wait_a_moment(self.vms[side])
                    self.vms[side].check_alive()
        return False

    @staticmethod
    def _tids(q: SyncQmp) -> dict[int, int]:
        return {c["cpu-index"]: c["thread-id"] for c in q.execute("query-cpus-fast")}

    def _tick(self, n: int, sides: tuple[str, ...] = ("src", "dst")) -> None:
        for side in sides:
            vm = self.vms[side]
            # A destination may end during a migration (QEMU's and pyvmm's both exit when
            # the incoming stream breaks, e.g. at migrate_cancel): the source's status says
            # what happened. The source must live throughout.
            if side == "src" or not self.migrating:
                try:
                    vm.check_alive()
                except BenchError:
                    if side != "src" and "src" in self.vms:
                        # A destination usually ends because its source died: name the cause.
                        _wait_a_moment(self.vms["src"])
                        self.vms["src"].check_alive()
                    raise
            vm.console.poll()
            if n % CPU_EVERY == 0:
                vm.sample_cpu()

    def _steady_state(self) -> None:
        """Every vCPU has rewritten its whole working set once (first touch is over), then
        the workload runs --sleep more seconds, as guestperf lets it settle."""
        ws = self.hw.working_set_mib()
        self.display.phase(f"waiting for {self.hw.cpus} vCPU(s) to rewrite {ws} MiB each")
        deadline = time.monotonic() + self.options.steady_timeout_s
        n = 0
        while True:
            self._tick(n, ("src",))
            n += 1
            latest = self.vms["src"].console.latest_mib()
            if len(latest) == self.hw.cpus and min(latest.values()) >= ws:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the guest did not reach steady state within "
                    f"{self.options.steady_timeout_s:.0f} s (progress {latest} MiB, want {ws})"
                )
            time.sleep(POLL_S)
        self._idle(self.options.sleep_s, ("src",), f"steady: {self.options.sleep_s:g} s more")

    def _idle(self, seconds: float, sides: tuple[str, ...], text: str) -> None:
        self.display.phase(text)
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            self._tick(n, sides)
            n += 1
            time.sleep(POLL_S)

    def _migrate(self, src_q: SyncQmp, dst_q: SyncQmp, uri: str) -> dict[str, Any]:
        s = self.scenario
        self.display.phase(f"migrating to {uri}")
        started_at = time.time()
        self.started_monotonic = time.monotonic()
        src_q.execute("migrate", {"uri": uri})
        self.migrating = True
        cancel_reason: str | None = None
        cancelled_at = 0.0
        max_pct = n = 0
        while True:
            self._tick(n)
            n += 1
            now = time.time()
            sample = progress_sample(src_q.execute("query-migrate"), started_at, now)
            self.progress.append(sample)
            self.display.progress(sample)
            max_pct = max(max_pct, sample["throttle_pcent"])
            status = sample["status"]
            if status in FINAL:
                break
            over = (
                "max-iters" if sample["ram"]["dirty_sync_count"] > s.max_iters
                else "max-time" if now - started_at > s.max_time else None
            )  # fmt: skip
            if over and (cancel_reason is None or now - cancelled_at > 2.0):
                if cancel_reason is None:
                    self.display.phase(f"{over} reached: migrate_cancel")
                cancel_reason = cancel_reason or over
                cancelled_at = now
                src_q.execute("migrate_cancel")  # re-sent every 2 s until it takes
            if cancel_reason and now - started_at > s.max_time + CANCEL_GRACE_S:
                raise BenchError("the source did not stop migrating after migrate_cancel")
            time.sleep(POLL_S)
        info = src_q.execute("query-migrate")
        error = info.get("error-desc") if status == "failed" else None
        if self.options.trace or self.options.heatmap:
            stop_recording(src_q)  # the source's part ends with the migration
        # QEMU has no iteration-count; up to 9.1 every dirty sync ends an iteration.
        ram = info.get("ram", {})
        iterations = int(ram.get("iteration-count", sample["ram"]["dirty_sync_count"]))
        if status == "completed":
            self.migrating = False
            self.vms["dst"].vcpu_tids = self._tids(dst_q)
            self._idle(
                self.options.sleep_s, ("dst",), "completed: the guest runs on the destination"
            )
        self.display.phase(f"{status}")
        return {
            "status": status,
            "success": status == "completed",
            "cancelled": status == "cancelled",
            "cancel_reason": cancel_reason if status == "cancelled" else None,
            "error": error,
            "started_at": started_at,
            "total_time": sample["total_time"],
            "downtime": sample["downtime"] if status == "completed" else None,
            "dirty_syncs": sample["ram"]["dirty_sync_count"],
            "iteration_count": iterations,
            "max_throttle_pcent": max_pct,
            "transferred_bytes": sample["ram"]["transferred"],
        }


def run(scenario: Scenario, hw: Hardware, options: RunOptions,
        display: Display | None = None) -> dict[str, Any]:  # fmt: skip
    try:
        return Run(scenario, hw, options, display).execute()
    except QmpClientError as exc:
        raise BenchError(f"QMP: {exc}") from None


def _wait_a_moment(vm: VmProcess) -> None:
    """A killed VMM's sockets close before it can be reaped: give it EXIT_GRACE_S to exit."""
    with suppress(subprocess.TimeoutExpired):
        vm.proc.wait(EXIT_GRACE_S)
