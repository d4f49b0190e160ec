"""`pyvmm colo`: the 2015 RFC's hybrid-mode demo, on one machine, phase by phase.

It starts a comparator (a thread of this process: it talks to the VMs over sockets and
QMP only), a secondary (`pyvmm run --incoming`), a primary running guest/colosvc.c with
a CPU burner on its second vCPU (the RFC's `md5sum /dev/zero`), and a load client. The
primary migrates with x-colo, and then:

1. COLO: deterministic requests (inc); checkpoints come only at x-colo-max-time;
2. miscompares: the guest's clock in every answer (the RFC's `top`); every answer
   miscompares, checkpoints come fast, and the mean length drops below
   colo-passive-limit: the primary flips to passive;
3. passive: the secondary only receives checkpoints, so its CPU use drops;
4. back to COLO: deterministic requests again; after colo-passive-count passive
   checkpoints it runs COLO cycles, and with long ones stays there;
5. failover: the primary is killed (SIGKILL), x-colo-lost-heartbeat goes to the
   secondary, and the client carries on: no answer lost, doubled or inconsistent, and
   the survivor's RAM passes its own check (verify).

The parameters are shorter than the defaults (printed first). On a terminal a live view
shows the mode, checkpoints per second, miscompares and each VM's CPU use; otherwise a
line a second. It ends with a table of what each phase showed and PASS or FAIL.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvmm.colo.client import INC, TIME, LoadClient
from pyvmm.colo.proxy import CompareProxy, ProxyConfig
from pyvmm.monitor.client import QmpClientError, SyncQmp

log = logging.getLogger(__name__)

MEM = "64M"
VCPUS = 2
SAMPLE_S = 1.0


@dataclass
class DemoConfig:
    max_time_ms: int = 2000  # x-colo-max-time (default 10000)
    min_time_ms: int = 3  # x-colo-min-time (the default)
    passive_count: int = 20  # colo-passive-count (default 100)
    passive_limit_ms: int = 400  # colo-passive-limit (the default)
    passive_time_ms: int = 250  # colo-passive-time (the default)
    compare_timeout_ms: int = 1000  # colo-compare's compare_timeout (default 3000)
    rate_per_s: float = 40.0  # requests per second from the load client
    burn_pct: int = 60  # the primary guest's second vCPU burns this much
    colo_s: float = 10.0  # phase 1
    passive_s: float = 4.0  # phase 3's measurement
    keep: bool = False  # keep the work directory


@dataclass
class PhaseResult:
    name: str
    expected: str
    observed: str
    passed: bool


@dataclass
class Sample:
    t: float
    phase: str
    mode: str
    checkpoints: int
    miscompares: int
    pvm_cpu_pct: float
    svm_cpu_pct: float
    answered: int
    errors: int


@dataclass
class _Vm:
    name: str
    proc: subprocess.Popen[bytes]
    qmp: Path
    console: Path

    def cmd(self, name: str, **args: Any) -> Any:
        with SyncQmp(f"unix:{self.qmp}", timeout_s=10) as q:
            return q.execute(name, args or None)


def _rate(prev: Sample | None, s: Sample) -> float:
    """Checkpoints per second between two samples."""
    if prev is None or s.t <= prev.t or s.checkpoints < prev.checkpoints:
        return 0.0
    return (s.checkpoints - prev.checkpoints) / (s.t - prev.t)


class _View:
    """A live table on a terminal (rich), plain lines otherwise."""

    def __init__(self, live: bool) -> None:
        self.live = None
        self.samples: list[Sample] = []
        if live:
            from rich.live import Live

            self.live = Live(self._table(), refresh_per_second=4)
            self.live.start()

    def say(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text)
        else:
            print(text, flush=True)

    def sample(self, s: Sample) -> None:
        prev = self.samples[-1] if self.samples else None
        self.samples.append(s)
        if self.live is not None:
            self.live.update(self._table())
        else:
            print(
                f"{s.t:6.1f} s  {s.phase:<12} mode {s.mode:<14} checkpoints/s "
                f"{_rate(prev, s):4.1f}  miscompares {s.miscompares:<4} primary CPU "
                f"{s.pvm_cpu_pct:5.1f}%  secondary CPU {s.svm_cpu_pct:5.1f}%  answers "
                f"{s.answered:<6} errors {s.errors}",
                flush=True,
            )

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title="pyvmm colo: primary and secondary, one sample a second")
        for name in ("time", "phase", "mode", "ckpt/s", "miscompares", "primary CPU",
                     "secondary CPU", "answers", "errors"):  # fmt: skip
            table.add_column(name, justify="right")
        rows = self.samples[-12:]
        for prev, s in zip([None, *rows[:-1]], rows, strict=True):
            table.add_row(
                f"{s.t:.0f} s", s.phase, s.mode, f"{_rate(prev, s):.1f}", str(s.miscompares),
                f"{s.pvm_cpu_pct:.0f}%", f"{s.svm_cpu_pct:.0f}%", str(s.answered),
                str(s.errors),
            )  # fmt: skip
        return table

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


@dataclass
class _Run:
    cfg: DemoConfig
    view: _View
    work: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proxy: CompareProxy | None = None
    client: LoadClient | None = None
    pvm: _Vm | None = None
    svm: _Vm | None = None
    phase: str = "start"
    t0: float = field(default_factory=time.monotonic)
    results: list[PhaseResult] = field(default_factory=list)
    _cpu: dict[str, tuple[float, float]] = field(default_factory=dict)

    # --- processes -----------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str]) -> _Vm:
        qmp, console = self.work / f"{name}.qmp", self.work / f"{name}.console"
        err = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvmm.cli", "-v", "run", *args, "--qmp", f"unix:{qmp}",
             "--serial", str(console)],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        err.close()
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while not qmp.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {name} did not start (see {self.work / name}.log)")
            time.sleep(0.05)
        return _Vm(name, proc, qmp, console)

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.proxy is not None:
            self.proxy.stop()

    # --- sampling ------------------------------------------------------------------------------

    def stats(self, vm: _Vm | None) -> dict[str, Any]:
        if vm is None or vm.proc.poll() is not None:
            return {}
        try:
            return dict(vm.cmd("x-query-colo-stats"))
        except QmpClientError:
            return {}

    def cpu_pct(self, name: str, stats: dict[str, Any]) -> float:
        """A VM's vCPU CPU use since the last sample, in % of one core."""
        now, used = time.monotonic(), float(stats.get("vcpu-seconds", 0.0))
        before = self._cpu.get(name)
        self._cpu[name] = (now, used)
        if before is None or not stats or now <= before[0]:
            return 0.0
        return max(0.0, (used - before[1]) / (now - before[0]) * 100)

    def sample(self) -> tuple[dict[str, Any], dict[str, Any]]:
        pst, sst = self.stats(self.pvm), self.stats(self.svm)
        client = self.client
        assert client is not None
        mode = str(pst.get("mode", "-"))
        if self.proxy is not None and self.proxy.core.mode == "secondary-only":
            mode = "secondary-only"  # after the failover: the comparator's view
        self.view.sample(
            Sample(
                time.monotonic() - self.t0, self.phase, mode, int(pst.get("checkpoints", 0)),
                int(pst.get("miscompares", 0)), self.cpu_pct("pvm", pst),
                self.cpu_pct("svm", sst), client.stats.answered, len(client.stats.errors),
            )
        )  # fmt: skip
        return pst, sst

    def wait(self, seconds: float, until: Callable[[dict, dict], bool] | None = None) -> bool:
        """Sample once a second for `seconds`, or until until(primary, secondary)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(SAMPLE_S, max(0.0, end - time.monotonic())))
            pst, sst = self.sample()
            if until is not None and until(pst, sst):
                return True
        return until is None

    def record(self, name: str, expected: str, observed: str, passed: bool) -> None:
        self.results.append(PhaseResult(name, expected, observed, passed))
        mark = "ok" if passed else "FAILED"
        self.view.say(f"  {name}: {observed} ({mark})")


def run_colo_demo(cfg: DemoConfig) -> int:
    work = Path(tempfile.mkdtemp(prefix="pyvmm-colo-"))
    view = _View(sys.stdout.isatty())
    run = _Run(cfg, view, work)
    try:
        try:
            _demo(run)
        except (RuntimeError, QmpClientError, OSError) as exc:
            run.record(run.phase, "the demo runs", f"stopped: {exc}", False)
    finally:
        view.close()
        run.stop()
    _summary(run)
    if cfg.keep or not all(r.passed for r in run.results):
        print(f"work directory (logs, consoles): {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if run.results and all(r.passed for r in run.results) else 1


def _demo(run: _Run) -> None:
    cfg, view, work = run.cfg, run.view, run.work
    view.say("pyvmm colo: COLO with hybrid mode (the 2015 RFC's demo), shortened parameters:")
    params = {
        "x-colo-max-time": cfg.max_time_ms, "x-colo-min-time": cfg.min_time_ms,
        "colo-passive-count": cfg.passive_count, "colo-passive-limit": cfg.passive_limit_ms,
        "colo-passive-time": cfg.passive_time_ms,
    }  # fmt: skip
    view.say("  " + ", ".join(f"{k} {v}" for k, v in params.items()) +
             f"; compare timeout {cfg.compare_timeout_ms} ms; load {cfg.rate_per_s:g} req/s;"
             f" burner {cfg.burn_pct}% of the second vCPU")  # fmt: skip
    proxy = CompareProxy(
        ProxyConfig(
            "tcp:127.0.0.1:0", f"unix:{work}/primary.com2", f"unix:{work}/secondary.com2",
            f"unix:{work}/compare.ctl", f"unix:{work}/primary.qmp",
            f"unix:{work}/secondary.qmp", cfg.compare_timeout_ms, 200.0,
        )
    )  # fmt: skip
    proxy.open()
    proxy.start()
    run.proxy = proxy
    machine = ["--mem", MEM, "--vcpus", str(VCPUS)]
    run.svm = run.spawn("secondary", [*machine, "--incoming", f"unix:{work}/migration.sock",
                                      "--serial2", f"unix:{work}/secondary.com2"])  # fmt: skip
    run.pvm = run.spawn("primary", [
        "colosvc", *machine, "--append", f"mb=2 burn={cfg.burn_pct}",
        "--serial2", f"unix:{work}/primary.com2", "--colo-compare", f"unix:{work}/compare.ctl",
    ])  # fmt: skip
    host, port = proxy.client_address
    client = LoadClient(host, port, INC, depth=4, rate_per_s=cfg.rate_per_s)
    client.start()
    run.client = client
    pvm = run.pvm
    pvm.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
    pvm.cmd("migrate-set-parameters", **params, **{"max-bandwidth": 0})
    view.say(f"comparator: clients on tcp:{host}:{port}; migrating the primary with x-colo")
    pvm.cmd("migrate", uri=f"unix:{work}/migration.sock")
    deadline = time.monotonic() + 30
    while (status := pvm.cmd("query-migrate").get("status")) != "colo":
        if status in ("failed", "cancelled", "completed") or time.monotonic() > deadline:
            raise RuntimeError(f"the migration ended {status}, not in COLO")
        time.sleep(0.1)
    run.t0 = time.monotonic()
    _phase_colo(run)
    _phase_miscompares(run)
    _phase_passive(run)
    _phase_back(run)
    _phase_failover(run)


def _phase_colo(run: _Run) -> None:
    cfg = run.cfg
    run.phase = "COLO"
    run.view.say(f"phase COLO: deterministic requests for {cfg.colo_s:g} s")
    start = run.stats(run.pvm)
    run.wait(cfg.colo_s)
    end = run.stats(run.pvm)
    new = [r for r in end.get("recent", []) if r["number"] > start.get("checkpoints", 0)]
    reasons = sorted({r["reason"] for r in new})
    misc = end.get("miscompares", 0) - start.get("miscompares", 0)
    low = int(cfg.colo_s * 1000 / cfg.max_time_ms) - 1
    ok = misc == 0 and reasons == ["max-time"] and len(new) >= low and not run.client.stats.errors
    run.record(
        "COLO", f"no miscompare, checkpoints only at max-time (about {low + 1})",
        f"{len(new)} checkpoints ({', '.join(reasons) or 'none'}), {misc} miscompares", ok,
    )  # fmt: skip


def _phase_miscompares(run: _Run) -> None:
    run.phase = "miscompares"
    run.view.say("phase miscompares: every answer carries the guest's clock")
    assert run.client is not None
    start = run.stats(run.pvm)
    run.client.set_op(TIME)
    t = time.monotonic()
    flipped = run.wait(20.0, lambda p, s: p.get("mode") == "passive")
    took = time.monotonic() - t
    end = run.stats(run.pvm)
    misc = end.get("miscompares", 0) - start.get("miscompares", 0)
    run.record(
        "miscompares", "answers miscompare; the primary flips to passive within seconds",
        f"{misc} miscompares, " + (f"passive after {took:.1f} s" if flipped else "no flip"),
        flipped and misc > 0,
    )  # fmt: skip


def _phase_passive(run: _Run) -> None:
    cfg = run.cfg
    run.phase = "passive"
    run.view.say(f"phase passive: the secondary only receives checkpoints ({cfg.passive_s:g} s)")
    colo = [s.svm_cpu_pct for s in run.view.samples if s.phase == "COLO"][-4:]
    run.wait(1.0)  # the first passive second still has COLO in it
    before = run.client.stats.answered if run.client else 0
    start = len(run.view.samples)
    run.wait(cfg.passive_s)
    passive = [s for s in run.view.samples[start:]]
    stayed = all(s.mode == "passive" for s in passive)
    colo_cpu = sum(colo) / max(len(colo), 1)
    passive_cpu = sum(s.svm_cpu_pct for s in passive) / max(len(passive), 1)
    ratio = colo_cpu / passive_cpu if passive_cpu > 0 else float("inf")
    answered = (run.client.stats.answered if run.client else 0) - before
    run.record(
        "passive", "the secondary's vCPU CPU use drops at least 5x; answers go on",
        f"secondary CPU {colo_cpu:.0f}% in COLO, {passive_cpu:.1f}% passive ({ratio:.0f}x); "
        f"{answered} answers", stayed and ratio >= 5 and answered > 0,
    )  # fmt: skip


def _phase_back(run: _Run) -> None:
    cfg = run.cfg
    run.phase = "back to COLO"
    run.view.say("phase back to COLO: deterministic requests again")
    assert run.client is not None
    run.client.set_op(INC)
    limit = cfg.passive_count * cfg.passive_time_ms / 1000 + 15
    t = time.monotonic()
    back = run.wait(limit, lambda p, s: p.get("mode") == "colo")
    took = time.monotonic() - t
    flip_at = run.stats(run.pvm).get("checkpoints", 0)
    # the reset checkpoint and 4 more are COLO without a decision; the 5th sample decides
    stayed = back and run.wait(
        cfg.max_time_ms / 1000 * 7 + 5,
        lambda p, s: p.get("checkpoints", 0) >= flip_at + 6 or p.get("mode") != "colo",
    )
    end = run.stats(run.pvm)
    stayed = stayed and end.get("mode") == "colo"
    run.record(
        "back to COLO", "COLO after colo-passive-count passive checkpoints, and it stays",
        (f"COLO after {took:.1f} s, " if back else "no return, ")
        + f"{end.get('checkpoints', 0) - flip_at} COLO checkpoints since, mode {end.get('mode')}",
        back and stayed,
    )  # fmt: skip


def _phase_failover(run: _Run) -> None:
    run.phase = "failover"
    assert run.pvm is not None and run.svm is not None and run.client is not None
    client = run.client
    run.view.say("phase failover: SIGKILL to the primary, x-colo-lost-heartbeat to the secondary")
    errors_before = len(client.stats.errors)
    run.pvm.proc.kill()
    run.pvm.proc.wait(10)
    time.sleep(0.5)
    run.svm.cmd("x-colo-lost-heartbeat")
    answered = client.stats.answered
    t = time.monotonic()
    resumed = run.wait(15.0, lambda p, s: client.stats.answered > answered + 20)
    took = time.monotonic() - t
    run.wait(2.0)
    verdict = client.verify()
    status = run.svm.cmd("query-colo-status")
    errors = client.stats.errors[errors_before:]
    ok = resumed and verdict.startswith("verify ok") and not client.stats.errors
    ok = ok and status["mode"] == "none" and status["last-mode"] == "secondary"
    run.record(
        "failover", "the secondary serves; no answer lost, doubled or inconsistent; verify ok",
        (f"answers again after {took:.1f} s, " if resumed else "no answers, ")
        + f"{len(errors)} client errors{': ' + errors[0] if errors else ''}; {verdict}",
        ok,
    )  # fmt: skip


def _summary(run: _Run) -> None:
    results = run.results
    passed = bool(results) and all(r.passed for r in results)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="pyvmm colo: what each phase showed")
        for name in ("phase", "expected", "observed", "result"):
            table.add_column(name)
        for r in results:
            table.add_row(r.name, r.expected, r.observed, "PASS" if r.passed else "FAIL")
        Console().print(table)
    else:
        for r in results:
            print(f"{r.name:<13} {'PASS' if r.passed else 'FAIL':<5} {r.observed}")
            print(f"{'':<13} expected: {r.expected}")
    if passed:
        print("PASS")
    else:
        failed = next((r.name for r in results if not r.passed), "start")
        print(f"FAIL: {failed}")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
