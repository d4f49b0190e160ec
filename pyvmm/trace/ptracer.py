"""The ptrace side of `pyvmm trace`: stop a VMM's threads at each system call and report
the ioctls they issue on KVM file descriptors. The only module that imports python-ptrace.

How (docs/trace.md has the long version):
- Every thread of the target is seized with PTRACE_SEIZE (options TRACESYSGOOD,
  TRACECLONE, TRACEEXEC), so threads created later are traced from their first
  instruction, then stopped once with PTRACE_INTERRUPT and resumed with PTRACE_SYSCALL:
  from then on the kernel stops the thread as it enters and as it leaves every
  system call ("syscall-stops", marked SIGTRAP|0x80 by TRACESYSGOOD).
- At each syscall-stop PTRACE_GET_SYSCALL_INFO says whether it is the entry (number and
  arguments) or the exit (return value). An ioctl whose request has KVM's type byte
  (0xAE) on a KVM fd becomes an IoctlCall, decoded from the tracee's memory
  (/proc/PID/mem) while the thread is still stopped.
- Ctrl-C, SIGTERM or --duration interrupt every thread (PTRACE_INTERRUPT) and detach
  each one at its next stop, handing back any signal it was about to receive; the
  target goes on as if nothing happened, except that a vCPU thread inside KVM_RUN sees
  that one call return EINTR, which every VMM treats as a kick.

python-ptrace supplies the ptrace(2) binding, its request and option constants and the
system call table; the event loop is our own, because PtraceDebugger's waits poll
each traced thread in turn (sleeping up to 0.5 s between rounds) and attach with
PTRACE_ATTACH's SIGSTOP, which a clean detach from a multi-threaded VMM cannot use.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ptrace.binding import func as ptb
from ptrace.error import PtraceError
from ptrace.syscall import SYSCALL_NAMES

from pyvmm.kvm import abi
from pyvmm.trace import fds
from pyvmm.trace.calls import IoctlCall
from pyvmm.trace.decode import Decoder, request_name
from pyvmm.trace.errors import TraceError

log = logging.getLogger(__name__)

# <linux/ptrace.h> requests python-ptrace does not name.
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_EVENT_STOP = 128
SYSCALL_INFO_ENTRY, SYSCALL_INFO_EXIT = 1, 2
WALL = 0x40000000  # __WALL: wait for threads as well as processes
OPTIONS = ptb.PTRACE_O_TRACESYSGOOD | ptb.PTRACE_O_TRACECLONE | ptb.PTRACE_O_TRACEEXEC
SYSCALL_STOP = signal.SIGTRAP | 0x80
GROUP_STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
DETACH_TIMEOUT_S = 5.0


def _syscall_number(name: str) -> int:
    # python-ptrace's x86-64 table also lists the x32 numbers (512+); take the native one.
    return min(nr for nr, n in SYSCALL_NAMES.items() if n == name)


SYS_IOCTL = _syscall_number("ioctl")
SYS_MMAP = _syscall_number("mmap")
SYS_MUNMAP = _syscall_number("munmap")
SYS_CLOSE = _syscall_number("close")
SYS_DUP2 = _syscall_number("dup2")
SYS_DUP3 = _syscall_number("dup3")
SYS_CLOSE_RANGE = 436  # newer than python-ptrace's table
WATCHED = frozenset((SYS_IOCTL, SYS_MMAP, SYS_MUNMAP, SYS_CLOSE, SYS_DUP2, SYS_DUP3,
                     SYS_CLOSE_RANGE))  # fmt: skip


class SyscallInfo(ctypes.Structure):
    """struct ptrace_syscall_info; for an exit, `nr` holds rval and args[0] is_error."""

    _fields_ = [
        ("op", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("stack_pointer", ctypes.c_uint64),
        ("nr", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
        ("ret_data", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


@dataclass
class Thread:
    tid: int
    entry: tuple[int, int, int, int, int] | None = None  # (nr, a0, a1, a2, start_ns)
    call: IoctlCall | None = None


@dataclass
class TraceEnd:
    """How tracing ended: the target exited (with its code) or we detached."""

    detached: bool
    exit_code: int | None = None
    threads_seen: int = 0
    start_ns: int = 0
    end_ns: int = 0
    notes: list[str] = field(default_factory=list)


class Tracer:
    """Traces one process and all its threads; hands each KVM ioctl to `sink`."""

    def __init__(self, sink: Callable[[IoctlCall], None], decoder: Decoder | None = None) -> None:
        self.sink = sink
        self.decoder = decoder or Decoder()
        self.decoder.run_page = self._run_page
        self.pid = 0
        self.launched = False
        self.threads: dict[int, Thread] = {}
        self.threads_seen = 0
        self.kinds: dict[int, str | None] = {}  # fd -> kind, None: not KVM
        self.run_pages: dict[int, int] = {}  # vCPU fd -> kvm_run address
        self.thread_names: dict[int, str] = {}
        self.exit_code: int | None = None
        self.stop_requested = False
        self.detaching = False
        self.failure: Exception | None = None
        self._mem_fd = -1
        self._info = SyscallInfo()
        self._info_addr = ctypes.addressof(self._info)
        self._info_size = ctypes.sizeof(SyscallInfo)

    # --- starting ----------------------------------------------------------------------------

    def attach(self, pid: int) -> None:
        """Seize every thread of a running process (rescanning until no new one appears)."""
        check_attachable(pid)
        self.pid = pid
        self._open_mem()
        while True:
            new = [tid for tid in _task_ids(pid) if tid not in self.threads]
            if not new:
                break
            for tid in new:
                try:
                    self._seize(tid)
                except PtraceError as exc:
                    if exc.errno == errno.ESRCH:  # the thread ended meanwhile
                        continue
                    self._give_up()
                    raise _ptrace_error(pid, exc) from None
        if not self.threads:
            raise TraceError(f"pid {pid} ended before it could be traced")
        self._preload_fds()

    def launch(self, argv: Sequence[str]) -> int:
        """Start argv as a child held at a pipe until it is seized, so that everything from
        its exec on is traced. Returns the child's pid."""
        program = argv[0]
        if shutil.which(program) is None:
            raise TraceError(f"{program}: command not found")
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.close(ready_w)
                os.read(ready_r, 1)
                os.close(ready_r)
                os.execvp(program, list(argv))
            except BaseException as exc:
                os.write(2, f"pyvmm: error: cannot run {program}: {exc}\n".encode())
            finally:
                os._exit(127)
        os.close(ready_r)
        self.pid, self.launched = pid, True
        try:
            self._seize(pid)
            self._open_mem()
        except (PtraceError, OSError) as exc:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TraceError(f"cannot trace the command: {exc}") from None
        finally:
            os.write(ready_w, b"go")
            os.close(ready_w)
        return pid

    def _seize(self, tid: int) -> None:
        ptb.ptrace(PTRACE_SEIZE, tid, 0, OPTIONS)
        self.threads[tid] = Thread(tid)
        self.threads_seen += 1
        # The first stop (PTRACE_EVENT_STOP) is resumed with PTRACE_SYSCALL by the loop.
        ptb.ptrace(PTRACE_INTERRUPT, tid)

    def _open_mem(self) -> None:
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
        self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def _preload_fds(self) -> None:
        for fd, kind in fds.kvm_fds(self.pid).items():
            self.kinds[fd] = kind

    def _give_up(self) -> None:
        """Detach what was seized so far after a failed attach (they are not stopped yet
        or stop once more; a stop we cannot collect is ended by our exit)."""
        for tid in list(self.threads):
            with contextlib.suppress(PtraceError):
                ptb.ptrace_detach(tid)
        self.threads.clear()

    # --- the loop ----------------------------------------------------------------------------

    def request_detach(self) -> None:
        """Ask the loop to detach; safe from a signal handler. Interrupting one thread makes
        the loop's wait return, so the request is seen at once."""
        self.stop_requested = True
        for tid in list(self.threads):
            with contextlib.suppress(PtraceError):
                ptb.ptrace(PTRACE_INTERRUPT, tid)

    def run(self) -> TraceEnd:
        start_ns = time.monotonic_ns()
        deadline = 0.0
        while self.threads:
            if self.stop_requested and not self.detaching:
                self._begin_detach()
                deadline = time.monotonic() + DETACH_TIMEOUT_S
            try:
                if self.detaching:
                    tid, status = os.waitpid(-1, WALL | os.WNOHANG)
                    if tid == 0:
                        if time.monotonic() > deadline:
                            log.warning("threads %s did not stop; leaving them", list(self.threads))
                            break
                        time.sleep(0.001)
                        continue
                else:
                    tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                break
            self._handle(tid, status)
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1
        if self.failure is not None:
            raise TraceError(f"tracing stopped by an internal error, target detached: "
                             f"{self.failure!r}")  # fmt: skip
        return TraceEnd(detached=self.detaching, exit_code=self.exit_code,
                        threads_seen=self.threads_seen, start_ns=start_ns,
                        end_ns=time.monotonic_ns())  # fmt: skip

    def _begin_detach(self) -> None:
        self.detaching = True
        for tid in list(self.threads):
            try:
                ptb.ptrace(PTRACE_INTERRUPT, tid)
            except PtraceError:
                self.threads.pop(tid, None)  # gone already

    def _handle(self, tid: int, status: int) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.threads.pop(tid, None)
            if tid == self.pid:
                self.exit_code = (
                    os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
                )
            return
        if not os.WIFSTOPPED(status):
            return
        thread = self.threads.get(tid)
        if thread is None:  # a new thread reported before its parent's clone event
            thread = self.threads[tid] = Thread(tid)
            self.threads_seen += 1
        sig, event = os.WSTOPSIG(status), status >> 16
        inject = 0
        try:
            if sig == SYSCALL_STOP:
                self._syscall_stop(thread)
        except Exception as exc:  # a bug of ours must not leave the target stopped
            log.debug("tracing failed", exc_info=True)
            self.failure = self.failure or exc
            self.stop_requested = True
        if sig == SYSCALL_STOP:
            pass
        elif event == ptb.PTRACE_EVENT_CLONE:
            new = ptb.ptrace_geteventmsg(tid)
            if new not in self.threads:
                self.threads[new] = Thread(new)
                self.threads_seen += 1
        elif event == ptb.PTRACE_EVENT_EXEC:
            # A new program: its fds and mappings are new, its memory is another mm.
            self.kinds.clear()
            self.run_pages.clear()
            self._open_mem()
        elif event == PTRACE_EVENT_STOP:
            if sig in GROUP_STOP_SIGNALS and not self.detaching:
                _quiet(PTRACE_LISTEN, tid)  # stay stopped as job control asked
                return
        elif event == 0:
            inject = sig  # a signal on its way to the thread: deliver it
        if self.detaching:
            self.threads.pop(tid, None)
            _quiet(ptb.PTRACE_DETACH, tid, 0, inject)
            return
        try:
            ptb.ptrace_syscall(tid, inject)
        except PtraceError:
            self.threads.pop(tid, None)  # killed while stopped

    def _syscall_stop(self, thread: Thread) -> None:
        info = self._info
        try:
            ptb.ptrace(PTRACE_GET_SYSCALL_INFO, thread.tid, self._info_size, self._info_addr)
        except PtraceError:
            return
        if info.op == SYSCALL_INFO_ENTRY:
            nr = info.nr
            if nr in WATCHED:
                args = info.args
                thread.entry = (nr, args[0], args[1], args[2], time.monotonic_ns())
                if nr == SYS_MMAP:
                    thread.entry = (nr, args[4], args[5], 0, 0)
            else:
                thread.entry = None
        elif info.op == SYSCALL_INFO_EXIT and thread.entry is not None:
            now = time.monotonic_ns()
            entry, thread.entry = thread.entry, None
            rval = ctypes.c_int64(info.nr).value
            self._syscall_exit(thread, entry, rval, now)

    def _syscall_exit(
        self, thread: Thread, entry: tuple[int, int, int, int, int], rval: int, now: int
    ) -> None:
        nr, a0, a1, a2, start_ns = entry
        if nr == SYS_IOCTL:
            request = a1 & 0xFFFFFFFF  # the kernel's cmd is an unsigned int
            if (request >> 8) & 0xFF != abi.KVMIO:
                return
            fd = a0 & 0xFFFFFFFF
            kind = self._kind(fd)
            if kind is None:
                return
            call = IoctlCall(self.pid, thread.tid, fd, kind, request, request_name(request), a2,
                             start_ns, now, rval)  # fmt: skip
            if call.name in ("KVM_CREATE_VM", "KVM_CREATE_VCPU") and rval >= 0:
                self.kinds.pop(rval, None)  # a new KVM object under a reused number
            self.decoder.decode(call, self._read)
            self.sink(call)
        elif rval < 0:
            return
        elif nr == SYS_MMAP:
            fd, offset = a0 & 0xFFFFFFFF, a1
            if offset == 0 and fds.vcpu_index(self._kind(fd) or "") is not None:
                self.run_pages[fd] = rval
        elif nr == SYS_MUNMAP:
            for fd, addr in list(self.run_pages.items()):
                if addr == a0:
                    del self.run_pages[fd]
        elif nr == SYS_CLOSE:
            self.kinds.pop(a0, None)
            self.run_pages.pop(a0, None)
        elif nr in (SYS_DUP2, SYS_DUP3):
            self.kinds.pop(a1, None)
        elif nr == SYS_CLOSE_RANGE:
            for fd in [fd for fd in self.kinds if a0 <= fd <= a1]:
                del self.kinds[fd]

    # --- the tracee's fds and memory ---------------------------------------------------------

    def _kind(self, fd: int) -> str | None:
        if fd in self.kinds:
            return self.kinds[fd]
        kind = self.kinds[fd] = fds.fd_kind(self.pid, fd)
        return kind

    def _read(self, address: int, size: int) -> bytes:
        data = os.pread(self._mem_fd, size, address)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read at 0x{address:x}")
        return data

    def _run_page(self, call: IoctlCall) -> int | None:
        page = self.run_pages.get(call.fd)
        if page is None:
            page = fds.run_page_address(self.pid, call.kind)
            if page is not None:
                self.run_pages[call.fd] = page
        return page

    def thread_name(self, tid: int) -> str:
        if tid not in self.thread_names:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    self.thread_names[tid] = f.read().strip()
            except OSError:
                self.thread_names[tid] = str(tid)
        return self.thread_names[tid]

    def process_name(self) -> str:
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return str(self.pid)


