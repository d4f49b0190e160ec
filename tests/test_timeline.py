"""The VMM's own timelines and dirty-page heatmaps (docs/timeline.md): the pieces without
KVM, a vCPU's track on a real guest, the QMP commands, and whole files made by
`pyvmm migrate --trace` and `pyvmm bench --trace --heatmap`, read back with a JSON reader
and checked against the Trace Event Format's documented fields."""

from __future__ import annotations

import ast
import io
import itertools
import json
import logging
import struct
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from vmproc import vm_process

from helpers import one_line_error, run_pyvmm
from pyvmm import timeline
from pyvmm.dirty.heatmap import Heatmap, decode_cells
from pyvmm.dirty.scan import cell_counts
from pyvmm.monitor.client import QmpCommandError
from pyvmm.monitor.recording import (
    CONVERGENCE_LOGGER,
    ConvergenceRecorder,
    decision_events,
    parse_decision_line,
)

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# --- layering ---------------------------------------------------------------------------------


def _pyvmm_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "pyvmm" or n.startswith("pyvmm.")}


def test_the_timeline_writer_is_a_leaf_that_every_layer_may_import() -> None:
    assert _pyvmm_imports(ROOT / "pyvmm" / "timeline.py") == set()
    for layer in ("kvm", "machine", "dirty", "migration", "monitor"):
        for path in (ROOT / "pyvmm" / layer).rglob("*.py"):
            bad = {n for n in _pyvmm_imports(path) if n.startswith(("pyvmm.trace", "pyvmm.bench"))}
            assert not bad, f"{path.relative_to(ROOT)} imports a top layer: {bad}"


# --- decision lines -> events (no KVM) --------------------------------------------------------

AUTO_CONVERGE = (
    "decision policy=auto-converge criterion=dirty-rate old=20 new=30 sync=9 period_ms=1102 "
    "dirty_bytes=67125248 xfer_bytes=46154560 threshold_bytes=23077280"
)
DIRTY_LIMIT_VCPU = (
    "decision policy=dirty-limit vcpu=0 quota_mbps=50 current_mbps=253 old_us=0 new_us=252964 "
    "rule=far-up sleep_pct=80 ring_full_us=63241 clamped=False max_rate_mbps=253 "
    "ring_entries=4096 period_ms=1010 rings=16 slept_ms=0"
)
DIRTY_LIMIT_TRIGGER = (
    "decision policy=dirty-limit trigger=dirty-rate sync=6 period_ms=1001 dirty_bytes=67117056 "
    "xfer_bytes=33555392 threshold_bytes=16777696 quota_mbps=1 action=none (already in service)"
)
PERIOD = (
    "period policy=auto-converge sync=4 dirty_bytes=1 xfer_bytes=2 threshold_bytes=1 fire=False"
)


def test_decision_lines_become_named_instants_and_counters() -> None:
    kind, f = parse_decision_line(AUTO_CONVERGE)
    assert kind == "decision" and f["old"] == 20 and f["new"] == 30 and f["period_ms"] == 1102
    assert decision_events(kind, f) == ("throttle 20 -> 30 (dirty-rate)", {"throttle (%)": {
        "throttle": 30}})  # fmt: skip
    kind, f = parse_decision_line(DIRTY_LIMIT_VCPU)
    assert f["clamped"] is False and f["rule"] == "far-up"
    name, counters = decision_events(kind, f)
    assert name == "dirty limit vCPU 0: far-up"
    assert counters["dirty-limit sleep per ring (ms)"] == {"vCPU 0": 252.964}
    assert counters["vCPU dirty rate (MB/s)"] == {"vCPU 0": 253}
    kind, f = parse_decision_line(DIRTY_LIMIT_TRIGGER)
    assert f["action"] == "none (already in service)"  # a value with spaces survives
    assert decision_events(kind, f)[0] == "trigger fired (dirty-rate): none (already in service)"
    assert decision_events(*parse_decision_line(PERIOD)) == ("trigger: no fire", {})
    assert decision_events(*parse_decision_line(PERIOD.replace("False", "True")))[0] == (
        "trigger: fire"
    )
    assert decision_events(*parse_decision_line("setup policy=x a=1"))[0] == "setup"


