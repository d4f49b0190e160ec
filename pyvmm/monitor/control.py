"""The control loop: one thread owns every change of the VM's state.

QEMU serialises monitor commands, migration state changes and signal handling under
one big lock (the BQL). Firecracker's vmm runs one event loop that owns all state and
drives the vCPUs with events they acknowledge. pyvmm does the latter: the process's
main thread runs `ControlLoop.run()`, and every other thread (a QMP client, the
migration thread, the incoming-migration thread) hands it work with `call()` and waits
for the answer. So two state changes never interleave: a `stop` cannot land in the
middle of a migration's commit, and a second `migrate` sees the first one's status.

Signals: a handler may run at any bytecode of the main thread, including inside
another handler or while that thread holds a lock, so it must take no lock at all.
pyvmm's handler only writes the signal's number into a pipe (os.write takes no Python
lock); the loop reads the pipe and acts on the signal like on any other event. Any
number of SIGTERMs in any rhythm therefore end the process once, cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.05  # how often the loop looks at `until` when nothing wakes it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class LoopClosed(RuntimeError):
    """The loop has stopped taking work (the process is shutting down)."""


@dataclass
class _Work:
    fn: Callable[[], Any]
    wait: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class ControlLoop:
    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._queue: deque[_Work] = deque()
        self._lock = threading.Lock()  # the queue vs. close(); never taken by a signal handler
        self._owner: int | None = None  # the thread running the loop
        self._closed = False
        self._stopping = False
        self.on_signal: Callable[[int], None] | None = None
        self._previous_handlers: dict[int, Any] = {}
        # What close() leaves the signals to: None puts back the handlers found at install
        # time; a process that is about to exit sets SIG_IGN, because Python resets its
        # handlers to SIG_DFL while it finalises and a late SIGTERM would kill it (143).
        self.after_close: Any = None

    # --- signals ------------------------------------------------------------------------------

    def install_signal_handlers(self, signums: tuple[int, ...] = STOP_SIGNALS) -> None:
        """Route these signals into the loop (main thread only, Python's rule)."""
        for signum in signums:
            previous = signal.signal(signum, self._on_signal)
            self._previous_handlers.setdefault(signum, previous)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Reentrant by construction: no lock, no allocation beyond a 1-byte bytes object.
        w = self._w
        if w >= 0:
            with contextlib.suppress(OSError):  # full pipe: a wake-up is pending anyway
                os.write(w, bytes((signum,)))

    # --- handing work to the loop -------------------------------------------------------------

    @property
    def on_loop_thread(self) -> bool:
        return self._owner == threading.get_ident()

    def call(self, fn: Callable[[], T], timeout_s: float | None = None) -> T:
        """Run fn on the loop's thread and return its result (or raise its exception).

        Called on the loop's own thread (a command that issues another), fn runs at once."""
        if self.on_loop_thread:
            return fn()
        work = self._enqueue(fn, wait=True)
        if not work.done.wait(timeout_s):
            raise TimeoutError(f"the control loop did not answer within {timeout_s} s")
        if work.error is not None:
            raise work.error
        return work.result  # type: ignore[no-any-return]

    def post(self, fn: Callable[[], Any]) -> None:
        """Queue fn without waiting; its failure is logged."""
        self._enqueue(fn, wait=False)

    def _enqueue(self, fn: Callable[[], Any], wait: bool) -> _Work:
        work = _Work(fn, wait)
        with self._lock:
            if self._closed:
                raise LoopClosed("the VM is shutting down")
            self._queue.append(work)
        self._wake()
        return work

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, b"\0")

    # --- the loop -----------------------------------------------------------------------------

    def run(self, until: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Serve work and signals until `until()` holds (True) or timeout_s passes (False).

        `stop()` also ends it (returning until())."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._owner = threading.get_ident()
        self._stopping = False
        try:
            while True:
                self._serve()
                if until() or self._stopping:
                    return until()
                wait_s = POLL_S
                if deadline is not None:
                    wait_s = min(wait_s, deadline - time.monotonic())
                    if wait_s <= 0:
                        return False
                with contextlib.suppress(InterruptedError):
                    select.select([self._r], [], [], wait_s)
        finally:
            self._owner = None

    def stop(self) -> None:
        """Make run() return after the work in hand (callable from any thread)."""
        self._stopping = True
        self._wake()

    def _serve(self) -> None:
        for signum in self._read_signals():
            handler = self.on_signal
            if handler is not None:
                try:
                    handler(signum)
                except Exception:
                    log.exception("signal %d handler failed", signum)
        while True:
            with self._lock:
                if not self._queue:
                    return
                work = self._queue.popleft()
            self._run(work)

    def _read_signals(self) -> list[int]:
        signums: list[int] = []
        while True:
            try:
                data = os.read(self._r, 4096)
            except (BlockingIOError, InterruptedError):
                return signums
            if not data:
                return signums
            signums.extend(b for b in data if b and b not in signums)

    @staticmethod
    def _run(work: _Work) -> None:
        try:
            work.result = work.fn()
        except BaseException as exc:  # handed back to the caller, who decides
            work.error = exc
            if not work.wait:
                log.error("control loop work failed: %s", exc, exc_info=exc)
        finally:
            work.done.set()

    def close(self) -> None:
        """Refuse new work, fail what is queued, release the pipe, hand the signals back
        (see after_close). A signal that comes meanwhile is dropped (the handler sees the
        closed pipe), so a late SIGTERM cannot hurt."""
        with self._lock:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
        for work in pending:
            work.error = LoopClosed("the VM is shutting down")
            work.done.set()
        w, self._w = self._w, -1
        if w >= 0:
            os.close(w)
        r, self._r = self._r, -1
        if r >= 0:
            os.close(r)
        if self._previous_handlers and threading.current_thread() is threading.main_thread():
            if self.after_close is not None:
                _quiet_late_signals()
            for signum, previous in self._previous_handlers.items():
                signal.signal(signum, previous if self.after_close is None else self.after_close)
            self._previous_handlers = {}


def _quiet_late_signals() -> None:
    """A signal that arrives while close() swaps its handler away can be left tripped in
    CPython with no Python handler to run; CPython then prints "Exception ignored ...
    OSError: Signal N ignored due to race condition" and a traceback (Modules/
    signalmodule.c, _PyErr_CheckSignalsTstate, bpo-43406). Ignoring it is what after_close
    asks for, so that one report is dropped; every other unraisable error still prints."""
    previous = sys.unraisablehook

    def hook(report: Any) -> None:
        exc = report.exc_value
        if isinstance(exc, OSError) and "ignored due to race condition" in str(exc):
            return
        previous(report)

    sys.unraisablehook = hook