def _quiet(request: int, tid: int, addr: int = 0, data: int = 0) -> None:
    with contextlib.suppress(PtraceError):
        ptb.ptrace(request, tid, addr, data)


def _task_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


def _tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def check_attachable(pid: int) -> None:
    """One-line errors for the ways a pid can be wrong, before touching it with ptrace."""
    if pid == os.getpid():
        raise TraceError("pyvmm trace cannot trace itself")
    if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
        raise TraceError(f"no process with pid {pid}")
    try:
        found = fds.kvm_fds(pid)
    except PermissionError:
        raise TraceError(
            f"pid {pid}: permission denied reading /proc/{pid}/fd "
            "(trace your own processes, or run as root)"
        ) from None
    except FileNotFoundError:
        raise TraceError(f"no process with pid {pid}") from None
    if not found:
        raise TraceError(
            f"pid {pid} has no KVM file descriptors: not a VMM (pyvmm or qemu-system-x86_64), "
            "or it has not opened /dev/kvm yet"
        )
    tracer = _tracer_pid(pid)
    if tracer:
        raise TraceError(f"pid {pid} is already traced by pid {tracer} (a debugger or strace?)")


def _ptrace_error(pid: int, exc: PtraceError) -> TraceError:
    if exc.errno == errno.EPERM:
        return TraceError(
            f"cannot trace pid {pid}: operation not permitted (ptrace needs the same user and "
            "kernel.yama.ptrace_scope <= 1, or root; or another tracer holds it)"
        )
    return TraceError(f"cannot trace pid {pid}: {os.strerror(exc.errno or 0)}")
