"""The pre-copy source: send all RAM while the guest runs, then the pages it dirtied,
pass after pass, until what is left fits in the downtime limit; then stop the vCPUs,
send the rest and the machine state, and hand the guest over.

The loop follows QEMU's migration_thread (docs/migration.md explains each rule):
- setup: every page dirty, dirty logging on, one sync (dirty-sync-count = 1);
- each loop: if the dirty bytes are at most threshold = bandwidth x downtime-limit,
  sync to get the exact figure and, if still below, switch over; otherwise send
  dirty pages for up to 50 ms or until this 100 ms window's byte budget
  (max-bandwidth / 10) is spent, then sleep to the window's end;
- every >= 100 ms: bandwidth, mbps, pages-per-second, expected downtime;
- a sync >= 1 s after the period start computes dirty-pages-rate and lets the
  convergence policies (auto-converge, ...) evaluate the period.
A failure at any point resumes the guest if we paused it: the source VM never
suffers from a failed migration.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pyvmm.dirty.scan import bitmap_to_pages, count_set, pages_to_runs, zero_pages
from pyvmm.dirty.tracker import DirtyTracker, DirtyView
from pyvmm.machine.machine import Machine
from pyvmm.machine.memory import PAGE_SIZE
from pyvmm.machine.state import capture
from pyvmm.migration import transport
from pyvmm.migration.params import MigrationSettings
from pyvmm.migration.stats import MigrationStats, now_ms
from pyvmm.migration.stream import ACK_MAGIC, MAX_RUN_PAGES, StreamConfig, StreamWriter

log = logging.getLogger(__name__)

WINDOW_MS = 100.0  # QEMU's BUFFER_DELAY
MAX_ITERATE_MS = 50.0  # QEMU's MAX_WAIT
STEP_WORDS = 8  # bitmap words per send step: 512 pages, 2 MiB
CLEAR_CHUNK_WORDS = 4096  # matches the bitmap tracker's CLEAR chunk (1 GiB)
RATE_PERIOD_MS = 1000.0
ACK_TIMEOUT_S = 60.0


class MigrationCancelled(Exception):
    pass


@dataclass
class PeriodStats:
    """One dirty-rate period (>= 1 s between syncs), what convergence policies judge."""

    elapsed_ms: float
    dirty_pages: int  # pages newly dirtied in the period
    bytes_transferred: int  # bytes sent in the period
    sync_count: int


class ConvergencePolicy(Protocol):
    """What a throttle policy can hook into (pyvmm/migration/convergence/)."""

    def on_setup(self, source: MigrationSource) -> None: ...
    def on_sync(self, source: MigrationSource, period: PeriodStats | None) -> None: ...
    def on_end(self, source: MigrationSource) -> None: ...


class MigrationSource:
    def __init__(
        self,
        machine: Machine,
        tracker: DirtyTracker,
        settings: MigrationSettings,
        emit_event: Callable[[str, dict[str, Any] | None], None],
        set_run_state: Callable[[str], None],
        guest_running: Callable[[], bool],
        policies: list[ConvergencePolicy] | None = None,
    ) -> None:
        self.machine = machine
        self.tracker = tracker
        self.settings = settings
        self._emit = emit_event
        self._set_run_state = set_run_state
        self._guest_running = guest_running
        self.policies = policies or []
        self.stats = MigrationStats()
        self.thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._sock: socket.socket | None = None
        self._writer: StreamWriter | None = None
        self._view: DirtyView | None = None
        self._bitmaps: list[np.ndarray] = []
        self._lock = threading.RLock()  # the bitmaps: the send loop vs. forced syncs
        self._cursor = (0, 0)  # (slot, word) where the bitmap walk resumes
        self._we_paused = False
        self.in_downtime = False
        self._run_state_before: str | None = None
        self._header_sent = False
        # Rate-limit window and period bookkeeping.
        self._window_start_ms = 0.0
        self._window_start_bytes = 0
        self._window_start_pages = 0
        self._window_budget_used = 0
        self._bandwidth_bytes_per_ms = 0.0
        self._period_start_ms = 0.0
        self._period_dirty_pages = 0
        self._period_start_bytes = 0
        self._remaining_at_sync = 0

    # --- control -----------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.stats.status in ("setup", "active", "device", "cancelling")

    def start(self, uri: str) -> None:
        """Begin migrating to `uri` in a background thread (returns at once)."""
        parsed = transport.parse_uri(uri)
        self.stats = MigrationStats(status="setup", start_ms=now_ms())
        self._status("setup")
        self.thread = threading.Thread(target=self._run, args=(parsed,), name="live_migration")
        self.thread.daemon = True
        self.thread.start()

    def cancel(self) -> None:
        # Once switchover has begun the destination may already own the guest: cancelling
        # then could leave two copies running, so it is refused (quietly, like a no-op).
        if not self.active or self.stats.status == "device":
            return
        self._cancel.set()
        self._status("cancelling")
        sock = self._sock
        if sock is not None:  # unblock a send or the ACK wait
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def wait(self, timeout_s: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout_s)

    def query(self) -> dict[str, Any]:
        with self._lock:
            if self.active and self._bitmaps:
                self.stats.ram.remaining = self._dirty_pages() * PAGE_SIZE
            return self.stats.to_qmp()

    # --- the migration thread ----------------------------------------------------------------

    def _status(self, status: str) -> None:
        self.stats.status = status
        if self.settings.caps.get("events"):
            self._emit("MIGRATION", {"status": status})

    def _run(self, uri: transport.MigrationUri) -> None:
        try:
            self._setup(uri)
            self._iterate_until_converged()
            self._complete()
        except MigrationCancelled:
            self._fail("cancelled", None)
        except Exception as exc:  # any failure: the source keeps running
            message = str(exc) or type(exc).__name__
            if self._cancel.is_set():
                self._fail("cancelled", None)
            else:
                log.warning("migration failed: %s", message)
                self._fail("failed", message)
        finally:
            self._teardown()

    def _setup(self, uri: transport.MigrationUri) -> None:
        memory = self.machine.memory
        assert memory is not None
        self.stats.ram.total = memory.size_bytes
        self._sock = transport.connect(uri)
        self._writer = StreamWriter(self._sock)
        # Every page must be sent once: start from an all-dirty view; re-arm pages in KVM
        # only as they are about to be sent (get, clear, copy).
        self._view = self.tracker.open_view("migration", defer_clear=True, initially_dirty=True)
        self._bitmaps = self._view.bitmaps
        self._sync()
        config = StreamConfig(
            memory.size_bytes,
            [(r.gpa, r.size_bytes) for r in memory.regions],
            len(self.machine.vcpus),
            bool(self.machine.config.start_all_vcpus),
            self.machine.irqchip,
            self.machine.tsc_khz,
        )
        self._writer.preamble()
        self._writer.header(config)
        self._header_sent = True
        for policy in self.policies:
            policy.on_setup(self)
        now = now_ms()
        self.stats.setup_time_ms = now - self.stats.start_ms
        self._window_start_ms = self._period_start_ms = now
        self._status("active")

    def _dirty_pages(self) -> int:
        return sum(count_set(b) for b in self._bitmaps)

    def _sync(self) -> None:
        """One dirty-log sync: QEMU's migration_bitmap_sync.

        Like QEMU, the period counts only pages that became dirty in the migration bitmap
        (a page still waiting to be sent counts once), so the all-dirty setup sync adds 0."""
        assert self._view is not None
        new_pages = self._view.sync()  # also counts pages other views' syncs handed us
        pending = self._dirty_pages()
        ram = self.stats.ram
        ram.dirty_sync_count += 1
        self._period_dirty_pages += new_pages
        self._remaining_at_sync = pending * PAGE_SIZE
        now = now_ms()
        period = None
        elapsed = now - self._period_start_ms
        if ram.dirty_sync_count > 1 and elapsed > RATE_PERIOD_MS:
            transferred = self._writer.bytes_sent if self._writer else 0
            period = PeriodStats(
                elapsed, self._period_dirty_pages, transferred - self._period_start_bytes,
                ram.dirty_sync_count,
            )  # fmt: skip
            ram.dirty_pages_rate = int(self._period_dirty_pages * 1000 / elapsed)
            self._period_start_ms = now
            self._period_dirty_pages = 0
            self._period_start_bytes = transferred
        for policy in self.policies:
            policy.on_sync(self, period)
        if self._header_sent and self._writer is not None:
            self._writer.iteration(ram.dirty_sync_count)  # the destination counts passes
        if self.settings.caps.get("events"):
            self._emit("MIGRATION_PASS", {"pass": ram.dirty_sync_count})

    def _threshold_bytes(self) -> float:
        avail = self.settings["avail-switchover-bandwidth"]
        bw = avail / 1000 if avail else self._bandwidth_bytes_per_ms
        return bw * self.settings["downtime-limit"]

    def _iterate_until_converged(self) -> None:
        while True:
            self._check_cancel()
            pending = self._dirty_pages() * PAGE_SIZE
            if pending <= self._threshold_bytes():
                with self._lock:
                    self._sync()
                    pending = self._dirty_pages() * PAGE_SIZE
                if pending <= self._threshold_bytes():
                    return
            self._send_dirty(time.monotonic() + MAX_ITERATE_MS / 1000, limited=True)
            self._rate_limit()

    def force_sync(self) -> bool:
        """A sync requested from outside the loop (periodic sync, the dirty limit).

        Decided under the lock: once switchover has begun (status `device`) the stream
        carries the final pages and the state, and a sync's ITERATION record must not
        interleave with them. Returns whether it synced."""
        with self._lock:
            if self.stats.status != "active" or self.in_downtime:
                return False
            self._sync()
            return True

    # --- sending pages -----------------------------------------------------------------------

    def _send_dirty(self, deadline: float, limited: bool) -> bool:
        """Send dirty pages from the cursor on; True when the whole bitmap was walked."""
        memory = self.machine.memory
        assert memory is not None and self._writer is not None
        budget = self.settings["max-bandwidth"] / 10 if limited else 0
        slot, word = self._cursor
        walked = 0
        total_words = sum(len(b) for b in self._bitmaps)
        while walked < total_words:
            bitmap = self._bitmaps[slot]
            if word >= len(bitmap):
                slot, word = (slot + 1) % len(self._bitmaps), 0
                continue
            # Skip clean words quickly, a chunk at a time.
            window = bitmap[word : word + CLEAR_CHUNK_WORDS - word % CLEAR_CHUNK_WORDS]
            nz = np.flatnonzero(window)
            if len(nz) == 0:
                walked += len(window)
                word += len(window)
                continue
            walked += int(nz[0])
            word += int(nz[0])
            step_words = STEP_WORDS
            if budget:  # never overshoot a small budget by a whole step
                left = budget - self._window_budget_used
                step_words = max(1, min(STEP_WORDS, int(left // (64 * PAGE_SIZE))))
            with self._lock:
                # Read and clear the step under our view's lock: any view's sync (a
                # dirty-rate measurement, the dirty limit) ORs new bits into our bitmap,
                # and a bit landing between the read and the clear would be lost.
                assert self._view is not None
                with self._view.lock:
                    step = bitmap[word : word + step_words]
                    pages = bitmap_to_pages(step) + np.uint64(word * 64)
                    step.fill(0)
                self._view.before_copy(slot, word * 64, len(step) * 64)  # get, clear, copy
                sent = self._send_pages(slot, pages)
            walked += len(step)
            word += len(step)
            self._cursor = (slot, word)
            if self._cancel.is_set():
                raise MigrationCancelled
            if budget:
                self._window_budget_used += sent
                if self._window_budget_used >= budget:
                    return False
            if time.monotonic() >= deadline:
                return False
        return True

    def _send_pages(self, slot: int, pages: np.ndarray) -> int:
        """Zero runs as ZERO_RUN records, the rest as RAM_RUN records straight from RAM."""
        assert self._writer is not None and self.machine.memory is not None
        region = self.machine.memory.regions[slot]
        is_zero = np.empty(len(pages), np.uint8)
        nzero = zero_pages(region.array, pages, is_zero)
        parts: list[bytes | memoryview] = []
        starts = np.empty(len(pages), np.uint64)
        lengths = np.empty(len(pages), np.uint64)
        zero_mask = is_zero.view(bool)
        if nzero:
            zpages = pages[zero_mask]
            for i in range(pages_to_runs(zpages, starts, lengths)):
                parts.append(self._writer.zero_run(slot, int(starts[i]), int(lengths[i])))
        normal = pages[~zero_mask] if nzero else pages
        if len(normal):
            mem = memoryview(region.array)
            for i in range(pages_to_runs(normal, starts, lengths)):
                first, n = int(starts[i]), int(lengths[i])
                while n:
                    take = min(n, MAX_RUN_PAGES)
                    data = mem[first * PAGE_SIZE : (first + take) * PAGE_SIZE]
                    parts.extend(self._writer.ram_run_parts(slot, first, data))
                    first += take
                    n -= take
        before = self._writer.bytes_sent
        self._writer.send(parts)
        sent = self._writer.bytes_sent - before
        ram = self.stats.ram
        ram.duplicate += nzero
        ram.normal += len(normal)
        ram.transferred = self._writer.bytes_sent
        if self.in_downtime:
            ram.downtime_bytes += sent
        else:
            ram.precopy_bytes += sent
        return sent

    def _rate_limit(self) -> None:
        """Close the 100 ms window: update the counters, sleep out an exhausted budget."""
        assert self._writer is not None
        now = now_ms()
        budget = self.settings["max-bandwidth"] / 10
        if budget and self._window_budget_used >= budget:
            remaining = self._window_start_ms + WINDOW_MS - now
            if remaining > 0 and self._cancel.wait(remaining / 1000):
                raise MigrationCancelled
            now = now_ms()
        if now - self._window_start_ms >= WINDOW_MS:
            self._update_counters(now)

    def _update_counters(self, now: float) -> None:
        """QEMU's migration_update_counters, once per >= 100 ms window."""
        assert self._writer is not None
        elapsed = now - self._window_start_ms
        transferred = self._writer.bytes_sent - self._window_start_bytes
        ram = self.stats.ram
        self._bandwidth_bytes_per_ms = transferred / elapsed if elapsed > 0 else 0.0
        ram.mbps = transferred * 8 / (elapsed / 1000) / 1e6 if elapsed > 0 else 0.0
        sent_pages = ram.normal + ram.duplicate
        ram.pages_per_second = int((sent_pages - self._window_start_pages) * 1000 / elapsed)
        expected_bw = self._threshold_bytes() / max(self.settings["downtime-limit"], 1)
        if ram.dirty_pages_rate and transferred > 10000 and expected_bw > 0:
            self.stats.expected_downtime_ms = self._remaining_at_sync / expected_bw
        self._window_start_ms = now
        self._window_start_bytes = self._writer.bytes_sent
        self._window_start_pages = sent_pages
        # A window may end a little over budget (whole 64-page words are sent): carry it.
        budget = self.settings["max-bandwidth"] / 10
        self._window_budget_used = max(0.0, self._window_budget_used - budget) if budget else 0

    # --- switchover --------------------------------------------------------------------------

    def _complete(self) -> None:
        assert self._writer is not None and self._sock is not None
        was_running = self._guest_running()
        downtime_start = now_ms()
        self._run_state_before = "running" if was_running else "paused"
        self._set_run_state("finish-migrate")
        if was_running:
            self._we_paused = True  # before pause(): a pause failing half-way is undone too
            self.machine.pause()
        self.in_downtime = True
        self._status("device")
        with self._lock:
            self._sync()
            while not self._send_dirty(float("inf"), limited=False):
                pass
            state = capture(self.machine).to_bytes()
        self._writer.state(state)
        self._writer.complete(was_running)
        self._sock.settimeout(ACK_TIMEOUT_S)
        ack = b""
        while len(ack) < len(ACK_MAGIC):
            chunk = self._sock.recv(len(ACK_MAGIC) - len(ack))
            if not chunk:
                raise ConnectionError("the destination closed the connection before confirming")
            ack += chunk
        if ack != ACK_MAGIC:
            raise ConnectionError(f"the destination answered {ack!r} instead of confirming")
        end = now_ms()
        self.stats.end_ms = end
        self.stats.downtime_ms = end - downtime_start
        ram = self.stats.ram
        ram.transferred = self._writer.bytes_sent
        ram.remaining = 0
        active_ms = end - self.stats.start_ms - self.stats.setup_time_ms
        ram.mbps = ram.transferred * 8 / (active_ms / 1000) / 1e6 if active_ms > 0 else 0.0
        self._we_paused = False  # the guest lives on at the destination now
        self._set_run_state("postmigrate")
        self._status("completed")
        log.info(
            "migration completed: %d bytes in %.0f ms, downtime %.0f ms",
            ram.transferred, end - self.stats.start_ms, self.stats.downtime_ms,
        )  # fmt: skip

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled

    def _fail(self, status: str, message: str | None) -> None:
        self.stats.end_ms = now_ms()
        self.stats.error_desc = message
        if self._we_paused:
            self.machine.resume()
            self._we_paused = False
        if self._run_state_before is not None:  # we had entered finish-migrate
            self._set_run_state(self._run_state_before)
        self._status(status)

    def _teardown(self) -> None:
        self.in_downtime = False
        for policy in self.policies:
            try:
                policy.on_end(self)
            except Exception:
                log.exception("convergence policy cleanup failed")
        if self._view is not None:
            self._view.close()
            self._view = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