def test_the_log_recorder_sees_every_line_and_the_user_sees_what_they_saw_before() -> None:
    logger = logging.getLogger(CONVERGENCE_LOGGER)
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    parent = logging.getLogger("pyvmm")
    catch = Catch()
    parent.addHandler(catch)
    old_parent_level = parent.level
    parent.setLevel(logging.INFO)  # the user asked for INFO (pyvmm -v)
    try:
        level_before, propagate_before = logger.level, logger.propagate
        tl = timeline.Timeline(pid=1)
        rec = ConvergenceRecorder(tl)
        other = ConvergenceRecorder(timeline.Timeline(pid=2))  # a second VMM in the process
        rec.install()
        other.install()
        logger.debug(PERIOD)  # recorded, not shown: the user asked for INFO
        other.remove()
        logger.info(AUTO_CONVERGE)  # recorded and shown, once
        rec.remove()
        logger.info("after the recording")  # shown, not recorded
        assert (logger.level, logger.propagate) == (level_before, propagate_before)
    finally:
        parent.removeHandler(catch)
        parent.setLevel(old_parent_level)
    assert seen == [AUTO_CONVERGE, "after the recording"]
    assert [e["name"] for e in other.timeline.events() if e["ph"] == "i"] == ["trigger: no fire"]
    names = [e["name"] for e in tl.events() if e["ph"] == "i"]
    assert names == ["trigger: no fire", "throttle 20 -> 30 (dirty-rate)"]
    assert next(e for e in tl.events() if e["ph"] == "C")["args"] == {"throttle": 30}
    assert timeline.validate(tl.to_dict()) == []


# --- heatmap cells (no KVM) -------------------------------------------------------------------


