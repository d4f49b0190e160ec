"""A vCPU thread: KVM_RUN with the GIL released, then a short exit dispatch in Python.

Kicking (how pause, stop and throttling reach a running vCPU): set
kvm_run.immediate_exit, then send the thread KICK_SIGNAL. If the thread is
inside KVM_RUN the signal makes it return -EINTR; if it is about to enter,
immediate_exit makes KVM_RUN return at once. The loop clears the flag *before*
looking at its requests, so a request made at any moment is seen.

Work that must happen on the vCPU's own thread (a throttle sleep, a dirty-ring
harvest) is queued with `run_on_thread` and runs at the next exit.

A vCPU knows nothing of the Machine that owns it: what it needs from it (the
port bus, "end the VM", "I have finished", MMIO logging) comes in a VcpuHost.

kick/wake/request_stop/request_pause are safe from any thread, from a signal
handler that interrupted one of them on the same thread, and at every point of
Machine.close(): once the fd is closed they do nothing. So they take no lock
that their own thread might already hold: the wake-up flag is a Lock released
to set it (release never blocks), the condition's lock is reentrant, and the
kvm_run store goes through VcpuFd.set_immediate_exit.

Timeline recording (docs/timeline.md): with `timeline` set, the vCPU's track gets one
span per state (running, a throttle sleep, a dirty-limit penalty, a guest's own sleep,
paused, halted), recorded where the state changes. The port-I/O exit path records
nothing; recording off costs one attribute test in sleep_us and _park.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pyvmm.kvm import VcpuFd, abi
from pyvmm.machine.devices import PortUser
from pyvmm.timeline import Timeline

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
RFLAGS_IF = 1 << 9

# What a sleep is called on the timeline, by the function that asked for it, for callers
# that do not say (sleep_us's `kind`): the throttle engine's and the dirty limit's.
SLEEP_KINDS = {"_sleep": "throttle sleep", "_serve_penalty": "dirty-limit penalty"}


class VcpuRunState(Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"  # halted with nothing that could wake it
    STOPPED = "stopped"


@dataclass(frozen=True)
class VcpuHost:
    """What a vCPU needs from the machine it belongs to (vcpu.py never sees the Machine)."""

    io_out: Callable[[PortUser, int, bytes], None]  # port-I/O bus, write
    io_in: Callable[[PortUser, int, int], bytes]  # port-I/O bus, read: (vcpu, port, size)
    fail: Callable[[str], None]  # end the VM with an error line
    request_exit: Callable[[int, str], None]  # end the VM normally: (exit code, reason)
    vcpu_finished: Callable[[int], None]  # vCPU `index` halted for good
    log_unhandled_mmio: Callable[[int, bool], None]  # (guest-physical address, is_write)


class WakeFlag:
    """An Event for one waiter whose set() never blocks, so a signal handler may call it
    on a thread that is inside set() already (threading.Event.set takes a plain Lock and
    would deadlock there). The flag is set while the lock is free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # already set
            self._lock.release()

    def clear(self) -> None:
        self._lock.acquire(blocking=False)

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait_and_clear(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for set(); True if it was set (and is now clear again)."""
        return self._lock.acquire(timeout=max(timeout_s, 0.0))


def install_kick_handler() -> None:
    """A no-op handler, so KICK_SIGNAL interrupts KVM_RUN instead of killing the process.

    Must run in the main thread (Python's rule for signal.signal)."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class Vcpu:
    def __init__(self, index: int, fd: VcpuFd, host: VcpuHost) -> None:
        self.index = index
        self.fd = fd
        self.host = host
        self.state = VcpuRunState.CREATED
        self.thread: threading.Thread | None = None
        self.exits = 0
        self._cond = threading.Condition(threading.RLock())  # reentrant: see the docstring
        self._pause_requested = False
        self._stop_requested = False
        self._wake = WakeFlag()  # ends a sleep early
        self._pending: deque[Callable[[Vcpu], None]] = deque()
        self.on_dirty_ring_full: Callable[[Vcpu], None] | None = None
        # Timeline recording: the state whose span is open on this vCPU's track, since when.
        self.timeline: Timeline | None = None
        self._tl_lock = threading.Lock()
        self._tl_state: str | None = None
        self._tl_since_us = 0.0

    # --- control from other threads ----------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}")
        self.thread.daemon = True
        self.thread.start()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN (or not enter it) and look at its requests."""
        if not self.fd.set_immediate_exit():
            return  # closed: the thread has ended and nothing can run again
        self._wake.set()
        thread = self.thread
        if thread is not None and thread.is_alive() and thread.ident is not None:
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def request_pause(self) -> None:
        with self._cond:
            self._pause_requested = True
        self.kick()

    def wait_paused(self, timeout_s: float) -> bool:
        with self._cond:
            parked = (VcpuRunState.PAUSED, VcpuRunState.STOPPED, VcpuRunState.CREATED)
            return self._cond.wait_for(lambda: self.state in parked, timeout_s)

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    def request_stop(self) -> None:
        with self._cond:
            self._stop_requested = True
            self._cond.notify_all()
        self.kick()

    def wake(self) -> None:
        """End a sleep_us in progress early (a throttle that stops, a switchover)."""
        self._wake.set()

    def run_on_thread(self, fn: Callable[[Vcpu], None]) -> None:
        """Run fn(vcpu) on this vCPU's thread at its next exit (kicks it)."""
        self._pending.append(fn)
        self.kick()

    # --- timeline recording --------------------------------------------------------------------

    def start_timeline(self, timeline: Timeline) -> None:
        """Record this vCPU's states on `timeline` from now on (any thread)."""
        states = {VcpuRunState.RUNNING: "running", VcpuRunState.PAUSED: "paused",
                  VcpuRunState.FINISHED: "halted"}  # fmt: skip
        with self._tl_lock:
            self._tl_state = states.get(self.state)
            self._tl_since_us = timeline.now_us()
            self.timeline = timeline

    def stop_timeline(self) -> None:
        """Close the open span and stop recording (any thread)."""
        self.timeline_enter(None)
        self.timeline = None

    def timeline_enter(self, state: str | None, args: dict[str, int] | None = None) -> None:
        """End the current state's span (with `args`) and begin `state` (None: nothing)."""
        tl, thread = self.timeline, self.thread
        if tl is None or thread is None or thread.native_id is None:
            return
        with self._tl_lock:
            now = tl.now_us()
            if self._tl_state is not None:
                since = self._tl_since_us
                tl.complete(self._tl_state, since, now - since, thread.native_id, cat="vcpu",
                            args=args)  # fmt: skip
            self._tl_state, self._tl_since_us = state, now

    def close(self) -> None:
        """Release the vCPU fd once the thread has ended (Machine.close calls this)."""
        thread = self.thread
        if thread is None or not thread.is_alive():
            self.fd.close()

    # --- called on the vCPU thread -----------------------------------------------------------

    def sleep_us(self, microseconds: int, kind: str | None = None) -> None:
        """Sleep on this thread; a kick (pause, stop, migration switchover) ends it early.

        `kind` names the sleep on the timeline; by default the caller's function decides
        (SLEEP_KINDS), else "sleep"."""
        tl = self.timeline
        if tl is not None:
            caller = sys._getframe(1).f_code.co_name
            self.timeline_enter(kind or SLEEP_KINDS.get(caller, "sleep"))
        self._wake.clear()
        if not (self._pause_requested or self._stop_requested):
            self._wake.wait_and_clear(microseconds / 1e6)
        if tl is not None:
            self.timeline_enter("running", {"asked_us": microseconds})

    def _thread_main(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # never let a vCPU thread die silently
            log.exception("vCPU %d crashed", self.index)
            self.host.fail(f"vCPU {self.index}: internal error: {exc}")
        finally:
            if self.timeline is not None:
                self.timeline_enter(None)
            with self._cond:
                self.state = VcpuRunState.STOPPED
                self._cond.notify_all()

    def _park(self, state: VcpuRunState) -> None:
        """Wait (paused or finished) until resumed or stopped."""
        with self._cond:
            self.state = state
            self._cond.notify_all()
        if self.timeline is not None:
            self.timeline_enter("halted" if state is VcpuRunState.FINISHED else "paused")
        if state is VcpuRunState.FINISHED:
            # Outside our lock: the host may stop every vCPU, and two vCPUs finishing at
            # once would each hold its own lock while taking the other's.
            self.host.vcpu_finished(self.index)
        with self._cond:
            if state is VcpuRunState.FINISHED:
                self._cond.wait_for(lambda: self._stop_requested)
            else:
                self._cond.wait_for(lambda: not self._pause_requested or self._stop_requested)
            if not self._stop_requested:
                self.state = VcpuRunState.RUNNING
        if self.timeline is not None and not self._stop_requested:
            self.timeline_enter("running")

    def _loop(self) -> None:
        # The hot path: everything it touches is bound to a local first, because each
        # attribute lookup costs tens of nanoseconds and this runs once per exit.
        run, mm, run_decoded = self.fd.kvm_run, self.fd.run_mmap, self.fd.decoded_runner()
        bus_out, bus_in = self.host.io_out, self.host.io_in
        pending = self._pending
        exit_io, io_out, eintr, eagain, immediate_exit = (
            abi.KVM_EXIT_IO,
            abi.KVM_EXIT_IO_OUT,
            -errno.EINTR,
            -errno.EAGAIN,
            abi.KVM_RUN_IMMEDIATE_EXIT_OFFSET,
        )
        with self._cond:
            self.state = VcpuRunState.RUNNING
        if self.timeline is not None:
            self.timeline_enter("running")
        while True:
            mm[immediate_exit] = 0  # cleared before the requests are read
            while pending:
                pending.popleft()(self)
            if self._stop_requested:
                return
            if self._pause_requested:
                self._park(VcpuRunState.PAUSED)
                continue
            result, reason, direction, size, port, count, offset = run_decoded()
            if result == 0 and reason == exit_io:
                self.exits += 1
                if direction == io_out:
                    bus_out(self, port, mm[offset : offset + size * count])
                else:
                    for i in range(count):
                        start = offset + i * size
                        mm[start : start + size] = bus_in(self, port, size)
                continue
            if result < 0:
                if result in (eintr, eagain):
                    continue
                self.host.fail(f"vCPU {self.index}: KVM_RUN failed: errno {-result}")
                return
            self.exits += 1
            if not self._dispatch(run):
                return

    def _dispatch(self, run: abi.kvm_run) -> bool:
        """Handle one exit; False ends the thread."""
        reason = run.exit_reason
        if reason == abi.KVM_EXIT_HLT:
            regs = self.fd.get_regs()
            if regs.rflags & RFLAGS_IF:
                log.info("vCPU %d: HLT with interrupts enabled but no interrupt source", self.index)
            self._park(VcpuRunState.FINISHED)
            return False
        if reason == abi.KVM_EXIT_DIRTY_RING_FULL:
            if self.on_dirty_ring_full is None:
                self.host.fail(f"vCPU {self.index}: dirty ring full but nobody harvests it")
                return False
            self.on_dirty_ring_full(self)
            return True
        if reason == abi.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            self.host.log_unhandled_mmio(mmio.phys_addr, bool(mmio.is_write))
            if not mmio.is_write:
                for i in range(mmio.len):
                    mmio.data[i] = 0xFF
            return True
        if reason == abi.KVM_EXIT_INTR:
            return True
        if reason == abi.KVM_EXIT_SYSTEM_EVENT and run.exit.system_event.type in (
            abi.KVM_SYSTEM_EVENT_SHUTDOWN,
            abi.KVM_SYSTEM_EVENT_RESET,
        ):
            kind = "power-off" if run.exit.system_event.type == 1 else "reset (not supported)"
            self.host.request_exit(0, f"guest requested {kind} on vCPU {self.index}")
            self._park(VcpuRunState.PAUSED)
            return True
        self.host.fail(self.describe_exit(run))
        return False

    def describe_exit(self, run: abi.kvm_run) -> str:
        """A one-line description of a fatal exit, with the guest's RIP when readable."""
        try:
            rip = f" at RIP 0x{self.fd.get_regs().rip:x}"
        except OSError:
            rip = ""
        return describe_fatal_exit(run, f"vCPU {self.index}{rip}")


def describe_fatal_exit(run: abi.kvm_run, where: str) -> str:
    """The one-line error for an exit that ends the VM; `where` names the vCPU (and RIP).

    A pure function of the kvm_run page, so that its decoding is tested on any host."""
    reason = run.exit_reason
    name = abi.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return (
            f"guest triple-faulted (KVM_EXIT_SHUTDOWN) on {where}: an exception it could "
            "not handle, such as an invalid instruction with no usable IDT"
        )
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        code = run.exit.fail_entry.hardware_entry_failure_reason
        return f"KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, reason 0x{code:x}) on {where}"
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        internal = run.exit.internal
        sub = internal.suberror
        detail = f"suberror {sub}"
        if sub == abi.KVM_INTERNAL_ERROR_EMULATION:
            emu = run.exit.emulation_failure
            detail += " (emulation failure)"
            has_bytes = internal.ndata >= 2 and emu.flags & (
                abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
            )
            if has_bytes:
                insn = bytes(emu.insn_bytes[: min(emu.insn_size, 15)])
                detail += f", instruction bytes {insn.hex(' ')}"
        elif internal.ndata:
            data = " ".join(f"0x{internal.data[i]:x}" for i in range(min(internal.ndata, 16)))
            detail += f", data {data}"
        return f"KVM internal error (KVM_EXIT_INTERNAL_ERROR, {detail}) on {where}"
    if reason == abi.KVM_EXIT_SYSTEM_EVENT:
        kind = {1: "shutdown", 2: "reset", 3: "crash"}.get(run.exit.system_event.type, "?")
        return f"guest requested {kind} (KVM_EXIT_SYSTEM_EVENT) on {where}"
    return f"unexpected exit KVM_EXIT_{name} on {where}"
