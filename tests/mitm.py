"""A man in the middle of a real migration, for failure injection: it relays the stream
record by record between a real source and a real destination, and a test's rule can
cut, hold or corrupt any record or reply on its way.

It reads the framing of docs/migration-stream.md: a 16-byte preamble, then 24-byte record
headers (type, arg, length, checksum) each followed by `length` bytes. CORRUPT changes a
payload byte and leaves the checksum alone, as corruption in transit would.

With `multi` it relays every connection the source opens (a multifd migration's main
stream and its channels, each to its own connection to the destination); Seen.conn says
which (0: the first), and DROP cuts that connection pair alone."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.migration.stream import PREAMBLE, RECORD, RecordType, ReplyType

CHUNK = 1 << 20


@dataclass
class Seen:
    """A record (source to destination) or a reply (destination to source)."""

    kind: RecordType | ReplyType | int
    arg: int
    length: int
    index: int  # how many records of this direction came before
    checksum: int = 0
    conn: int = 0  # which connection (multi: in the order the source opened them)


# What a rule answers for one record: forward it, cut both connections before it,
# corrupt one byte of its payload, or wait for an event and then forward it; DROP cuts
# only this record's connection pair (multi).
FORWARD, CUT, CORRUPT, DROP = "forward", "cut", "corrupt", "drop"
Rule = Callable[[Seen], "str | threading.Event"]


@dataclass
class Mitm:
    listen_path: Path
    dest_path: str
    on_record: Rule = lambda seen: FORWARD
    on_reply: Rule = lambda seen: FORWARD
    records: list[Seen] = field(default_factory=list)
    replies: list[Seen] = field(default_factory=list)
    flags: int | None = None  # the preamble's, once relayed
    multi: bool = False  # relay every connection, not only the first

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.listen_path))
        self._listener.listen(16)
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.cut = threading.Event()
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def uri(self) -> str:
        return f"unix:{self.listen_path}"

    def _accept(self) -> None:
        conn = 0
        while not self.cut.is_set():
            try:
                src, _ = self._listener.accept()
            except OSError:
                return
            dst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dst.connect(self.dest_path)
            self._socks += [src, dst]
            pair = (src, dst)
            for args in (
                (src, dst, RecordType, self.on_record, self.records, True, conn, pair),
                (dst, src, ReplyType, self.on_reply, self.replies, False, conn, pair),
            ):
                thread = threading.Thread(target=self._relay, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)
            conn += 1
            if not self.multi:
                return

    def _relay(
        self,
        inp: socket.socket,
        out: socket.socket,
        kinds: type,
        rule: Rule,
        seen_list: list[Seen],
        preamble: bool,
        conn: int = 0,
        pair: tuple[socket.socket, ...] = (),
    ) -> None:
        try:
            if preamble:
                data = _read(inp, PREAMBLE.size)
                self.flags = PREAMBLE.unpack(data)[2]
                out.sendall(data)
            while not self.cut.is_set():
                head = _read(inp, RECORD.size)
                rtype, arg, length, checksum = RECORD.unpack(head)
                try:
                    kind: RecordType | ReplyType | int = kinds(rtype)
                except ValueError:
                    kind = rtype
                seen = Seen(kind, arg, length, len(seen_list), checksum, conn)
                seen_list.append(seen)
                action = rule(seen)
                if isinstance(action, threading.Event):
                    action.wait(30)
                    action = FORWARD
                if action == CUT:
                    self.close()
                    return
                if action == DROP:
                    _drop(pair)
                    return
                out.sendall(head)
                left, first = length, True
                while left:
                    data = bytearray(_read(inp, min(left, CHUNK)))
                    if action == CORRUPT and first:
                        data[len(data) // 2] ^= 0x5A
                    first = False
                    out.sendall(data)
                    left -= len(data)
        except (OSError, EOFError):
            if self.multi:
                _drop(pair)
            else:
                self.close()

    def close(self) -> None:
        self.cut.set()
        for sock in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _drop(pair: tuple[socket.socket, ...]) -> None:
    for sock in pair:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)