@pytest.mark.parametrize("cells", [4096, 333, 1])
def test_cell_counts_equal_a_page_by_page_count(cells: int) -> None:
    rng = np.random.default_rng(cells)
    slots = [3 * 4096 + 5, 64 * 100]  # a slot that ends inside a word, and a second slot
    bitmaps = [rng.integers(0, 2**63, (n + 63) // 64, dtype=np.uint64) for n in slots]
    bitmaps[0][-1] |= np.uint64(1 << 62)  # a bit past the slot's end, which must not count
    heat = Heatmap(slots, cells)
    assert heat.cells <= cells and heat.cells * heat.pages_per_cell >= sum(slots)
    bits = np.concatenate(
        [
            np.unpackbits(b.view(np.uint8), bitorder="little")[:n]
            for b, n in zip(bitmaps, slots, strict=True)
        ]
    )
    want = np.add.reduceat(bits.astype(np.uint32), np.arange(0, bits.size, heat.pages_per_cell))
    assert np.array_equal(heat.counts(bitmaps), want)
    heat.record(bitmaps, 3, 1.5, 7)
    row = heat.rows[0]
    assert (row.sync, row.dirty_pages, row.new_pages) == (3, int(want.sum()), 7)
    assert np.array_equal(decode_cells(row.cells, heat.cells), want)


def test_cell_counts_refuses_what_it_cannot_count() -> None:
    bitmap = np.zeros(2, np.uint64)
    with pytest.raises(ValueError, match="pages_per_cell = 0"):
        cell_counts(bitmap, 0, 128, 0, np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match="out has 1 cells"):
        cell_counts(bitmap, 0, 128, 64, np.zeros(1, np.uint32))
    with pytest.raises(ValueError, match="npages = 129"):
        cell_counts(bitmap, 0, 129, 64, np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match="holds 2 cells, not 3"):
        decode_cells(_row([1, 2]), 3)


def _row(values: list[int]) -> str:
    from pyvmm.dirty.heatmap import encode_cells

    return encode_cells(np.array(values, np.uint32))


# --- a vCPU's track on a real guest -----------------------------------------------------------


def _spans(trace: dict[str, Any], pid: int | None = None) -> dict[int, list[dict[str, Any]]]:
    by_tid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X" and (pid is None or e["pid"] == pid):
            by_tid[e["tid"]].append(e)
    return by_tid


@pytest.mark.kvm
def test_a_vcpu_track_shows_running_throttle_sleeps_and_pauses() -> None:
    from pyvmm.machine.devices import SerialConsole
    from pyvmm.machine.elf import load_pvh_image
    from pyvmm.machine.images import resolve_image
    from pyvmm.machine.machine import Machine, MachineConfig
    from pyvmm.migration.convergence.throttle import CpuThrottle

    tl = timeline.Timeline()
    config = MachineConfig(64 << 20, 1, "mb=8")
    with Machine(config, SerialConsole(io.StringIO())) as machine:
        machine.boot(load_pvh_image(resolve_image("memstress")))
        machine.start()
        vcpu = machine.vcpus[0]
        time.sleep(0.2)
        vcpu.start_timeline(tl)
        throttle = CpuThrottle(lambda: machine.vcpus)
        throttle.set_percentage(50)
        time.sleep(0.5)
        throttle.stop()
        machine.pause()
        time.sleep(0.1)
        machine.resume()
        time.sleep(0.1)
        vcpu.stop_timeline()
        tid = vcpu.thread.native_id if vcpu.thread else None
    trace = tl.to_dict()
    assert timeline.validate(trace) == []
    spans = _spans(trace)[tid]
    names = Counter(s["name"] for s in spans)
    # 50 %: a 10 ms sleep every 20 ms for 0.5 s, about 25 of them (a loaded host runs fewer)
    assert 8 <= names["throttle sleep"] <= 30, names
    assert names["paused"] == 1 and names["running"] >= names["throttle sleep"]
    # One state at a time: each span ends where the next begins.
    for a, b in itertools.pairwise(spans):
        assert b["ts"] == pytest.approx(a["ts"] + a["dur"], abs=1.0), (a, b)
    paused = next(s for s in spans if s["name"] == "paused")
    assert 80_000 <= paused["dur"] <= 1_000_000


# --- the QMP commands -------------------------------------------------------------------------


@pytest.mark.kvm
def test_timeline_commands_and_their_errors(tmp_path: Path) -> None:
    with vm_process(tmp_path, "vm", ["memstress", "--append", "mb=4"]) as vm, vm.qmp() as q:
        assert q.execute("x-pyvmm-query-timeline") == {
            "recording": False, "events": 0, "dropped": 0, "heatmap": False}  # fmt: skip
        with pytest.raises(QmpCommandError, match="no timeline is being recorded"):
            q.execute("x-pyvmm-timeline-stop")
        with pytest.raises(QmpCommandError, match="no timeline has been recorded"):
            q.execute("x-pyvmm-query-heatmap")
        with pytest.raises(QmpCommandError, match="'heatmap-cells' expects a value between 1"):
            q.execute("x-pyvmm-timeline-start", {"heatmap-cells": 5000})
        q.execute("x-pyvmm-timeline-start", {"max-events": 1000})
        with pytest.raises(QmpCommandError, match="already being recorded"):
            q.execute("x-pyvmm-timeline-start")
        q.execute("migrate-set-parameters", {"downtime-limit": 123})
        q.execute("stop")
        q.execute("cont")
        with pytest.raises(QmpCommandError, match="still recording"):
            q.execute("x-pyvmm-query-timeline", {"from": 0})
        assert q.execute("x-pyvmm-query-timeline")["recording"] is True
        status = q.execute("x-pyvmm-timeline-stop")
        assert status["recording"] is False and status["events"] > 0
        with pytest.raises(QmpCommandError, match="no heatmap"):
            q.execute("x-pyvmm-query-heatmap")
        first = q.execute("x-pyvmm-query-timeline", {"from": 0, "count": 3})
        assert len(first["trace-events"]) == 3 and first["next"] == 3
        assert first["other-data"]["clock"] == "CLOCK_MONOTONIC"
        rest = q.execute("x-pyvmm-query-timeline", {"from": 3})
        events = first["trace-events"] + rest["trace-events"]
        assert rest["next"] is None and len(events) == status["events"]
    assert timeline.validate({"traceEvents": events}) == []
    params = [e for e in events if e["name"] == "migrate-set-parameters"]
    assert params and params[0]["args"] == {"downtime-limit": 123}
    assert any(e["name"] == "paused" and e["ph"] == "X" for e in events)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "vCPU 0" in names


# --- whole files ------------------------------------------------------------------------------


def _thread_names(trace: dict[str, Any]) -> dict[tuple[int, int], str]:
    return {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name"
    }


def _process_names(trace: dict[str, Any]) -> dict[int, str]:
    return {
        e["pid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "process_name"
    }


def check_trace_format(path: Path) -> dict[str, Any]:
    """Load with a plain JSON reader and check the Trace Event Format's documented fields
    (the JSON Object Format: traceEvents, displayTimeUnit; per event name, ph, ts, pid, tid;
    X has dur, i a scope, C numeric args, M a known name)."""
    data = json.loads(path.read_text())
    assert set(data) >= {"traceEvents", "displayTimeUnit", "otherData"}
    assert data["displayTimeUnit"] in ("ms", "ns")
    assert timeline.validate(data) == []
    for e in data["traceEvents"]:
        assert {"name", "ph", "ts", "pid", "tid"} <= set(e), e
    metadata_done = False
    last_ts = -1.0
    for e in data["traceEvents"]:  # metadata first, then in time order
        if e["ph"] == "M":
            assert not metadata_done, e
            continue
        metadata_done = True
        assert e["ts"] >= last_ts, e
        last_ts = e["ts"]
    return data


VERIFY = ["memverify", "--mem", "128M", "--vcpus", "2", "--append", "mb=8"]
DEST = ["--mem", "128M", "--vcpus", "2"]


@pytest.mark.kvm
@pytest.mark.slow
def test_migrate_trace_writes_one_file_with_both_vmms(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/mig.sock"
    out = tmp_path / "migration.json"
    with (
        vm_process(tmp_path, "dst", [*DEST, "--incoming", uri]) as dst,
        vm_process(tmp_path, "src", VERIFY) as src,
    ):
        src.wait_line("ok pages=", 20)
        result = run_pyvmm(
            ["migrate", src.qmp_addr, uri, "--cap", "auto-converge=on",
             "--set", f"max-bandwidth={16 * MIB}", "--set", "cpu-throttle-initial=60",
             "--set", "cpu-throttle-increment=20", "--set", "downtime-limit=100",
             "--trace", str(out), "--dest-qmp", dst.qmp_addr],
            timeout_s=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"timeline: {out}" in result.stderr
        info = src.cmd("query-migrate")
        assert isinstance(info, dict) and info["status"] == "completed"
        src_pid, dst_pid = src.proc.pid, dst.proc.pid
        dst.wait_line("ok pages=", 20)
    trace = check_trace_format(out)
    assert _process_names(trace) == {src_pid: f"pyvmm source (pid {src_pid})",
                                     dst_pid: f"pyvmm destination (pid {dst_pid})"}  # fmt: skip
    names = _thread_names(trace)
    for pid in (src_pid, dst_pid):
        assert {"vCPU 0", "vCPU 1"} <= {n for (p, _), n in names.items() if p == pid}
    by_name = {n: tid for (p, tid), n in names.items() if p == src_pid}
    spans = _spans(trace, src_pid)
    vcpu_states = Counter(s["name"] for s in spans[by_name["vCPU 0"]])
    assert vcpu_states["throttle sleep"] > 0 and vcpu_states["running"] > 0
    assert vcpu_states["paused"] == 1  # stopped at the switchover, for good
    mig = spans[by_name["migration thread"]]
    kinds = Counter(s["name"] for s in mig)
    assert kinds["send window"] > 0 and kinds["rate-limit wait"] > 0
    assert kinds["setup"] == kinds["pre-copy"] == kinds["switchover"] == 1
    # Every dirty sync is a span: on the migration thread, or on the thread that forced it.
    syncs = sum(1 for s in trace["traceEvents"] if s["ph"] == "X" and s["name"] == "dirty sync"
                and s["pid"] == src_pid)  # fmt: skip
    assert syncs == info["ram"]["dirty-sync-count"]
    switchover = next(s for s in mig if s["name"] == "switchover")
    steps = [s for s in mig if s["cat"] == "switchover" and s is not switchover]
    assert [s["name"] for s in steps] == [
        "stop vCPUs",
        "capture state",  # before the final sync: see switchover.py
        "final sync + pages",
        "send state",
        "SWITCHOVER -> LOADED",
        "commit",
        "GO -> STARTED",
    ]
    for step in steps:  # nested in the switchover span
        assert switchover["ts"] <= step["ts"] + 1
        assert step["ts"] + step["dur"] <= switchover["ts"] + switchover["dur"] + 1
    instants = [e["name"] for e in trace["traceEvents"] if e["ph"] == "i" and e["pid"] == src_pid]
    assert "throttle 0 -> 60 (dirty-rate)" in instants
    assert "trigger: fire" in instants and "migrate-set-parameters" in instants
    assert "status completed" in instants
    counters = {e["name"] for e in trace["traceEvents"] if e["ph"] == "C" and e["pid"] == src_pid}
    assert {"remaining (MiB)", "bandwidth (Mbit/s)", "dirty rate (MiB/s)",
            "throttle (%)"} <= counters  # fmt: skip
    dst_instants = {e["name"] for e in trace["traceEvents"] if e["pid"] == dst_pid}
    assert "incoming: GO, vCPUs started" in dst_instants


def test_cli_refusals_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["migrate", "unix:/nonexistent", "unix:/x", "--dest-qmp", "unix:/y"],
         "--dest-qmp is only for --trace"),
        (["migrate", "unix:/nonexistent", "unix:/x", "--trace", "/no/dir/t.json"],
         "no directory /no/dir"),
        (["migrate", "unix:/nonexistent", "unix:/x", "--cancel-after", "3"],
         "--cancel-after needs --wait or --trace"),
        (["timeline", "show", str(tmp_path / "absent.json")], "No such file or directory"),
        (["timeline", "show", str(tmp_path / "bad.json")], "not JSON"),
        (["timeline", "show", str(tmp_path / "odd.json")], "not a Trace Event Format file"),
        (["timeline", "record", "unix:/nonexistent", "--output", "/no/dir/t.json"],
         "no directory /no/dir"),
    ]  # fmt: skip
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "odd.json").write_text('{"traceEvents": [{"ph": "Q"}]}')
    for args, message in cases:
        result = run_pyvmm(args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in one_line_error(result.stderr), (args, result.stderr)


@pytest.mark.kvm
def test_timeline_record_and_show(tmp_path: Path) -> None:
    out = tmp_path / "vm.json"
    with vm_process(tmp_path, "vm", ["memstress", "--append", "mb=4 rate=8"]) as vm:
        result = run_pyvmm(["timeline", "record", vm.qmp_addr, "--seconds", "1",
                            "--output", str(out)])  # fmt: skip
        assert result.returncode == 0, result.stderr
        pid = vm.proc.pid
    trace = check_trace_format(out)
    assert _process_names(trace) == {pid: f"pyvmm VM (pid {pid})"}  # not migrating
    shown = run_pyvmm(["timeline", "show", str(out)])
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"== {out}" and lines[1] == f"pyvmm VM (pid {pid})"
    vcpu = next(line for line in lines if line.startswith("  vCPU 0: "))
    assert "running x" in vcpu and "guest sleep x" in vcpu  # memstress paces with port 0x504
    assert any(line.endswith("recording stopped") for line in lines)


@pytest.mark.kvm
@pytest.mark.slow
def test_bench_trace_and_heatmap_and_their_pictures(tmp_path: Path) -> None:
    report_path, trace_path = tmp_path / "r.json", tmp_path / "t.json"
    result = run_pyvmm(
        ["bench", "--cpus", "2", "--mem", "32", "--stress-rate", "4", "--bandwidth", "64",
         "--sleep", "0.5", "--quiet", "--trace", str(trace_path), "--heatmap",
         "--output", str(report_path)],
        timeout_s=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rpt = json.loads(report_path.read_text())
    heat = rpt["heatmap"]
    assert heat["cells"] <= 4096 and heat["encoding"] == "zlib+base64 uint32le"
    assert heat["cells"] * heat["pages_per_cell"] >= heat["total_pages"]
    # One row per dirty sync, the setup sync first with every page still to send.
    assert [r["sync"] for r in heat["rows"]] == list(range(1, rpt["result"]["dirty_syncs"] + 1))
    assert heat["rows"][0]["dirty_pages"] == heat["total_pages"]
    trace = check_trace_format(trace_path)
    roles = sorted(n.split(" (")[0] for n in _process_names(trace).values())
    assert roles == ["pyvmm destination", "pyvmm source"]
    out = run_pyvmm(["bench", "plot", "--heatmap", str(report_path), "--output",
                     str(tmp_path / "h.png")])  # fmt: skip
    assert out.returncode == 0, out.stderr
    png, gif = tmp_path / "h.png", tmp_path / "h.gif"
    assert out.stdout.split() == [str(png), str(gif)]
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width == 1200 and height >= 200
    with Image.open(gif) as img:
        assert img.format == "GIF" and img.n_frames == len(heat["rows"])
    no_heat = dict(rpt)
    del no_heat["heatmap"]
    (tmp_path / "n.json").write_text(json.dumps(no_heat))
    bad = run_pyvmm(["bench", "plot", "--heatmap", str(tmp_path / "n.json")])
    assert bad.returncode == 1 and "has no heatmap" in bad.stderr


def test_threading_is_what_timeline_uses() -> None:
    tl = timeline.Timeline(pid=5)
    tid = tl.thread_track("me")
    assert tid == threading.get_native_id() and tl.thread_track("other") == tid
    names = [e["args"]["name"] for e in tl.events() if e["name"] == "thread_name"]
    assert names == ["me"]  # named once
    tl.complete("child", 10, 1, tid)
    tl.complete("parent", 10, 5, tid)
    spans = [e["name"] for e in tl.events() if e["ph"] == "X"]
    assert spans == ["parent", "child"]  # at equal ts the enclosing span comes first
