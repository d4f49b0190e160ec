"""Does this host lose dirty-ring entries when a ring fills? The start-up probe.

KVM's contract: when a vCPU's ring reaches its soft limit (size minus
KVM_DIRTY_RING_RSVD_ENTRIES = 64, minus the PML batch where there is PML), the
vCPU exits with KVM_EXIT_DIRTY_RING_FULL before it runs on; the reserve takes
the pushes made in between. So a ring-full exit loses nothing, and a harvest
that finds the ring full is normal. Some hosts break that: kvm_pvm emulates up
to pvm_emul_batch (1024) guest instructions without looking at the ring, so
guest ring-0 code that stores to more fresh pages than the reserve holds in one
batch overruns it, and KVM wraps over entries nobody harvested. Whether the
host in use does this is a quirk, decided per ring size:

- the probe boots a 1-vCPU VM with a ring of that size, running the ringprobe
  guest: at CPL0 (code such a host emulates) it writes one marker word into
  more pages than the ring holds, sixteen stores per loop turn;
- the reaper is held back, so the ring really fills and every harvest happens
  at a ring-full exit;
- afterwards the pages that hold their marker (the exact set written) are
  compared with the pages the ring reported. Any page missing, or a ring-full
  livelock, makes the verdict "lossy". Whether a fill overruns depends on where
  in a batch the soft limit falls, so the probe fills the ring up to
  PROBE_RUNS times (a fresh VM each) and stops at the first loss.

With the quirk on (lossy), RingTracker marks the whole guest dirty whenever a
harvest finds a ring at its soft limit; with it off, a ring-full exit is just a
harvest. `pyvmm run --dirty-ring-quirk auto|lossy|reliable` forces it.

The probe costs a VM of ring-size x 4.5 KiB and, on this host, about 1.5 s
per fill of a 65536-entry ring (emulated stores), so its verdict is cached per host boot
(/proc/sys/kernel/random/boot_id), kernel release and ring size, in
$XDG_CACHE_HOME/pyvmm/dirty-ring-quirk.json (default ~/.cache). A module
reload with other parameters without a reboot is not noticed: delete the file
or force the quirk. docs/dirty-tracking.md has the measurements behind this.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyvmm.dirty.ring import RingTracker
from pyvmm.dirty.scan import bitmap_to_pages
from pyvmm.kvm import Kvm
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.dirty_ring_setup import validate_ring_entries
from pyvmm.machine.elf import load_pvh_image
from pyvmm.machine.errors import MachineError
from pyvmm.machine.images import resolve_image
from pyvmm.machine.machine import Machine, MachineConfig
from pyvmm.machine.memory import PAGE_SIZE

log = logging.getLogger(__name__)

SETTINGS = ("auto", "lossy", "reliable")
PROBE_VERSION = 1  # bump when the probe changes: cached verdicts of older probes are ignored
RINGPROBE_MAGIC = 0x52494E4750524F42  # guest/ringprobe.c: word 0 of every page it writes
GUEST_BASE_BYTES = 8 << 20  # the image, its stacks and the legacy area below usable RAM
SWEEP_TIMEOUT_S = 120.0
# A lossy host loses only when the soft limit falls early enough in a batch of emulated
# stores (about 3 fills in 4 here, tools/ring_loss.py): several fills make a miss unlikely.
PROBE_RUNS = 3
CACHE_NAME = "dirty-ring-quirk.json"


class RingProbeError(RuntimeError):
    """The probe could not run to the end (not a verdict)."""


@dataclass
class RingSweep:
    """One run of the ringprobe guest against a ring, counted against what it wrote."""

    ring_entries: int
    cpl: int
    reaper: bool
    pages_written: int  # pages holding their marker afterwards: the exact set written
    pages_missing: int  # ... of which the ring never reported
    ring_full_exits: int
    full_harvests: int  # harvests that found the ring at or past its soft limit
    largest_harvest: int  # entries
    livelock: bool  # the VM ended on ring-full exits that found nothing
    elapsed_s: float
    # Guest frame numbers: the pages that hold their marker, and all pages reported.
    written: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.uint64))
    reported: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.uint64))
    console: list[str] = field(repr=False, default_factory=list)  # the guest's lines

    @property
    def lost(self) -> bool:
        return self.pages_missing > 0 or self.livelock

    def describe(self) -> str:
        what = (
            "livelocked on ring-full exits"
            if self.livelock
            else f"{self.pages_missing} never reported"
        )
        return (
            f"{self.ring_entries}-entry ring, {self.pages_written} pages written at "
            f"CPL{self.cpl}, {what}; {self.ring_full_exits} ring-full exits, largest "
            f"harvest {self.largest_harvest} entries, {self.elapsed_s:.1f} s"
        )


@dataclass
class RingQuirk:
    """The verdict for one ring size: does a ring-full exit mean entries may be lost?"""

    ring_entries: int
    lossy: bool
    source: str  # probe | cache | forced | probe-failed (then lossy, and not cached)
    detail: str

    def to_qmp(self) -> dict[str, Any]:
        return {
            "lossy": self.lossy,
            "source": self.source,
            "detail": self.detail,
        }


def probe_pages(ring_entries: int) -> int:
    """More fresh pages than the ring holds: a full ring and an eighth (at least 1024) more."""
    return ring_entries + max(1024, ring_entries // 8)


def run_sweep(
    ring_entries: int,
    pages: int,
    cpl: int = 0,
    *,
    reaper: bool = False,
    timeout_s: float = SWEEP_TIMEOUT_S,
) -> RingSweep:
    """Boot ringprobe with `pages=pages cpl=cpl` on a 1-vCPU VM whose ring has
    `ring_entries` entries; count the written pages the ring never reported."""
    mem_bytes = GUEST_BASE_BYTES + -(-pages * PAGE_SIZE // (2 << 20)) * (2 << 20)
    config = MachineConfig(mem_bytes, 1, f"pages={pages} cpl={cpl}", None, ring_entries)
    with Machine(config, SerialConsole(io.StringIO())) as machine:
        machine.boot(load_pvh_image(resolve_image("ringprobe")))
        tracker = RingTracker(machine, lossy=False, reaper=reaper)
        try:
            with tracker.open_view("ring-probe") as view:
                view.sync()  # what pyvmm itself wrote (the image, the boot data): not ours
                for bitmap in view.bitmaps:
                    bitmap.fill(0)
                start = time.monotonic()
                machine.start()
                end = machine.wait(timeout_s)
                elapsed_s = time.monotonic() - start
                if end is None:
                    machine.request_exit(1, "ring probe timed out", error=True)
                    raise RingProbeError(
                        f"the ring probe ({ring_entries} entries, {pages} pages) did not "
                        f"finish within {timeout_s:.0f} s"
                    )
                livelock = end.error and "livelock" in end.reason
                if (end.error or end.code != 0) and not livelock:
                    raise RingProbeError(f"the ring probe guest failed: {end.reason}")
                view.sync()  # the entries still in the ring
                written, reported = [], []
                for region, bitmap in zip(machine.memory.regions, view.bitmaps, strict=True):
                    base = np.uint64(region.gpa // PAGE_SIZE)
                    written.append(_marked_pages(region.array, base))
                    reported.append(bitmap_to_pages(bitmap) + base)
                console = [line.text for line in machine.serial.lines]
        finally:
            tracker.close()
    all_written, all_reported = np.concatenate(written), np.concatenate(reported)
    missing = int(np.count_nonzero(~np.isin(all_written, all_reported)))
    if not livelock and len(all_written) != pages:
        raise RingProbeError(f"the ring probe guest wrote {len(all_written)} of {pages} pages")
    return RingSweep(
        ring_entries, cpl, reaper, len(all_written), missing, tracker.ring_full_exits,
        tracker.full_harvests, tracker.largest_harvest, livelock, elapsed_s,
        all_written, all_reported, console,
    )  # fmt: skip


def _marked_pages(ram: np.ndarray, base_pfn: np.uint64) -> np.ndarray:
    """Guest frame numbers of the pages of one slot whose first word is the marker."""
    first_words = ram.view(np.uint64)[:: PAGE_SIZE // 8]
    return np.flatnonzero(first_words == np.uint64(RINGPROBE_MAGIC)).astype(np.uint64) + base_pfn


# --- the verdict, cached -------------------------------------------------------------------


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyvmm" / CACHE_NAME


def host_key(ring_entries: int) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown-boot"
    return f"{boot_id} {os.uname().release} {ring_entries} v{PROBE_VERSION}"


def decide_ring_quirk(
    ring_entries: int, setting: str = "auto", path: Path | None = None
) -> RingQuirk:
    """The quirk for this ring size: forced, cached, or probed now (and cached).

    Logged: a verdict probed just now at WARNING when lossy (else INFO); a cached or
    forced one at INFO (x-pyvmm-query-dirty-ring reports it at any time)."""
    if setting not in SETTINGS:
        raise ValueError(f"dirty ring quirk {setting!r}: expected one of {', '.join(SETTINGS)}")
    if setting != "auto":
        forced = f"--dirty-ring-quirk {setting}"
        quirk = RingQuirk(ring_entries, setting == "lossy", "forced", forced)
    else:
        quirk = _cached_or_probed(ring_entries, path or cache_path())
    fresh = quirk.source in ("probe", "probe-failed")
    level = logging.WARNING if quirk.lossy and fresh else logging.INFO
    log.log(
        level,
        "dirty ring quirk %s for %d entries: %s (%s: %s)",
        "on" if quirk.lossy else "off", ring_entries,
        "this host may lose entries when the ring fills; a full ring marks the whole "
        "guest dirty" if quirk.lossy else "a ring-full exit loses nothing here",
        quirk.source, quirk.detail,
    )  # fmt: skip
    return quirk


def _cached_or_probed(ring_entries: int, path: Path) -> RingQuirk:
    key = host_key(ring_entries)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path.with_suffix(".lock"), "a")  # noqa: SIM115
    except OSError as exc:
        log.info("dirty ring probe: no cache (%s); probing", exc)
        return _probe(ring_entries)
    with lock_file:
        # One probe at a time: VMMs started together (a migration's two ends) wait for the
        # first one's verdict instead of probing side by side on the same cores.
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        entries = _read_cache(path)
        if key in entries:
            cached = entries[key]
            return RingQuirk(ring_entries, bool(cached["lossy"]), "cache", str(cached["detail"]))
        quirk = _probe(ring_entries)
        if quirk.source == "probe":  # a failed probe is tried again next time
            entries[key] = {"lossy": quirk.lossy, "detail": quirk.detail}
            _write_cache(path, entries)
        return quirk


def _probe(ring_entries: int) -> RingQuirk:
    """Up to PROBE_RUNS sweeps, each on a fresh VM; the first that loses decides. A probe
    that cannot finish counts as lossy: resending is slow, a lost page corrupts. A ring
    size KVM refuses is the caller's error, raised as the VM itself would raise it."""
    with Kvm() as kvm:
        validate_ring_entries(kvm, ring_entries)
    for run in range(1, PROBE_RUNS + 1):
        try:
            sweep = run_sweep(ring_entries, probe_pages(ring_entries), cpl=0)
        except (RingProbeError, MachineError) as exc:  # MachineError: ImageError included
            return RingQuirk(ring_entries, True, "probe-failed", str(exc))
        log.debug("dirty ring probe run %d: %s", run, sweep)
        if sweep.lost:
            return RingQuirk(ring_entries, True, "probe", f"run {run}: {sweep.describe()}")
    return RingQuirk(
        ring_entries, False, "probe", f"{PROBE_RUNS} runs exact; last: {sweep.describe()}"
    )


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError as exc:
        log.info("dirty ring probe: cannot cache the verdict in %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
