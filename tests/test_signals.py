"""Any number of SIGTERM/SIGINT, in any rhythm, end `pyvmm run` within a second, with
status 0 and one line naming the signal: to a running guest and to a destination
that has just resumed a migrated one. (Before the control loop, a second signal inside
the first handler deadlocked on Machine._lock: 7 of 20 runs hung with two SIGTERMs
150 us apart, 19 of 20 on a fresh destination with 50 of them.)"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from vmproc import wait_migration

from helpers import PYVMM, wait_for_line
from pyvmm.monitor.client import SyncQmp

pytestmark = pytest.mark.kvm
GAPS_S = (20e-6, 100e-6, 300e-6, 1e-3)
BURSTS = (2, 50, 300)
END_WITHIN_S = 1.0
GUEST = ["memstress", "--mem", "64M", "--append", "mb=8 rate=16"]


def start(args: list[str], stack: ExitStack) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*PYVMM, "run", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )

    def kill() -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()

    stack.callback(kill)
    return proc


def burst(pid: int, count: int, gap_s: float, signums: list[int]) -> float:
    """Send `count` signals `gap_s` apart (busy-waiting: sleep is too coarse); returns the
    time of the first."""
    t0 = time.monotonic()
    for i, signum in zip(range(count), itertools.cycle(signums), strict=False):
        target = t0 + i * gap_s
        while time.monotonic() < target:
            pass
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            break  # it has already ended: fine
    return t0


def check_ended(proc: subprocess.Popen[str], t0: float, sent: list[int], what: str) -> None:
    try:
        proc.wait(timeout=max(0.0, t0 + END_WITHIN_S - time.monotonic()) + 0.5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: still running {END_WITHIN_S} s after the signals (hung)")
    ended_after = time.monotonic() - t0
    assert proc.stderr is not None
    lines = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert proc.returncode == 0, (what, proc.returncode, lines)
    assert "Traceback" not in "\n".join(lines), (what, lines)
    # Python runs pending handlers in signal-number order, so with both kinds in flight
    # either may be the one named.
    named = {f"pyvmm: terminated by {signal.Signals(s).name}" for s in sent}
    assert lines[-1] in named, (what, lines)
    assert ended_after < END_WITHIN_S + 0.5, (what, ended_after)


class QmpOnly:
    """What wait_migration needs of a VM: a name and a QMP connection."""

    name = "src"

    def __init__(self, address: str) -> None:
        self.address = address

    def qmp(self) -> SyncQmp:
        return SyncQmp(self.address)


def plans(runs: int) -> list[tuple[int, float, list[int]]]:
    """(burst size, gap, signals) for `runs` runs of each burst size, gaps and kinds cycled."""
    kinds = itertools.cycle([[signal.SIGTERM], [signal.SIGINT], [signal.SIGTERM, signal.SIGINT]])
    gaps = itertools.cycle(GAPS_S)
    return [(n, next(gaps), next(kinds)) for n in BURSTS for _ in range(runs)]


def running_guests(tmp_path: Path, runs: int, parallel: int = 6) -> None:
    todo = plans(runs)
    for start_at in range(0, len(todo), parallel):
        batch = todo[start_at : start_at + parallel]
        with ExitStack() as stack:
            procs = []
            for i, _ in enumerate(batch):
                serial = tmp_path / f"g{start_at + i}.serial"
                procs.append((start([*GUEST, "--serial", str(serial)], stack), serial))
            for proc, serial in procs:
                wait_for_line(serial, "memstress", 30)
                assert proc.poll() is None
            for (proc, _), (count, gap, kinds) in zip(procs, batch, strict=True):
                t0 = burst(proc.pid, count, gap, kinds)
                check_ended(proc, t0, kinds, f"running guest, {count} signals {gap:g} s apart")


def fresh_destinations(tmp_path: Path, runs: int) -> None:
    for i, (count, gap, kinds) in enumerate(plans(runs)):
        uri = f"unix:{tmp_path}/mig{i}.sock"
        src_qmp = tmp_path / f"src{i}.qmp"
        dst_serial = tmp_path / f"dst{i}.serial"
        with ExitStack() as stack:
            dst = start(["--mem", "64M", "--incoming", uri, "--serial", str(dst_serial)], stack)
            src = start([*GUEST, "--qmp", f"unix:{src_qmp}", "--serial", "/dev/null"], stack)
            deadline = time.monotonic() + 30
            while not (src_qmp.exists() and Path(uri[5:]).exists()):
                assert time.monotonic() < deadline and src.poll() is None and dst.poll() is None
                time.sleep(0.01)
            with SyncQmp(f"unix:{src_qmp}") as q:
                q.execute("migrate-set-parameters", {"max-bandwidth": 0})
                q.execute("migrate", {"uri": uri})

            assert wait_migration(QmpOnly(f"unix:{src_qmp}"), 30)["status"] == "completed"
            t0 = burst(dst.pid, count, gap, kinds)
            check_ended(dst, t0, kinds, f"fresh destination, {count} signals {gap:g} s apart")


def test_signal_bursts_end_a_running_guest_quickly(tmp_path: Path) -> None:
    running_guests(tmp_path, runs=2)


def test_signal_bursts_end_a_fresh_destination_quickly(tmp_path: Path) -> None:
    fresh_destinations(tmp_path, runs=1)


@pytest.mark.slow
def test_signal_bursts_ten_runs_each(tmp_path: Path) -> None:
    """Bursts of 2, 50 and 300, ten runs each, both targets. The issue measured 20; before
    the control loop 7 of 20 hung on a running guest and 19 of 20 on a fresh destination,
    so ten runs would have caught either with a probability above 98 %, in half the time."""
    running_guests(tmp_path, runs=10)
    fresh_destinations(tmp_path, runs=10)
