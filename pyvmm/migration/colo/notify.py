"""The primary's link to the comparator: one unix socket, one JSON object per line.

QEMU's colo-compare lives inside the primary's process and the two talk through notifiers
(colo_compare_register_notifier; colo_notify_compares_event, which waits until the
compare thread has handled the event). pyvmm's comparator is a process of its own, so
that it survives the primary (it is the network), and the same conversation goes over
this socket (`pyvmm run --colo-compare unix:PATH`; the comparator listens there):

    primary -> comparator                               comparator -> primary
    {"hello": "pyvmm-colo", "version": 1}
    {"checkpoint": N, "mode": M, "pvm-tx": X,   --->
     "pvm-sent": S, "pvm-rx": B}                <---    {"ack": N}
     (the primary has stopped)
    {"release": N, "svm-tx": Y}  (after the     --->    releases what checkpoint N commits
     secondary's VMSTATE_RECEIVED)              <---    {"released": N}
    {"exit": "request" | "error"}  (COLO ends)
                                                <---    {"request": "miscompare" |
                                                         "timeout", "epoch": N}

X is how many bytes the primary's guest had written to COM2 when it stopped, S how many
of them its host side had taken to send (the rest wait in its queue, part of the state,
and go out after it resumes), B how many it had received; Y the secondary's S at its
stop. With them
the comparator knows exactly which answers a checkpoint commits and where the
secondary's output starts again (docs/colo.md, "The comparator"). `epoch` is the number
of the last checkpoint the comparator saw released: a request for an older epoch came
too late (that checkpoint already covered it) and is ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

HELLO = {"hello": "pyvmm-colo", "version": 1}
MAX_LINE_BYTES = 4096
ACK_TIMEOUT_S = 10.0


class LinkError(ConnectionError):
    """The comparator did not answer, or said something this side cannot use."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message; LinkError for anything but a JSON object on one line."""
    if len(line) > MAX_LINE_BYTES:
        raise LinkError(f"COLO link: a message of {len(line)} bytes (limit {MAX_LINE_BYTES})")
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise LinkError(f"COLO link: not a JSON message: {line[:60]!r}") from None
    if not isinstance(value, dict):
        raise LinkError(f"COLO link: expected an object, got {type(value).__name__}")
    return value


class LineReader:
    """Cuts a byte stream into lines; shared by both ends of the link."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines = []
        while (i := self._buf.find(b"\n")) >= 0:
            lines.append(bytes(self._buf[:i]))
            del self._buf[: i + 1]
        if len(self._buf) > MAX_LINE_BYTES:
            raise LinkError("COLO link: a line longer than 4096 bytes")
        return lines


class CompareLink:
    """The primary's end. Requests from the comparator go to on_request(reason, epoch)
    on the link's own thread; checkpoint() and release() wait for their answers."""

    def __init__(
        self, path: str, on_request: Callable[[str, int], None],
        on_lost: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.path = path
        self._on_request = on_request
        self._on_lost = on_lost
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(ACK_TIMEOUT_S)
            sock.connect(self.path)
            sock.sendall(encode(HELLO))
        except OSError as exc:
            sock.close()
            where = f"unix:{self.path}"
            raise LinkError(f"cannot reach the COLO comparator at {where}: {exc}") from None
        sock.settimeout(None)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, name="colo-link", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        sock, lines = self._sock, LineReader()
        assert sock is not None
        why = "the comparator closed the link"
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                for line in lines.feed(data):
                    message = decode(line)
                    if "request" in message:
                        self._on_request(str(message["request"]), int(message.get("epoch", -1)))
                    else:
                        self._answers.put(message)
        except (OSError, LinkError, ValueError, TypeError) as exc:
            why = f"COLO link: {exc}"
        self._answers.put(None)
        if not self._closed:
            log.warning("COLO: %s", why)
            if self._on_lost is not None:
                self._on_lost(why)

    def _call(self, message: dict[str, Any], answer: str, number: int) -> None:
        if self._sock is None:
            raise LinkError("COLO link: not connected")
        try:
            self._sock.sendall(encode(message))
        except OSError as exc:
            raise LinkError(f"COLO link: {exc}") from None
        try:
            reply = self._answers.get(timeout=ACK_TIMEOUT_S)
        except queue.Empty:
            raise LinkError(
                f"the COLO comparator did not answer {next(iter(message))} {number} within "
                f"{ACK_TIMEOUT_S:.0f} s"
            ) from None
        if reply is None:
            raise LinkError("the COLO comparator closed the link")
        if reply.get(answer) != number:
            raise LinkError(f"COLO link: expected {answer} {number}, got {reply}")

    def checkpoint(self, number: int, mode: str, pvm_tx: int, pvm_sent: int, pvm_rx: int) -> None:
        """The primary has stopped for checkpoint `number`; returns once acknowledged."""
        message = {"checkpoint": number, "mode": mode, "pvm-tx": pvm_tx, "pvm-sent": pvm_sent,
                   "pvm-rx": pvm_rx}  # fmt: skip
        self._call(message, "ack", number)

    def release(self, number: int, svm_tx: int) -> None:
        """The secondary holds checkpoint `number`: its answers may go out."""
        self._call({"release": number, "svm-tx": svm_tx}, "released", number)

    def exit(self, reason: str) -> None:
        """COLO is over on the primary (best effort)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(encode({"exit": reason}))

    def close(self) -> None:
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)
