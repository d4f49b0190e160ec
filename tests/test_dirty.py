"""Dirty tracking on real KVM: exact page sets, content-checked rounds, rates, failures."""

from __future__ import annotations

import ast
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest

import guestgen
from helpers import pyvmm_process, run_pyvmm, wait_for_path
from pyvmm.dirty import ring as ring_mod
from pyvmm.dirty.factory import make_tracker
from pyvmm.dirty.rate import DirtyRateError, DirtyRateMonitor, DirtyRateRequest
from pyvmm.dirty.ring_quirk import RingQuirk
from pyvmm.dirty.scan import bitmap_to_pages
from pyvmm.kvm import Kvm, abi
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.dirty_ring_setup import max_ring_entries
from pyvmm.machine.elf import load_pvh_image, parse_pvh_image
from pyvmm.machine.errors import MachineError
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.monitor.client import SyncQmp

pytestmark = pytest.mark.kvm
MODES = ["bitmap", "ring"]
PAGE = 4096


def make_machine(mode: str, mem_mib: int, vcpus: int, cmdline: str = "") -> Machine:
    ring = 65536 if mode == "ring" else None
    config = MachineConfig(mem_mib << 20, vcpus, cmdline, dirty_ring_entries=ring)
    return Machine(config, SerialConsole(io.StringIO()))


def reported_pages(bitmaps: list[np.ndarray]) -> set[int]:
    return {int(p) for p in bitmap_to_pages(bitmaps[0])}


@pytest.mark.parametrize("mode", MODES)
def test_reports_exactly_the_pages_the_guest_wrote(mode: str) -> None:
    rng = np.random.default_rng(7)
    pages = sorted(int(p) for p in rng.choice(np.arange(512, 4096), 3000, replace=False))
    image = parse_pvh_image(guestgen.make_elf(guestgen.write_pages([p * PAGE for p in pages])))
    with make_machine(mode, 32, 2) as machine:
        machine.boot(image)
        tracker = make_tracker(machine)
        view = tracker.open_view("test")
        view.sync()  # image loading and INITIALLY_SET: everything before the guest runs
        for b in view.bitmaps:
            b.fill(0)
        machine.start()
        assert machine.wait(20).reason == "all vCPUs halted"
        assert view.sync() == len(reported_pages(view.bitmaps))
        got = reported_pages(view.bitmaps)
        missing = set(pages) - got
        assert not missing, f"{len(missing)} written pages not reported"
        if mode == "bitmap":
            assert got == set(pages)
        tracker.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_every_changed_page_is_reported_over_many_rounds(mode: str) -> None:
    """The migration invariant, checked on content: nothing that changed goes unreported."""
    with make_machine(mode, 128, 2, "mb=24 pattern=word") as machine:
        machine.boot(load_pvh_image(resolve_image("memstress")))
        tracker = make_tracker(machine)
        view = tracker.open_view("test")
        bitmaps = view.bitmaps
        ram = machine.memory.regions[0].array
        machine.start()
        time.sleep(0.5)
        machine.pause()
        view.sync()
        previous = ram.copy()
        for b in bitmaps:
            b.fill(0)
        for round_ in range(8):
            machine.resume()
            time.sleep(0.15 + 0.05 * round_)
            vmm_page = 600 + round_  # pyvmm's own writes count too
            machine.memory.write(vmm_page * PAGE, bytes([round_ + 1]) * 16)
            machine.pause()
            view.sync()
            changed = np.flatnonzero(
                (ram.reshape(-1, PAGE) != previous.reshape(-1, PAGE)).any(axis=1)
            )
            got = reported_pages(bitmaps)
            missing = set(changed.tolist()) - got
            assert not missing, f"round {round_}: {len(missing)} changed pages not reported"
            assert len(changed) > 1000, "the guest did not run"
            assert vmm_page in got
            previous = ram.copy()
            for b in bitmaps:
                b.fill(0)
        tracker.close()


