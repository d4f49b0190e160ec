"""The comparator's logic: what QEMU's filter-mirror, colo-compare and filter-redirector do
to network packets, done to the lines of a request/answer service. No sockets, no
threads, no clock of its own: proxy.py feeds it bytes, messages and the time, and carries
out the actions it returns. That keeps every rule below testable without sleeps.

Requests. Each client line `<seq> <op...>` gets a global id (gid) and goes to the VMs as
`<gid> <op...>\\n`: one input stream, numbered by byte position, the same for both VMs
(they see the same bytes in the same order, which is what lets a restored COM2 queue line
up with the other VM's stream, machine/uart.py). The stream is kept from the oldest
position a VM may still need: the secondary, while passive mode does not feed it, and
after a failover, gets it replayed from where it stopped; its COM2 drops what its
restored state already holds.

Answers. Each VM answers `<gid> <text>`; answers go to clients in gid order, each once,
as `<seq> <text>`. Which VM's answer goes out depends on the mode:

- primary-only (before COLO, and after the primary's failover): the primary's, at once;
- colo: an answer goes out when both VMs gave the same text (colo-compare's match); a
  different text holds it and asks the primary for a checkpoint (a miscompare), and so
  does an answer whose twin has not come within `timeout_ms` (colo-compare's
  compare_timeout, 3000 ms by default);
- passive: every answer is held until the checkpoint that produced it is committed
  (Remus's output commit); the secondary is not fed;
- secondary-only (after the secondary's failover): the survivor's, at once.

Checkpoints. The primary says when it has stopped for checkpoint n (`checkpoint`: its
output and input positions X and B) and, once the secondary holds the whole checkpoint,
`release` (with the secondary's output position Y at its stop): every primary answer that
ended by X is committed and may go out; the secondary's output before Y belongs to the
past and is dropped, and what follows Y is its output from the primary's state, which
starts in the middle of whatever line the primary was writing at X. Between the two the
secondary's output is kept raw, unread: only Y says where its past ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

PRIMARY_ONLY, COLO, PASSIVE, SECONDARY_ONLY = "primary-only", "colo", "passive", "secondary-only"
MAX_LINE_BYTES = 4096  # a longer line from a VM is cut there
MAX_LOG_BYTES = 64 << 20  # requests kept for a replay; older ones are dropped beyond this
DEFAULT_TIMEOUT_MS = 3000  # colo-compare's DEFAULT_TIME_OUT_MS


@dataclass(frozen=True)
class SendClient:
    client: int
    data: bytes


@dataclass(frozen=True)
class SendVm:
    vm: str  # "primary" | "secondary"
    data: bytes


@dataclass(frozen=True)
class RequestCheckpoint:
    reason: str  # "miscompare" | "timeout"
    epoch: int


Action = SendClient | SendVm | RequestCheckpoint


class LineParser:
    """Lines of a byte stream, each with the stream position just after it."""

    def __init__(self, position: int = 0, partial: bytes = b"") -> None:
        self.position = position  # bytes consumed so far
        self.partial = bytearray(partial)  # the current unfinished line

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        lines = []
        start = 0
        while (i := data.find(b"\n", start)) >= 0:
            self.partial += data[start:i]
            lines.append((bytes(self.partial[:MAX_LINE_BYTES]), self.position + i + 1))
            self.partial.clear()
            start = i + 1
        self.partial += data[start:]
        self.position += len(data)
        return lines


def split_id(line: bytes) -> tuple[int, bytes] | None:
    """`<number> <text>` -> (number, text); None when the line has no id."""
    head, _, text = line.partition(b" ")
    if not head.isdigit() or len(head) > 19:
        return None
    return int(head), text


@dataclass
class _Held:
    """A primary answer not yet delivered."""

    gid: int
    text: bytes
    end: int  # primary output position after it
    at_ms: float
    committed: bool = False  # a checkpoint covers it, or both VMs agreed
    miscompared: bool = False


@dataclass
class _Pending:
    number: int
    mode: str
    pvm_tx: int  # every byte the primary's guest had written
    pvm_sent: int  # the part of it on its way here (the rest follows its resume)
    pvm_rx: int


@dataclass
class CompareStats:
    requests: int = 0
    delivered: int = 0
    matched: int = 0
    miscompares: int = 0
    timeouts: int = 0
    checkpoints: int = 0  # releases seen
    replayed_bytes: int = 0
    dropped_secondary: int = 0  # secondary answers dropped (past, or already delivered)
    failovers: list[str] = field(default_factory=list)


class Comparator:
    def __init__(self, timeout_ms: float = DEFAULT_TIMEOUT_MS) -> None:
        self.timeout_ms = timeout_ms
        self.mode = PRIMARY_ONLY
        self.stats = CompareStats()
        self.epoch = 0  # the last checkpoint released
        self._requested_epoch = -1
        self._next_gid = 1
        self._clients: dict[int, tuple[int, bytes]] = {}  # gid -> (client, its seq)
        self._log = bytearray()  # the request stream from _log_base on
        self._log_base = 0
        self.total_in = 0  # request stream length
        self.svm_sent = 0  # how much of it the secondary was sent
        self._pvm = LineParser()
        self._held: deque[_Held] = deque()  # primary answers in gid order
        self._svm = LineParser()
        self._svm_raw = bytearray()  # unread secondary output (during a checkpoint)
        self._svm_raw_base = 0
        # Until COLO's first release the secondary's output is not read either: it may
        # start before the comparator hears of checkpoint 0.
        self._svm_frozen = True
        self._svm_answers: dict[int, bytes] = {}
        self._next_deliver = 1
        self._ready: dict[int, bytes] = {}  # gid -> text, decided, waiting for its turn
        self.pending: _Pending | None = None
        self._committed_upto = 0  # primary answers ending by here are committed
        self.primary_alive = True
        self.secondary_alive = True

    # --- requests ------------------------------------------------------------------------------

    def client_line(self, client: int, line: bytes) -> list[Action]:
        """A request line from a client (without its newline)."""
        line = line.rstrip(b"\r")
        parsed = split_id(line)
        if parsed is None:
            return [SendClient(client, b"error: a request is '<seq> <op> [args]'\n")]
        seq, op = parsed
        gid = self._next_gid
        self._next_gid += 1
        self._clients[gid] = (client, str(seq).encode())
        self.stats.requests += 1
        data = b"%d %s\n" % (gid, op)
        self._log += data
        self.total_in += len(data)
        actions: list[Action] = []
        if self.mode != SECONDARY_ONLY and self.primary_alive:
            actions.append(SendVm("primary", data))
        if self._feeds_secondary():
            actions.extend(self._catch_up_secondary(newest=len(data)))
        self._trim()
        return actions

    def _feeds_secondary(self) -> bool:
        return self.secondary_alive and self.mode in (COLO, SECONDARY_ONLY)

    def _catch_up_secondary(self, newest: int = 0) -> list[Action]:
        """Send the secondary what it has not had: the replay after passive mode or a
        failover, or just the newest request (`newest` bytes of it, not a replay)."""
        if self.svm_sent >= self.total_in:
            return []
        if self.svm_sent < self._log_base:  # beyond MAX_LOG_BYTES: what is left
            self.stats.failovers.append(f"replay lost {self._log_base - self.svm_sent} bytes")
            self.svm_sent = self._log_base
        data = bytes(self._log[self.svm_sent - self._log_base :])
        self.stats.replayed_bytes += len(data) - newest
        self.svm_sent = self.total_in
        return [SendVm("secondary", data)]

    def _trim(self) -> None:
        """Keep the stream from the oldest position anyone may still need: what the
        secondary was not sent, and what the last commit's state had not received."""
        keep = self.svm_sent if self.secondary_alive else self.total_in
        keep = max(keep, self.total_in - MAX_LOG_BYTES)  # a secondary that never comes
        drop = keep - self._log_base
        if drop > 0:
            del self._log[:drop]
            self._log_base = keep

    # --- answers -------------------------------------------------------------------------------

    def primary_bytes(self, data: bytes, now_ms: float) -> list[Action]:
        actions: list[Action] = []
        for line, end in self._pvm.feed(data):
            parsed = split_id(line)
            if parsed is None:
                continue
            gid, text = parsed
            if gid not in self._clients or gid < self._next_deliver:
                continue  # not a request of ours, or answered already
            if self.mode == SECONDARY_ONLY:
                continue
            committed = self.mode == PRIMARY_ONLY or end <= self._committed_upto
            held = _Held(gid, text, end, now_ms, committed=committed)
            self._held.append(held)
            if self.mode == COLO:
                actions.extend(self._compare(held))
        return actions + self._deliver()

    def secondary_bytes(self, data: bytes, now_ms: float) -> list[Action]:
        if self._svm_frozen:
            self._svm_raw += data
            return []
        return self._secondary_lines(data) + self._deliver()

    def _secondary_lines(self, data: bytes) -> list[Action]:
        actions: list[Action] = []
        for line, _ in self._svm.feed(data):
            parsed = split_id(line)
            if parsed is None:
                continue
            gid, text = parsed
            if gid < self._next_deliver or gid in self._ready or gid not in self._clients:
                self.stats.dropped_secondary += 1
                continue
            if self.mode == SECONDARY_ONLY:
                self._ready[gid] = text
            elif self.mode == COLO:
                self._svm_answers[gid] = text
                held = next((h for h in self._held if h.gid == gid), None)
                if held is not None:
                    actions.extend(self._compare(held))
            else:
                self.stats.dropped_secondary += 1
        return actions

    def _compare(self, held: _Held) -> list[Action]:
        twin = self._svm_answers.get(held.gid)
        if twin is None or held.committed or held.miscompared:
            return []
        if twin == held.text:
            held.committed = True
            self.stats.matched += 1
            return []
        held.miscompared = True
        self.stats.miscompares += 1
        return self._request("miscompare")

    def _request(self, reason: str) -> list[Action]:
        if self._requested_epoch == self.epoch or self.pending is not None:
            return []  # one request per epoch; a checkpoint in progress covers it
        self._requested_epoch = self.epoch
        return [RequestCheckpoint(reason, self.epoch)]

    def tick(self, now_ms: float) -> list[Action]:
        """colo-compare's expired-packet scan: an answer too long without its twin."""
        if self.mode != COLO or self.pending is not None:
            return []
        for held in self._held:
            if not held.committed and now_ms - held.at_ms > self.timeout_ms:
                self.stats.timeouts += 1
                return self._request("timeout")
        return []

    def _deliver(self) -> list[Action]:
        """Everything decided, in gid order, each once."""
        actions: list[Action] = []
        while self._held and self._held[0].committed:
            held = self._held.popleft()
            self._ready.setdefault(held.gid, held.text)
        while self._next_deliver in self._ready:
            gid = self._next_deliver
            text = self._ready.pop(gid)
            client, seq = self._clients.pop(gid)
            self._svm_answers.pop(gid, None)
            actions.append(SendClient(client, seq + b" " + text + b"\n"))
            self.stats.delivered += 1
            self._next_deliver += 1
        return actions

    # --- checkpoints ---------------------------------------------------------------------------

    def checkpoint(self, number: int, mode: str, pvm_tx: int, pvm_sent: int, pvm_rx: int) -> None:
        """The primary has stopped for checkpoint `number`. From here the secondary's
        output is kept unread until the release says where its past ends."""
        self.pending = _Pending(number, mode, pvm_tx, pvm_sent, pvm_rx)
        if not self._svm_frozen:
            self._svm_frozen = True
            self._svm_raw_base = self._svm.position
            self._svm_raw.clear()

    @property
    def primary_position(self) -> int:
        return self._pvm.position

    @property
    def secondary_position(self) -> int:
        return self._svm.position + (len(self._svm_raw) if self._svm_frozen else 0)

    def release(self, number: int, svm_tx: int) -> list[Action]:
        """The secondary holds checkpoint `number` (call once the primary's output was read
        up to its pvm_sent and the secondary's up to svm_tx): commit, and start a new
        epoch. Primary answers ending by pvm_tx are committed, also those still queued
        on its side: they arrive after it resumes."""
        pending = self.pending
        if pending is None or pending.number != number:
            raise ValueError(f"release of checkpoint {number}, which was not announced")
        self._commit(pending)
        self._new_epoch(pending, svm_tx, pending.mode)
        self.stats.checkpoints += 1
        actions = self._deliver()
        if self._feeds_secondary():
            actions.extend(self._catch_up_secondary())
        self._trim()
        return actions

    def _commit(self, pending: _Pending) -> None:
        self._committed_upto = max(self._committed_upto, pending.pvm_tx)
        for held in self._held:
            if held.end <= pending.pvm_tx:
                held.committed = True

    def _new_epoch(self, pending: _Pending, svm_tx: int, mode: str) -> None:
        """The secondary now runs from the primary's state: drop its past output, and
        read what follows Y as the continuation of the primary's line at pvm_sent (both
        then send the queued rest of the primary's output, and go on from there)."""
        raw = bytes(self._svm_raw)
        cut = max(0, svm_tx - self._svm_raw_base)
        partial = self._pvm.partial if self._pvm.position == pending.pvm_sent else b""
        self._svm = LineParser(svm_tx, bytes(partial))
        self._svm_frozen = False
        self._svm_raw.clear()
        self._svm_answers.clear()
        self.epoch = pending.number
        self.mode = mode
        self.pending = None
        self._requested_epoch = -1
        if cut < len(raw):
            self._secondary_lines(raw[cut:])

    # --- failover ------------------------------------------------------------------------------

    def primary_lost(self) -> None:
        """The primary is gone (its connections closed): hold everything until the
        secondary takes over (secondary_promoted)."""
        self.primary_alive = False
        self.stats.failovers.append("primary lost")

    def secondary_lost(self) -> None:
        self.secondary_alive = False
        self.stats.failovers.append("secondary lost")

    def primary_exit(self) -> list[Action]:
        """The primary left COLO (x-colo-lost-heartbeat on it: the secondary is gone):
        it serves alone, and every answer it gave goes out."""
        self.stats.failovers.append("primary serves alone")
        self.mode = PRIMARY_ONLY
        self.pending = None
        self._svm_frozen = False
        self._svm_raw.clear()
        self._svm_answers.clear()
        for held in self._held:
            held.committed = True
        self.secondary_alive = False
        self._trim()
        return self._deliver()

    def secondary_promoted(self, applied: int, applied_tx: int) -> list[Action]:
        """The secondary took over (x-colo-lost-heartbeat on it) from checkpoint
        `applied` (the last one it applied, with its output position then): answers its
        state already gave out go out, its own answers for the rest follow, and it gets
        the requests it has not seen."""
        self.stats.failovers.append(f"secondary serves from checkpoint {applied}")
        self.primary_alive = False
        pending = self.pending
        if pending is not None and pending.number == applied:
            self._commit(pending)  # its state includes what these came from
            self._new_epoch(pending, applied_tx, SECONDARY_ONLY)
        else:  # the checkpoint in progress never reached it: its own output goes on
            raw = bytes(self._svm_raw)
            self._svm_frozen = False
            self._svm_raw.clear()
            self.pending = None
            self.mode = SECONDARY_ONLY
            self._secondary_lines(raw)
        for held in self._held:  # the rest the survivor answers itself
            if held.committed:
                self._ready.setdefault(held.gid, held.text)
        self._held.clear()
        for gid, text in self._svm_answers.items():
            if gid >= self._next_deliver:
                self._ready.setdefault(gid, text)
        self._svm_answers.clear()
        actions = self._deliver()
        actions.extend(self._catch_up_secondary())
        return actions

    def held(self) -> int:
        """Answers waiting: not yet matched or committed, or waiting for an earlier one."""
        return len(self._held) + len(self._ready)
