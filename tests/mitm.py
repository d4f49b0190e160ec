"""A man in the middle of a real migration, for failure injection: it relays the stream
record by record between a real source and a real destination, and a test's rule can
cut, hold or corrupt any record or reply on its way.

It reads the framing of docs/migration-stream.md: a 16-byte preamble, then 24-byte record
headers (type, arg, length, checksum) each followed by `length` bytes. CORRUPT changes a
payload byte and leaves the checksum alone, as corruption in transit would."""

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


# What a rule answers for one record: forward it, cut both connections before it,
# corrupt one byte of its payload, or wait for an event and then forward it.
FORWARD, CUT, CORRUPT = "forward", "cut", "corrupt"
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

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.listen_path))
        self._listener.listen(1)
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
        try:
            src, _ = self._listener.accept()
        except OSError:
            return
        dst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dst.connect(self.dest_path)
        self._socks = [src, dst]
        for target, args in (
            (self._relay, (src, dst, RecordType, self.on_record, self.records, True)),
            (self._relay, (dst, src, ReplyType, self.on_reply, self.replies, False)),
        ):
            thread = threading.Thread(target=target, args=args, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _relay(
        self,
        inp: socket.socket,
        out: socket.socket,
        kinds: type,
        rule: Rule,
        seen_list: list[Seen],
        preamble: bool,
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
                seen = Seen(kind, arg, length, len(seen_list), checksum)
                seen_list.append(seen)
                action = rule(seen)
                if isinstance(action, threading.Event):
                    action.wait(30)
                    action = FORWARD
                if action == CUT:
                    self.close()
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
            self.close()

    def close(self) -> None:
        self.cut.set()
        for sock in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)
