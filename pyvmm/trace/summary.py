"""`--summary`: what the traced VMM asked of KVM, as tables printed when tracing ends.

- per ioctl: calls, failed calls, total and mean time (as the tracer saw it: from the
  syscall-entry stop to the syscall-exit stop, so it includes one stop's latency);
- per vCPU: KVM_RUN exits by reason (calls that returned 0, as a VMM counts exits),
  and the calls that returned EINTR (a kick: pause, throttle, or our own detach);
- dirty-log calls (GET/CLEAR_DIRTY_LOG, RESET_DIRTY_RINGS) per second of the trace.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvmm.trace.calls import IoctlCall
from pyvmm.trace.decode import DIRTY_LOG_CALLS

MAX_SECOND_ROWS = 120


@dataclass
class IoctlStats:
    calls: int = 0
    errors: int = 0
    total_us: float = 0.0

    @property
    def mean_us(self) -> float:
        return self.total_us / self.calls if self.calls else 0.0


@dataclass
class Summary:
    t0_ns: int
    by_name: dict[str, IoctlStats] = field(default_factory=dict)
    exits: dict[str, Counter[str]] = field(default_factory=dict)  # vCPU kind -> reason -> n
    kicks: Counter[str] = field(default_factory=Counter)  # vCPU kind -> KVM_RUN EINTR
    dirty_by_second: dict[int, Counter[str]] = field(default_factory=dict)
    last_ns: int = 0

    def add(self, call: IoctlCall) -> None:
        stats = self.by_name.get(call.name)
        if stats is None:
            stats = self.by_name[call.name] = IoctlStats()
        stats.calls += 1
        stats.total_us += call.dur_us
        if call.result < 0:
            stats.errors += 1
        self.last_ns = max(self.last_ns, call.end_ns)
        if call.name == "KVM_RUN":
            if call.result == 0:
                reasons = self.exits.get(call.kind)
                if reasons is None:
                    reasons = self.exits[call.kind] = Counter()
                reasons[call.args.get("exit", "?")] += 1
            elif call.error in ("EINTR", "EAGAIN"):
                self.kicks[call.kind] += 1
        elif call.name in DIRTY_LOG_CALLS:
            second = max(0, (call.start_ns - self.t0_ns) // 1_000_000_000)
            self.dirty_by_second.setdefault(second, Counter())[call.name] += 1

    def exit_count(self, kind: str | None = None) -> int:
        """KVM_RUN calls that returned 0 (exits), on one vCPU or all."""
        return sum(sum(c.values()) for k, c in self.exits.items() if kind in (None, k))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ioctls": {n: {"calls": s.calls, "errors": s.errors, "total_us": round(s.total_us, 1),
                           "mean_us": round(s.mean_us, 2)} for n, s in self.by_name.items()},
            "exits": {k: dict(c) for k, c in self.exits.items()},
            "kicks": dict(self.kicks),
            "dirty_log_calls_by_second": {s: dict(c) for s, c in self.dirty_by_second.items()},
        }  # fmt: skip

    def render(self, duration_s: float) -> str:
        out = []
        rows = sorted(self.by_name.items(), key=lambda kv: -kv[1].total_us)
        out.append(table(
            ["ioctl", "calls", "errors", "total ms", "mean us"],
            [[n, s.calls, s.errors, f"{s.total_us / 1000:.1f}", f"{s.mean_us:.1f}"]
             for n, s in rows],
        ))  # fmt: skip
        if self.exits or self.kicks:
            reasons = sorted({r for c in self.exits.values() for r in c})
            vcpus = sorted(set(self.exits) | set(self.kicks), key=_vcpu_order)
            out.append("\nKVM_RUN exits by reason (calls that returned 0), per vCPU")
            body = []
            for kind in vcpus:
                counts = self.exits.get(kind, Counter())
                total = sum(counts.values())
                rate = f"{total / duration_s:,.0f}" if duration_s > 0 else "-"
                body.append([kind, *(counts.get(r, 0) for r in reasons), total, rate,
                             self.kicks.get(kind, 0)])  # fmt: skip
            out.append(table(["vCPU", *reasons, "exits", "exits/s", "EINTR"], body))
        out.append("\n" + self._render_dirty(duration_s))
        return "\n".join(out)

    def _render_dirty(self, duration_s: float) -> str:
        total = sum(sum(c.values()) for c in self.dirty_by_second.values())
        if not total:
            return "dirty-log calls: none"
        names = [n for n in DIRTY_LOG_CALLS if any(n in c for c in self.dirty_by_second.values())]
        first, last = min(self.dirty_by_second), max(self.dirty_by_second)
        seconds = list(range(first, last + 1))
        lines = [f"dirty-log calls per second (second 0 = start of trace): {total} calls, "
                 f"{total / duration_s:.1f}/s over {duration_s:.1f} s"]  # fmt: skip
        if len(seconds) > MAX_SECOND_ROWS:
            lines.append(f"(seconds {first}-{last}; showing the first {MAX_SECOND_ROWS})")
            seconds = seconds[:MAX_SECOND_ROWS]
        rows = [[s, *(self.dirty_by_second.get(s, Counter()).get(n, 0) for n in names)]
                for s in seconds]  # fmt: skip
        lines.append(table(["second", *names], rows))
        return "\n".join(lines)


def _vcpu_order(kind: str) -> tuple[int, str]:
    tail = kind.rsplit(":", 1)[-1]
    return (int(tail) if tail.isdigit() else 1 << 30, kind)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        parts = [row[0].ljust(widths[0]), *rest]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
