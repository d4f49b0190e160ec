"""`--output FILE.json`: the traced ioctls as a Trace Event Format timeline.

One track per thread of the target (named after the thread, and after its vCPU once it
runs one); each KVM ioctl is a complete event with its decoded arguments; exits other
than port I/O, MMIO and EINTR are instants; counters give KVM_RUN exits per second per
vCPU (100 ms windows) and the pages each dirty-log call reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from pyvmm.timeline import Timeline
from pyvmm.trace.calls import IoctlCall

WINDOW_NS = 100_000_000
COMMON_EXITS = {"IO", "MMIO"}


class TimelineRecorder:
    def __init__(self, timeline: Timeline, thread_name: Callable[[int], str]) -> None:
        self.timeline = timeline
        self.thread_name = thread_name
        self._named: dict[int, str] = {}  # tid -> kind it was named after
        self._exit_windows: dict[int, Counter[str]] = {}  # window -> vCPU -> exits

    def add(self, call: IoctlCall) -> None:
        tl = self.timeline
        tid = call.tid
        # A thread is a vCPU's track once it runs that vCPU (setup calls on a vCPU fd
        # from the main thread do not make it one).
        vcpu = call.vcpu if call.name == "KVM_RUN" else None
        if tid not in self._named or (vcpu is not None and self._named[tid] != call.kind):
            label = f"{self.thread_name(tid)} {tid}"
            if vcpu is not None:
                tl.name_track(tid, f"vCPU {vcpu} ({label})", sort_index=vcpu)
            else:
                tl.name_track(tid, label, sort_index=1000)
            self._named[tid] = call.kind if vcpu is not None else ""
        args = dict(call.args)
        args["fd"] = f"{call.fd} ({call.kind})"
        args["result"] = call.result if call.result >= 0 else f"-1 {call.error}"
        start_us = call.start_ns / 1000.0
        tl.complete(call.name, start_us, call.dur_us, tid, cat=_category(call.kind), args=args)
        if call.name == "KVM_RUN" and call.result == 0:
            window = call.end_ns // WINDOW_NS
            self._exit_windows.setdefault(window, Counter())[call.kind] += 1
            reason = call.args.get("exit")
            if reason not in COMMON_EXITS:
                tl.instant(f"exit {reason}", tid, call.end_ns / 1000.0, cat="exit",
                           args=dict(call.args))  # fmt: skip
        elif call.name in ("KVM_GET_DIRTY_LOG", "KVM_CLEAR_DIRTY_LOG") and call.result == 0:
            pages = call.args.get("dirty_pages", call.args.get("pages"))
            if pages is not None:
                series = f"{call.name[4:].lower()} slot {call.args.get('slot')}"
                tl.counter("dirty-log pages", {series: pages}, start_us)
        elif call.name == "KVM_RESET_DIRTY_RINGS" and call.result >= 0:
            tl.counter("dirty-ring entries reset", {"entries": call.result}, start_us)

    def finish(self) -> None:
        """Emit the exits/s counter: one sample per 100 ms window, zeros included."""
        if not self._exit_windows:
            return
        vcpus = sorted({k for c in self._exit_windows.values() for k in c})
        first, last = min(self._exit_windows), max(self._exit_windows)
        scale = 1e9 / WINDOW_NS
        for window in range(first, last + 2):
            counts = self._exit_windows.get(window, Counter())
            self.timeline.counter(
                "KVM_RUN exits/s",
                {kind: counts.get(kind, 0) * scale for kind in vcpus},
                window * WINDOW_NS / 1000.0,
            )


def _category(kind: str) -> str:
    if kind.startswith("kvm-vcpu"):
        return "vcpu"
    return {"/dev/kvm": "system", "kvm-vm": "vm"}.get(kind, "device")
