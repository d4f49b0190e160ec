"""Dirty-rate measurement with QEMU's semantics (calc-dirty-rate / query-dirty-rate).

Three modes, as in QEMU's migration/dirtyrate.c:
- page-sampling (default): hash `sample-pages` random pages per GiB of RAM, wait
  calc-time, hash them again; the fraction that changed, times the RAM size,
  over the time, is the rate. Needs no dirty logging, so it does not slow the
  guest, but it is an estimate and cannot see a page rewritten with the same
  content (pyvmm's guests always store new values).
- dirty-bitmap: dirty logging through the bitmap API; one sync to start (and
  discard), wait, one sync to count. Only when the VM has no dirty ring.
- dirty-ring: the per-vCPU counters of dirty-ring entries, counted as QEMU counts
  them (cpu->dirty_pages, RingTracker.vcpu_dirty_pages); gives a rate per vCPU, the
  VM's rate is their sum. Only when the VM has dirty rings. One deliberate
  difference: pyvmm syncs when the window opens, so entries pushed before it are
  not counted in it (QEMU takes its first snapshot without a sync).
Rates are in MiB/s (QEMU calls them MB/s but computes MiB), with QEMU's integer
arithmetic (do_calculate_dirtyrate).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pyvmm.dirty.scan import page_hashes
from pyvmm.dirty.tracker import DirtyTracker, DirtyView
from pyvmm.machine.memory import PAGE_SIZE, GuestMemory

log = logging.getLogger(__name__)

MODES = ("page-sampling", "dirty-bitmap", "dirty-ring")
UNITS = ("second", "millisecond")
MIN_CALC_TIME_MS, MAX_CALC_TIME_MS = 50, 60_000
DEFAULT_SAMPLE_PAGES, MIN_SAMPLE_PAGES, MAX_SAMPLE_PAGES = 512, 128, 16384
MIN_SAMPLED_REGION_BYTES = 128 << 10  # QEMU: MIN_RAMBLOCK_SIZE << 10


class DirtyRateError(ValueError):
    """A request QEMU would refuse; the message is QEMU's."""


@dataclass
class DirtyRateRequest:
    calc_time: int = 1
    calc_time_unit: str = "second"
    mode: str = "page-sampling"
    sample_pages: int | None = None  # per GiB; page-sampling only

    @property
    def calc_time_ms(self) -> int:
        return self.calc_time * (1000 if self.calc_time_unit == "second" else 1)


@dataclass
class DirtyRateResult:
    status: str = "unstarted"  # unstarted | measuring | measured
    start_time_s: int = 0
    request: DirtyRateRequest = field(default_factory=DirtyRateRequest)
    dirty_rate_mib_s: int | None = None
    vcpu_rates_mib_s: list[int] | None = None


def new_pages_in_window(view: DirtyView, wait: Callable[[], object]) -> tuple[int, float]:
    """Pages first written during wait(), through an eager view: sync and forget what is
    there (with INITIALLY_SET the first sync after logging starts reports every page;
    otherwise what was dirtied before the window), wait, sync, count. Returns (pages,
    the ms wait() took)."""
    view.sync()
    with view.lock:
        for bitmap in view.bitmaps:
            bitmap.fill(0)
    t0 = time.monotonic()
    wait()
    elapsed_ms = (time.monotonic() - t0) * 1000
    view.sync()
    return view.dirty_pages(), elapsed_ms


def pages_to_mib_s(pages: int, elapsed_ms: float) -> int:
    """QEMU's do_calculate_dirtyrate (8.1+): MiB(pages x 1000) / ms, in integers."""
    ms = int(elapsed_ms)
    return (pages * 1000 * PAGE_SIZE >> 20) // ms if ms > 0 else 0