def test_bitmap_mode_uses_manual_protect_when_offered() -> None:
    with make_machine("bitmap", 32, 1) as machine:
        machine.boot(parse_pvh_image(guestgen.make_elf(guestgen.CLI_HLT)))
        tracker = make_tracker(machine)
        caps = machine.kvm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        assert tracker.manual_protect == (caps & 3 == 3)
        view = tracker.open_view("test")
        view.sync()
        if tracker.manual_protect:  # INITIALLY_SET: a fresh slot reads as all dirty
            assert len(reported_pages(view.bitmaps)) == machine.memory.regions[0].pages
        tracker.close()


def test_two_users_each_see_every_page() -> None:
    image = parse_pvh_image(guestgen.make_elf(guestgen.write_pages([0x300000, 0x301000])))
    with make_machine("bitmap", 32, 1) as machine:
        machine.boot(image)
        tracker = make_tracker(machine)
        a, b = tracker.open_view("a"), tracker.open_view("b")
        first = a.sync()  # with INITIALLY_SET every page, else what pyvmm loaded
        assert first > 0
        assert b.sync() == first  # a's sync handed them to b; b's own found nothing new
        for bm in (*a.bitmaps, *b.bitmaps):
            bm.fill(0)
        machine.start()
        machine.wait(10)
        assert b.sync() == 2  # a's sync handed b nothing new; this one found both pages
        assert a.sync() == 2  # b's sync handed a both pages
        assert reported_pages(a.bitmaps) == reported_pages(b.bitmaps) == {0x300, 0x301}
        tracker.close()


@pytest.mark.parametrize("lossy", [True, False])
def test_a_full_ring_resends_everything_only_on_a_lossy_host(
    monkeypatch: pytest.MonkeyPatch, lossy: bool
) -> None:
    """Failure injection: pretend every harvest found the ring at its soft limit. The slot
    ends 3 pages into a bitmap word: "every page" sets no bit past its end."""
    config = MachineConfig((64 << 20) + 3 * PAGE, 1, "mb=8", dirty_ring_entries=65536)
    with Machine(config, SerialConsole(io.StringIO())) as machine:
        machine.boot(load_pvh_image(resolve_image("memstress")))
        quirk = RingQuirk(65536, lossy, "forced", "test")
        tracker = make_tracker(machine, quirk)
        monkeypatch.setattr(tracker, "soft_limit", 1)
        view = tracker.open_view("test")
        machine.start()
        time.sleep(0.5)
        view.sync()
        assert tracker.full_harvests > 0
        pages = machine.memory.regions[0].pages
        assert max(reported_pages(view.bitmaps)) < pages
        everything = len(reported_pages(view.bitmaps)) == pages
        if lossy:
            assert tracker.resends == tracker.full_harvests and everything
        else:
            assert tracker.resends == 0 and not everything
        tracker.close()


def test_ring_livelock_ends_the_vm_with_a_clear_error() -> None:
    """Failure injection: ring-full exits that find nothing to harvest, again and again."""
    with make_machine("ring", 32, 1) as machine:
        machine.boot(parse_pvh_image(guestgen.make_elf(guestgen.CLI_HLT)))
        tracker = make_tracker(machine)
        vcpu = machine.vcpus[0]
        for _ in range(ring_mod.LIVELOCK_EXITS):
            vcpu.on_dirty_ring_full(vcpu)
        status = machine.exit_status
        assert status is not None and status.error
        assert "dirty ring livelock" in status.reason and "65536-entry ring" in status.reason
        tracker.close()


