"""A load client for guest/colosvc.c through the comparator, which checks every answer.

It keeps up to `depth` requests outstanding on one connection, at most `rate_per_s` a
second, each `<seq> <op>` with seq 1, 2, 3, ...; the op can change while it runs (the
demo's phases). Every answer is checked against the service's history:
- answers come back in order, each seq exactly once: no gap, no duplicate;
- `count=` answers (inc) count up by exactly one: no lost or repeated increment, and no
  answer from a state that was later rolled back;
- an answer has the shape its op gives.
Any violation is kept (`errors`); the run goes on, so a demo can show them all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

INC, TIME = "inc", "time"


@dataclass
class LoadStats:
    sent: int = 0
    answered: int = 0
    count: int | None = None  # the last count= seen
    errors: list[str] = field(default_factory=list)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    last_answer_s: float = 0.0
    verify: str | None = None  # the last verify answer


class LoadClient:
    def __init__(
        self, host: str, port: int, op: str = INC, depth: int = 4, rate_per_s: float = 0.0
    ) -> None:
        self.address = (host, port)
        self.op = op
        self.depth = depth
        self.rate_per_s = rate_per_s
        self.stats = LoadStats()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._outstanding: deque[tuple[int, str, float]] = deque()  # seq, op, sent at
        self._seq = 0
        self._threads: list[threading.Thread] = []
        self._paused = False

    def start(self) -> None:
        self._sock = socket.create_connection(self.address, timeout=10)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(None)
        for name, target in (("load-send", self._send_loop), ("load-recv", self._recv_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def set_op(self, op: str) -> None:
        self.op = op

    def pause(self, paused: bool) -> None:
        with self._lock:
            self._paused = paused
            self._lock.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Until every request sent has its answer."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._outstanding, timeout_s)

    def verify(self, timeout_s: float = 20.0) -> str:
        """Pause the load, ask the service to check its RAM, return the answer."""
        self.pause(True)
        self.wait_idle(timeout_s)
        self.stats.verify = None
        self._request("verify")
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._lock.wait_for(lambda: self.stats.verify is not None, timeout_s)
        self.pause(False)
        if self.stats.verify is None and time.monotonic() >= deadline:
            return "no answer"
        return self.stats.verify or "no answer"

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _request(self, op: str) -> None:
        assert self._sock is not None
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._outstanding.append((seq, op, time.monotonic()))
            self.stats.sent += 1
        try:
            self._sock.sendall(b"%d %s\n" % (seq, op.encode()))
        except OSError as exc:
            self._error(f"send failed: {exc}")
            self._stop.set()

    def _send_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                self._lock.wait_for(
                    lambda: (
                        self._stop.is_set()
                        or (not self._paused and len(self._outstanding) < self.depth)
                    ),
                    0.5,
                )
                if self._stop.is_set() or self._paused or len(self._outstanding) >= self.depth:
                    continue
            if self.rate_per_s:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                next_at = max(next_at + 1 / self.rate_per_s, time.monotonic() - 0.1)
            self._request(self.op)

    def _recv_loop(self) -> None:
        assert self._sock is not None
        buf = bytearray()
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except OSError:
                break
            if not data:
                if not self._stop.is_set():
                    self._error("the comparator closed the connection")
                break
            buf += data
            while (i := buf.find(b"\n")) >= 0:
                line = bytes(buf[:i]).decode("ascii", "replace")
                del buf[: i + 1]
                self._answer(line)

    def _answer(self, line: str) -> None:
        head, _, text = line.partition(" ")
        now = time.monotonic()
        with self._lock:
            if not self._outstanding:
                self._error(f"an answer nobody asked for: {line!r}")
                return
            seq, op, sent_at = self._outstanding[0]
            if not head.isdigit():
                self._error(f"an answer without a seq: {line!r}")
                return
            if int(head) < seq:
                self._error(f"duplicate: answer {line!r} where seq {seq} was due")
                return
            while self._outstanding and self._outstanding[0][0] < int(head):
                self._error(f"gap: no answer for seq {self._outstanding[0][0]}")
                self._outstanding.popleft()
            if not self._outstanding:
                self._error(f"an answer nobody asked for: {line!r}")
                return
            seq, op, sent_at = self._outstanding.popleft()
            stats = self.stats
            stats.answered += 1
            stats.latencies_ms.append((now - sent_at) * 1000)
            stats.last_answer_s = now
            self._check(op, text)
            self._lock.notify_all()

    def _check(self, op: str, text: str) -> None:
        stats = self.stats
        if op == "verify":
            stats.verify = text
            return
        if op == INC:
            word = text.split(" ")[0]
            if not word.startswith("count="):
                self._error(f"inc answered {text!r}")
                return
            count = int(word[len("count=") :])
            if stats.count is not None and count != stats.count + 1:
                self._error(f"inconsistent: count={count} after count={stats.count}")
            stats.count = count
        elif op == TIME and not text.startswith("tsc="):
            self._error(f"time answered {text!r}")

    def _error(self, message: str) -> None:
        if len(self.stats.errors) < 100:
            self.stats.errors.append(message)
