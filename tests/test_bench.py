"""`pyvmm bench`: real runs on /dev/kvm, between real processes, with real reports."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from matplotlib import image

from conftest import netns_missing, require
from helpers import PYVMM, run_pyvmm
from pyvmm.bench import report
from pyvmm.bench.comparisons import COMPARISONS
from pyvmm.bench.engine import qemu_parameters
from pyvmm.bench.scenario import Scenario, ScenarioError
from pyvmm.migration.params import MigrationSettings

ROOT = Path(__file__).resolve().parent.parent
# Small and quick: 2 vCPUs x 32 MiB, each dirtied at 20 MiB/s, against 32 MiB/s; with
# auto-converge it completes in a few seconds, without it never does.
SMALL = ["--cpus", "2", "--mem", "64", "--stress-rate", "20", "--bandwidth", "32", "--sleep", "1"]


def bench(tmp_path: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the run's work dir lands here
    return subprocess.run([*PYVMM, "bench", *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False, env=env, cwd=tmp_path)  # fmt: skip


@pytest.mark.kvm
@pytest.mark.slow
def test_a_short_run_reports_plots_and_tables(tmp_path: Path) -> None:
    out = tmp_path / "ac.json"
    proc = bench(tmp_path, *SMALL, "--auto-converge", "--name", "ac", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rpt = report.load(out)  # validates against the schema
    result = rpt["result"]
    assert result["status"] == "completed" and result["success"], result
    assert 0 < result["downtime"] <= 500
    assert result["dirty_syncs"] >= 2 and result["max_throttle_pcent"] >= 20
    history = rpt["progress_history"]
    # One sample per 50 ms poll: dozens over a run of seconds, timestamps increasing.
    assert len(history) >= result["total_time"] / 1000 / 0.2
    assert all(a["now"] < b["now"] for a, b in itertools.pairwise(history))
    assert history[-1]["status"] == "completed"
    # The guest's own progress on both sides, for both vCPUs, and the vCPU threads' CPU.
    for side in ("src", "dst"):
        assert set(rpt["guest_timings"][side]) == {"0", "1"}, side
        assert set(rpt["vcpu_cpu"][side]) == {"0", "1"}, side
    src_cpu = rpt["vcpu_cpu"]["src"]["0"]
    assert src_cpu[-1]["cpu_ms"] > src_cpu[0]["cpu_ms"]  # a flat-out vCPU burns CPU
    assert rpt["hardware"]["vmm"] == "pyvmm" and rpt["hardware"]["host"]["tsc_khz"] > 0
    assert not list(tmp_path.glob("pyvmm-bench-*")), "the work dir was left behind"

    # The plot: a PNG of at least 1000x600 and a self-contained HTML page beside it.
    proc = subprocess.run([*PYVMM, "bench", "plot", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pixels = image.imread(tmp_path / "ac.png")
    assert pixels.shape[1] >= 1000 and pixels.shape[0] >= 600
    html = (tmp_path / "ac.html").read_text()
    assert "<svg" in html and "<script src" not in html

    # The table: one row per run name.
    second = tmp_path / "nothrottle.json"
    proc = bench(tmp_path, *SMALL, "--max-time", "2", "--name", "nothrottle", "--output",
                 str(second), "--quiet")  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    proc = run_pyvmm(["bench", "table", str(out), str(second)])
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 4, proc.stdout
    assert lines[2].startswith("| ac ") and lines[3].startswith("| nothrottle ")
    assert "cancelled" in lines[3]


@pytest.mark.kvm
@pytest.mark.parametrize("limit", [["--max-time", "2"], ["--max-iters", "3"]])
@pytest.mark.slow
def test_a_run_that_hits_its_limit_is_cancelled_and_succeeds(
    tmp_path: Path, limit: list[str]
) -> None:
    out = tmp_path / "r.json"
    proc = bench(tmp_path, *SMALL, *limit, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    result = report.load(out)["result"]
    assert result["status"] == "cancelled" and result["cancelled"] and not result["success"]
    assert result["cancel_reason"] == limit[0][2:]
    assert result["downtime"] is None
    if limit[0] == "--max-iters":
        assert 4 <= result["dirty_syncs"] <= 5  # cancelled once it went above 3
    # Plain progress lines when stderr is not a terminal.
    assert "migrate_cancel" in proc.stderr and "iter" in proc.stderr


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.kvm
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_leaves_nothing_behind(tmp_path: Path, sig: signal.Signals) -> None:
    shaped = require(netns_missing(), optional=True)  # under CI the link is required
    link = ["--transport", "tcp", "--link-mbit", "200"] if shaped else []
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([*PYVMM, "bench", *SMALL, *link, "--output", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    children: list[int] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "migrating to" in line:
                break
        else:
            pytest.fail(f"the run ended before migrating: {proc.wait()}")
        children = _children(proc.pid)
        assert len(children) == 2, children  # source and destination VMs
        if shaped:
            assert len([n for n in _netns() if f"-{proc.pid}-" in n]) == 2
        proc.send_signal(sig)
        rc = proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:  # only if the test failed: never leave them to the next test
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    assert rc == (130 if sig == signal.SIGINT else 143), err
    assert ("Traceback" not in err and "interrupted" in err) or "terminated" in err
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not list(tmp_path.glob("pyvmm-bench-*")), "sockets and consoles left behind"
    assert not (tmp_path / "r").exists(), "a half report was written"
    assert not [n for n in _netns() if f"-{proc.pid}-" in n]


@pytest.mark.kvm
def test_a_dying_source_fails_the_run_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([*PYVMM, "bench", *SMALL, "--output", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    children: list[int] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "migrating to" in line:
                break
        children = _children(proc.pid)
        source = [p for p in children if b"memstress" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(source) == 1, children
        os.kill(source[0], signal.SIGKILL)  # the failure injected: the source VM dies
        rc = proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("pyvmm: error: the src VM exited with -9"), err
    assert "Traceback" not in err
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not list(tmp_path.glob("pyvmm-bench-*")) and not (tmp_path / "r").exists()


def _netns() -> list[str]:
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return out.stdout.split()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dirty-limit"], "--dirty-limit needs --dirty-ring-size"),
        (["--dirty-limit", "--auto-converge"], "mutually exclusive"),
        (["--link-mbit", "10"], "needs --transport tcp"),
        (["--responsive"], "need --auto-converge"),
        (["--periodic-throttle"], "need --auto-converge"),
        (
            ["--auto-converge", "--periodic-throttle", "--sync", "timer"],
            "--periodic-throttle syncs once per pass: it cannot run with --sync timer",
        ),
        (
            ["--auto-converge", "--auto-converge-legacy", "--sync", "background"],
            "--auto-converge-legacy syncs once per pass: it cannot run with --sync background",
        ),
        (["--sync", "sometimes"], "argument --sync: invalid choice: 'sometimes'"),
        (["--cpus", "2", "--mem", "64", "--stress-mem", "64"], "exceeds --mem"),
        (["--dirty-ring-size", "1000"], "power of two"),
        (["--binary", "no-such-qemu"], "not found"),
        (["--mem", "0"], "must be at least 1"),
        (["--periodic-sync", "off"], "unrecognized arguments: --periodic-sync off"),
        (["--throttle-legacy"], "unrecognized arguments: --throttle-legacy"),
        (["batch", "nope", "--output", "d"], "unknown comparison 'nope'"),
        (["batch", "downtime", "--output", "d", "--filter", "x*"], "selects no run"),
        (["table", "missing.json"], "missing.json: No such file"),
        (["plot", "bad.json"], "bad.json: not a pyvmm bench report"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1}))
    proc = bench(tmp_path, *args, timeout_s=30)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_schema_is_documented() -> None:
    doc = (ROOT / "docs" / "bench.md").read_text()
    for key in report.SCHEMA["properties"]:
        assert f"`{key}`" in doc, f"docs/bench.md does not explain {key}"
    for key in report.RESULT["properties"]:
        assert f"`{key}`" in doc, f"docs/bench.md does not explain result.{key}"
    proc = run_pyvmm(["bench", "schema"])
    assert json.loads(proc.stdout) == json.loads(json.dumps(report.SCHEMA))


@pytest.mark.kvm
@pytest.mark.slow
def test_batch_writes_reports_tables_charts_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "results"
    summary = tmp_path / "results.md"
    proc = bench(tmp_path, "batch", "downtime", "--filter", "*1000ms", "--output", str(out),
                 "--summary", str(summary), "--sleep", "1", "--max-time", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reports = sorted((out / "downtime").glob("*.json"))
    assert [p.name for p in reports] == ["downtime-1000ms-1.json"]
    scenario = report.load(reports[0])["scenario"]
    assert scenario["downtime"] == 1000 and scenario["max_time"] == 4
    assert "| downtime-1000ms " in (out / "downtime" / "table.md").read_text()
    assert (out / "downtime" / "chart.png").exists() and (out / "downtime" / "chart.html").exists()
    page = summary.read_text()
    assert "pyvmm bench batch downtime" in page and "](results/downtime/chart.png)" in page
    # --resume keeps what an earlier batch wrote and rebuilds the tables, charts and page.
    before = reports[0].read_bytes()
    summary.unlink()
    proc = bench(tmp_path, "batch", "downtime", "--filter", "*1000ms", "--output", str(out),
                 "--summary", str(summary), "--resume", timeout_s=60)  # fmt: skip
    assert proc.returncode == 0 and "kept from an earlier batch" in proc.stderr, proc.stderr
    assert reports[0].read_bytes() == before
    assert "--resume" not in summary.read_text() and "| downtime-1000ms " in summary.read_text()


def test_summary_only_runs_nothing_and_lists_what_is_missing(
    tmp_path: Path, qemu_binary: str
) -> None:
    """--summary-only: the page from the reports in DIR (here one simulated report of two
    repeats, and a QEMU peer's kept refusal); nothing runs, the missing repeat is named."""
    from pyvmm.sim.engine import simulate
    from pyvmm.sim.model import SimModel

    out, summary = tmp_path / "results", tmp_path / "results.md"
    ((scenario, hw),) = [r for r in COMPARISONS["downtime"]().runs if r[0].name.endswith("1000ms")]
    (out / "downtime").mkdir(parents=True)
    report.write(simulate(scenario, hw, SimModel(guest_rate_mib_s=64)),
                 out / "downtime" / "downtime-1000ms-1.json")  # fmt: skip
    refusal = "not run on qemu-system-x86_64: QEMU 7.2 cannot run this scenario"
    (out / "downtime" / "downtime-1000ms-qemu.skipped").write_text(refusal + "\n")
    proc = bench(tmp_path, "batch", "downtime", "--filter", "*1000ms", "--repeat", "2",
                 "--output", str(out), "--summary", str(summary), "--summary-only",
                 timeout_s=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "== " not in proc.stderr, proc.stderr  # no run started
    page = summary.read_text()
    assert "**Incomplete:** 1 of 2 runs have a report" in page, page
    assert "not run yet: downtime/downtime-1000ms #2" in page
    assert "| downtime-1000ms [sim]" in page and "--summary-only" not in page
    proc = bench(tmp_path, "batch", "downtime", "--filter", "*1000ms", "--binary",
                 qemu_binary, "--output", str(out), "--summary", str(summary),
                 "--summary-only", timeout_s=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"- {refusal}" in summary.read_text()  # the kept refusal, without starting QEMU
    empty = bench(tmp_path, "batch", "downtime", "--output", str(tmp_path / "none"),
                  "--summary-only")  # fmt: skip
    assert empty.returncode != 0 and "holds no report of the selected runs" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1, empty.stderr


@pytest.mark.kvm
@pytest.mark.slow
def test_the_same_scenario_runs_on_qemu(tmp_path: Path, qemu_binary: str) -> None:
    """Two vCPUs on QEMU too: it starts vCPU 0 only, the guest wakes vCPU 1 itself."""
    out = tmp_path / "q.json"
    proc = bench(tmp_path, "--binary", "qemu-system-x86_64", *SMALL, "--auto-converge",
                 "--sync", "iteration",
                 # QEMU syncs about once a second here: 30 iterations (guestperf's cap)
                 # can come before the throttle has climbed far enough.
                 "--max-iters", "1000", "--output", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rpt = report.load(out)
    assert rpt["hardware"]["vmm"] == "qemu" and re.match(
        r"\d+\.\d+", rpt["hardware"]["vmm_version"]
    )
    assert rpt["hardware"]["cpus"] == 2
    assert rpt["result"]["status"] == "completed", rpt["result"]
    # QEMU has no iteration-count: up to 9.1 every dirty sync ends an iteration.
    assert rpt["result"]["iteration_count"] == rpt["result"]["dirty_syncs"]
    # Both vCPUs ran memstress before and after the migration, on their own threads.
    for side in ("src", "dst"):
        timings = rpt["guest_timings"][side]
        assert set(timings) == {"0", "1"} and all(timings.values()), (side, timings)
        assert set(rpt["vcpu_cpu"][side]) == {"0", "1"}, side
    for vcpu in ("0", "1"):
        src = rpt["guest_timings"]["src"][vcpu]
        assert src[-1]["mib"] > src[0]["mib"], vcpu  # it kept writing
    # What this QEMU lacks is refused by name, after cleaning up.
    proc = bench(tmp_path, "--binary", "qemu-system-x86_64", "--mem", "32", "--auto-converge",
                 "--sync", "iteration", "--responsive", "--sleep", "1")  # fmt: skip
    assert proc.returncode != 0 and "cpu-throttle-responsive" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("pyvmm-bench-*"))


class FakeQemu:
    """query-migrate-parameters/-capabilities of a QEMU version, for qemu_parameters."""

    def __init__(self, params: list[str], caps: list[str]) -> None:
        self.params, self.caps = params, caps

    def execute(self, name: str) -> object:
        if name == "query-migrate-parameters":
            return dict.fromkeys(self.params, 0)
        return [{"capability": c, "state": False} for c in self.caps]


QEMU_7_2 = FakeQemu(
    ["downtime-limit", "max-bandwidth", "cpu-throttle-increment", "cpu-throttle-initial",
     "throttle-trigger-threshold", "max-cpu-throttle", "cpu-throttle-tailslow"],
    ["auto-converge", "events"],
)  # fmt: skip


@pytest.mark.parametrize(
    ("scenario", "version", "result"),
    [
        (Scenario(auto_converge=True, sync="iteration"), "7.2.0", "ok"),
        (Scenario(auto_converge=True, sync="timer"), "7.2.0",
         "QEMU 7.2.0 cannot run --sync timer: it syncs once per pass (the 5 s timer came in "
         "9.2)"),
        (Scenario(auto_converge=True, sync="background"), "7.2.0", "cannot run --sync background"),
        (Scenario(auto_converge=True, sync="timer"), "9.2.0", "ok"),
        (Scenario(auto_converge=True, sync="iteration"), "9.2.0",
         "QEMU 9.2.0 cannot run --sync iteration: it syncs on its 5 s timer too"),
        (Scenario(auto_converge=True, sync="iteration", periodic_throttle=True), "7.2.0",
         "no cpu-periodic-throttle=True"),
        (Scenario(auto_converge=True, sync="iteration", auto_converge_legacy=True), "7.2.0",
         "no x-auto-converge-legacy=True"),
        (Scenario(dirty_limit=True), "7.2.0", "QEMU 7.2.0 has no dirty-limit capability"),
    ],
)  # fmt: skip
def test_qemu_peers_run_only_their_own_generation(
    scenario: Scenario, version: str, result: str
) -> None:
    if result == "ok":
        params = qemu_parameters(QEMU_7_2, scenario, version)  # type: ignore[arg-type]
        assert "x-auto-converge-sync" not in params and params["cpu-throttle-increment"] == 10
        return
    with pytest.raises(ScenarioError, match=re.escape(result)):
        qemu_parameters(QEMU_7_2, scenario, version)  # type: ignore[arg-type]


def test_each_generation_in_its_parameters_words() -> None:
    def params(**kw: object) -> dict[str, object]:
        return Scenario(auto_converge=True, **kw).parameters()  # type: ignore[arg-type]

    assert params()["x-auto-converge-sync"] == "timer"
    assert params(sync="background", responsive=True)["cpu-throttle-responsive"] is True
    rfc = params(sync="iteration", periodic_throttle=True)
    assert rfc["cpu-periodic-throttle"] is True and "x-auto-converge-sync" not in rfc
    legacy = params(sync="iteration", auto_converge_legacy=True)
    assert legacy["x-auto-converge-legacy"] is True and "x-auto-converge-sync" not in legacy
    settings = MigrationSettings()
    for p in (rfc, legacy, params(sync="background")):
        settings.set_parameters(p)  # pyvmm takes every name the scenarios use
    assert "x-auto-converge-sync" not in Scenario().parameters()  # no auto-converge


def test_series_2024_comparison() -> None:
    comp = COMPARISONS["series-2024"]()
    names = [s.name for s, _ in comp.runs]
    for load in ("light", "moderate", "heavy"):
        for config in ("original", "background", "background-responsive", "rfc-periodic",
                       "timer-9.2", "2013", "dirty-limit"):  # fmt: skip
            assert f"{load}-{config}" in names
    for scenario, hw in comp.runs:
        scenario.check()
        hw.check()
        pass_s = hw.cpus * hw.working_set_mib() / scenario.bandwidth
        assert pass_s >= 12, scenario.name  # an iteration lasts well over 5 s
        assert scenario.max_time >= 7 * pass_s
        assert scenario.downtime == 500 and scenario.max_iters >= 1000
    by_name = {s.name: (s, hw) for s, hw in comp.runs}
    assert by_name["heavy-original"][0].sync == "iteration"
    assert by_name["heavy-background-responsive"][0].responsive
    assert by_name["moderate-dirty-limit"][1].dirty_ring_size == 4096
    assert comp.summary is not None


@pytest.mark.kvm
@pytest.mark.slow
def test_series_2024_reduced_batch(tmp_path: Path) -> None:
    """The experiment in reduced form: the light load, the series' three configurations
    (original, background, background-responsive), every run cut at 3 s."""
    out, summary = tmp_path / "results", tmp_path / "results.md"
    proc = bench(tmp_path, "batch", "series-2024", "--filter", "series-2024/light-[ob]*",
                 "--output", str(out), "--summary", str(summary), "--sleep", "0.5",
                 "--max-time", "3", timeout_s=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reports = [report.load(p) for p in sorted((out / "series-2024").glob("*.json"))]
    assert len(reports) == 3
    by_name = {r["scenario"]["name"]: r for r in reports}
    for name, r in by_name.items():
        assert r["scenario"]["max_time"] == 3 and r["hardware"]["stress_mem"] == 384, name
        assert r["result"]["status"] in ("cancelled", "completed"), (name, r["result"])
    # A 12 s first pass cut at 3 s: every configuration is still in its first iteration.
    assert {r["result"]["iteration_count"] for r in reports} == {1}
    page = summary.read_text()
    assert "| light-original " in page and "| iterations |" in page.replace("  ", " ")
    assert "**light** (2 vCPUs x 384 MiB at 64 MiB/s, a pass over them 12 s; the series: " \
        "150 MB of stress)" in page  # fmt: skip
    assert "| configuration" in page and "series' ratio" in page
    assert (out / "series-2024" / "chart-light.png").exists()