def test_ring_mode_without_kernel_support_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failure injection: a kernel whose KVM offers no dirty ring."""
    real = Kvm.check_extension

    def no_ring(self: Kvm, cap: int) -> int:
        if cap in (abi.KVM_CAP_DIRTY_LOG_RING, abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            return 0
        return real(self, cap)

    monkeypatch.setattr(Kvm, "check_extension", no_ring)
    with make_machine("ring", 32, 1) as machine:
        with pytest.raises(MachineError, match="no dirty ring"):
            machine.boot(parse_pvh_image(guestgen.make_elf(guestgen.CLI_HLT)))
        assert machine.vcpus == []


def test_largest_ring_is_the_default() -> None:
    with Kvm() as kvm:
        assert max_ring_entries(kvm) == kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING) // 16


def test_rate_requests_are_validated_like_qemu() -> None:
    with make_machine("bitmap", 32, 1) as machine:
        machine.boot(parse_pvh_image(guestgen.make_elf(guestgen.CLI_HLT)))
        monitor = DirtyRateMonitor(machine.memory, make_tracker(machine))
        bad = [
            (DirtyRateRequest(calc_time=61), r"out of range \[50ms, 60000ms\]"),
            (DirtyRateRequest(calc_time=49, calc_time_unit="millisecond"), "out of range"),
            (DirtyRateRequest(sample_pages=100), r"sample-pages is out of range\[128, 16384\]"),
            (DirtyRateRequest(mode="dirty-ring"), "mode dirty-ring is not enabled"),
            (DirtyRateRequest(mode="bogus"), "does not accept value 'bogus'"),
        ]
        for req, message in bad:
            with pytest.raises(DirtyRateError, match=message):
                monitor.start(req)
        monitor.start(DirtyRateRequest(calc_time=200, calc_time_unit="millisecond"))
        with pytest.raises(DirtyRateError, match="already being measured"):
            monitor.start(DirtyRateRequest())
        assert monitor.wait(5).status == "measured"


def _measure(sock: Path, mode: str) -> tuple[int, list[int]]:
    proc = run_pyvmm(["dirtyrate", f"unix:{sock}", "--mode", mode, "--calc-time", "2"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    total = re.fullmatch(r"dirty-rate: (\d+) MiB/s", lines[0])
    assert total, proc.stdout
    per_vcpu = [int(re.fullmatch(r"vcpu \d+: (\d+) MiB/s", line).group(1)) for line in lines[1:]]
    return int(total.group(1)), per_vcpu


@pytest.mark.exclusive  # measures rates or times: runs alone
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_dirty_rate_of_memstress(tmp_path: Path, mode: str) -> None:
    """2 vCPUs x 100 MiB/s over 256 MiB each: no page is rewritten in a 2 s window."""
    sock = tmp_path / "qmp.sock"
    args = ["run", "memstress", "--vcpus", "2", "--mem", "640M", "--append", "mb=256 rate=100"]
    args += ["--qmp", f"unix:{sock}", "--serial", str(tmp_path / "serial")]
    if mode == "ring":
        args.append("--dirty-ring")
    with pyvmm_process(args):
        wait_for_path(sock)
        time.sleep(1.0)
        sampled, _ = _measure(sock, "page-sampling")
        assert 150 <= sampled <= 250, sampled
        logged, per_vcpu = _measure(sock, "dirty-ring" if mode == "ring" else "dirty-bitmap")
        assert 180 <= logged <= 220, logged
        if mode == "ring":
            assert len(per_vcpu) == 2 and all(90 <= r <= 110 for r in per_vcpu), per_vcpu
        with SyncQmp(f"unix:{sock}") as qmp:
            info = qmp.cmd("query-dirty-rate", **{"calc-time-unit": "millisecond"})
            assert info["status"] == "measured" and info["calc-time"] == 2000


def test_dirty_modules_import_each_other_without_a_cycle() -> None:
    """tracker.py is the base of bitmap.py and ring.py, so it may not import them, not even
    inside a function: make_tracker lives in factory.py."""
    package = Path(__file__).resolve().parent.parent / "pyvmm" / "dirty"
    graph: dict[str, set[str]] = {}
    for source in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            imported |= {n.split(".")[2] for n in names if n.startswith("pyvmm.dirty.")}
        graph[source.stem] = imported - {source.stem}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()) - seen:
            if nxt == target or reaches(nxt, target, seen | {nxt}):
                return True
        return False

    assert not graph["tracker"] & {"bitmap", "ring", "factory"}, graph["tracker"]
    cycles = [m for m in graph if reaches(m, m, set())]
    assert not cycles, {m: graph[m] for m in cycles}