class DirtyRateMonitor:
    """One measurement at a time, in a background thread (QEMU's `get_dirtyrate`)."""

    def __init__(self, memory: GuestMemory, tracker: DirtyTracker) -> None:
        self.memory = memory
        self.tracker = tracker
        self.result = DirtyRateResult()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()

    def validate(self, req: DirtyRateRequest) -> None:
        if req.mode not in MODES:
            raise DirtyRateError(f"Parameter 'mode' does not accept value '{req.mode}'")
        if req.calc_time_unit not in UNITS:
            raise DirtyRateError(
                f"Parameter 'calc-time-unit' does not accept value '{req.calc_time_unit}'"
            )
        if not MIN_CALC_TIME_MS <= req.calc_time_ms <= MAX_CALC_TIME_MS:
            raise DirtyRateError(
                f"Calculation time is out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms]."
            )
        if req.sample_pages is not None:
            if req.mode == "dirty-ring":
                raise DirtyRateError("Either sample-pages or dirty-ring can be specified.")
            if not MIN_SAMPLE_PAGES <= req.sample_pages <= MAX_SAMPLE_PAGES:
                raise DirtyRateError(
                    f"sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}]."
                )
        ring = self.tracker.mode == "ring"
        if (req.mode == "dirty-ring") != ring and req.mode != "page-sampling":
            raise DirtyRateError(f"mode {req.mode} is not enabled, use other method instead.")

    def start(self, req: DirtyRateRequest) -> None:
        self.validate(req)
        with self._lock:
            if self.result.status == "measuring":
                raise DirtyRateError("the dirty rate is already being measured.")
            self.result = DirtyRateResult("measuring", int(time.time()), req)
            self._cancel.clear()
            self._thread = threading.Thread(target=self._run, args=(req,), name="get_dirtyrate")
            self._thread.daemon = True
            self._thread.start()

    def wait(self, timeout_s: float | None = None) -> DirtyRateResult:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.result

    def close(self) -> None:
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, req: DirtyRateRequest) -> None:
        try:
            measure = {
                "page-sampling": self._page_sampling,
                "dirty-bitmap": self._dirty_bitmap,
                "dirty-ring": self._dirty_ring,
            }[req.mode]
            rate, per_vcpu = measure(req)
            self.result.dirty_rate_mib_s = rate
            self.result.vcpu_rates_mib_s = per_vcpu
        except Exception:  # the VM may have ended under us: report 0, never kill a thread
            log.exception("dirty-rate measurement failed")
            self.result.dirty_rate_mib_s = 0
        finally:
            self.result.status = "measured"

    def _sleep(self, req: DirtyRateRequest) -> float:
        t0 = time.monotonic()
        self._cancel.wait(req.calc_time_ms / 1000)
        return (time.monotonic() - t0) * 1000

    def _page_sampling(self, req: DirtyRateRequest) -> tuple[int, None]:
        per_gib = req.sample_pages or DEFAULT_SAMPLE_PAGES
        rng = np.random.default_rng()
        samples = []
        for region in self.memory.regions:
            if region.size_bytes < MIN_SAMPLED_REGION_BYTES:
                continue
            count = max(1, (region.size_bytes * per_gib) >> 30)
            pages = np.sort(rng.choice(region.pages, size=min(count, region.pages), replace=False))
            pages = pages.astype(np.uint64)
            before = np.empty(len(pages), np.uint64)
            page_hashes(region.array, pages, before)
            samples.append((region, pages, before))
        elapsed_ms = self._sleep(req)
        dirty = sampled = 0
        sampled_mib = 0.0
        for region, pages, before in samples:
            after = np.empty(len(pages), np.uint64)
            page_hashes(region.array, pages, after)
            dirty += int(np.count_nonzero(after != before))
            sampled += len(pages)
            sampled_mib += region.size_bytes / (1 << 20)
        if not sampled or elapsed_ms <= 0:
            return 0, None
        return int(dirty * sampled_mib * 1000 / (sampled * elapsed_ms)), None

    def _dirty_bitmap(self, req: DirtyRateRequest) -> tuple[int, None]:
        # An eager view (the default): every page it is told about is re-armed at once, so
        # the next write to it is seen, even while a migration defers its own clears.
        with self.tracker.open_view("calc-dirty-rate") as view:
            pages, elapsed_ms = new_pages_in_window(
                view, lambda: self._cancel.wait(req.calc_time_ms / 1000)
            )
        return pages_to_mib_s(pages, elapsed_ms), None

    def _dirty_ring(self, req: DirtyRateRequest) -> tuple[int, list[int]]:
        # The view keeps logging (and the reaper) on for the window; the rates come from
        # the tracker's per-vCPU entry counters, not from the view's bitmaps. The first sync
        # reaps what was pushed before the window, so that it is not counted in it.
        with self.tracker.open_view("calc-dirty-rate") as view:
            view.sync()
            before = self.tracker.vcpu_dirty_pages() or []
            elapsed_ms = self._sleep(req)
            view.sync()
            after = self.tracker.vcpu_dirty_pages() or []
        rates = [pages_to_mib_s(a - b, elapsed_ms) for a, b in zip(after, before, strict=True)]
        return sum(rates), rates

    def query(self, unit: str = "second") -> dict:
        """query-dirty-rate's DirtyRateInfo."""
        res = self.result
        req = res.request
        calc_time = req.calc_time_ms if unit == "millisecond" else req.calc_time_ms // 1000
        info: dict = {
            "status": res.status,
            "start-time": res.start_time_s,
            "calc-time": calc_time,
            "calc-time-unit": unit,
            "sample-pages": (req.sample_pages or DEFAULT_SAMPLE_PAGES)
            if req.mode == "page-sampling"
            else 0,
            "mode": req.mode,
        }
        if res.status == "measured" and res.dirty_rate_mib_s is not None:
            info["dirty-rate"] = res.dirty_rate_mib_s
        if req.mode == "dirty-ring" and res.status == "measured" and res.vcpu_rates_mib_s:
            info["vcpu-dirty-rate"] = [
                {"id": i, "dirty-rate": r} for i, r in enumerate(res.vcpu_rates_mib_s)
            ]
        return info
