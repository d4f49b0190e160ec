"""The QMP server: QEMU's monitor protocol, byte for byte where clients can tell.

QMP in one screen (docs/qmp.md has the long version):

1. The client connects; the server sends a greeting,
   ``{"QMP": {"version": {...}, "capabilities": []}}``.
2. The client sends ``{"execute": "qmp_capabilities"}``. Until then every
   other command fails with CommandNotFound, and no events are sent.
3. The client sends requests ``{"execute": NAME, "arguments": {...}, "id": ANY}``
   and gets, in order, one reply per request: ``{"return": VALUE, "id": ANY}``
   or ``{"error": {"class": CLASS, "desc": TEXT}, "id": ANY}``.
4. At any time the server may send events ``{"event": NAME, "data": {...},
   "timestamp": {"seconds": S, "microseconds": US}}``.

The module has three layers, each usable without the ones below it:

- `JsonStreamer` cuts a byte stream into JSON values, like QEMU's
  qobject/json-streamer.c (count brackets, then parse what they enclose).
- `QmpDispatcher` (the command table) and `QmpSession` (one client's
  state) turn bytes into reply dicts. No sockets: tests feed them bytes.
- `QmpServer` puts sessions on unix or TCP sockets: per client, a reader
  thread that runs its commands and a writer thread that drains its
  outgoing queue. State-changing commands can be handed to an executor
  (the VMM's control thread); queries run on the client's thread.

The machine layer registers its commands with `QmpServer.register`; this
module imports nothing else from pyvmm but the leaf unixsocket.py.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyvmm
from pyvmm.monitor.schema import ArgSpec, ErrorClass, QmpError, check_arguments
from pyvmm.unixsocket import UNIX_PATH_MAX_BYTES, listen_unix

__all__ = [
    "Address",
    "ArgSpec",
    "ErrorClass",
    "JsonParseError",
    "JsonStreamer",
    "QmpDispatcher",
    "QmpError",
    "QmpInputTooLarge",
    "QmpServer",
    "QmpSession",
    "make_event",
    "parse_address",
]

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 16 * 1024 * 1024  # one request may not be larger (QEMU allows 64 MiB)
MAX_NESTING = 1024  # QEMU's json-streamer limit
SEND_TIMEOUT_S = 1.0  # a client that cannot take a message this fast is dropped
MAX_QUEUED_BYTES = 16 * 1024 * 1024  # output waiting for one client; more drops it
RECV_CHUNK_BYTES = 65536


DEFAULT_PACKAGE = f"pyvmm-{getattr(pyvmm, '__version__', 'unknown')}"


# ---------------------------------------------------------------------------
# Addresses: unix:PATH or tcp:HOST:PORT
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A parsed QMP address. kind is "unix" (path set) or "tcp" (host and port set)."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets and for TCP on 127.0.0.0/8, ::1 or localhost."""
        if self.kind == "unix":
            return True
        if self.host.lower() == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False  # another host name: we cannot know where it resolves
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback


def parse_address(text: str) -> Address:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (IPv6 hosts in brackets: ``tcp:[::1]:4444``)."""
    form = "expected unix:PATH or tcp:HOST:PORT"
    kind, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"bad QMP address {text!r}: {form}")
    if kind == "unix":
        if not rest:
            raise ValueError(f"bad QMP address {text!r}: the socket path is empty")
        if len(os.fsencode(rest)) > UNIX_PATH_MAX_BYTES:
            raise ValueError(
                f"bad QMP address {text!r}: unix socket paths are limited to "
                f"{UNIX_PATH_MAX_BYTES} bytes; use a shorter path"
            )
        return Address("unix", path=rest)
    if kind == "tcp":
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad QMP address {text!r}: {form}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"bad QMP address {text!r}: write IPv6 hosts in brackets, [::1]")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"bad QMP address {text!r}: port must be a number from 0 to 65535")
        return Address("tcp", host=host, port=int(port_text))
    raise ValueError(f"bad QMP address {text!r}: {form}")


# ---------------------------------------------------------------------------
# JSON framing: bytes -> JSON values
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JsonParseError:
    """One piece of input that is not JSON; answered with a GenericError without "id"."""

    desc: str


class QmpInputTooLarge(Exception):
    """A client sent more than MAX_MESSAGE_CHARS without completing a JSON value."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")  # NaN, Infinity: not JSON, not QMP


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_reject_duplicates)

# Runs of characters the scanner need not look at one by one.
_PLAIN_IN_STRING = re.compile(r"[^\\\"'\x00-\x1f]+")
_PLAIN_IN_VALUE = re.compile(r"[^{}\[\]\"'\x00-\x1f\ufffd]+")


def _single_to_double_quotes(text: str) -> str:
    """Rewrite QEMU's 'single-quoted' strings and \\' escapes as standard JSON."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if not quote:
            if ch in "\"'":
                quote = ch
                ch = '"'
        elif ch == "\\":
            nxt = text[i + 1 : i + 2]
            out.append("'" if nxt == "'" else ch + nxt)
            i += 2
            continue
        elif ch == quote:
            quote = ""
            ch = '"'
        elif ch == '"':  # a double quote inside a single-quoted string
            ch = '\\"'
        out.append(ch)
        i += 1
    return "".join(out)


def parse_json_text(text: str) -> Any:
    """Parse one complete JSON text as QEMU would; raise ValueError with QEMU-like words."""
    if "'" in text:
        text = _single_to_double_quotes(text)
    try:
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg[:1].lower() + exc.msg[1:]) from None
    except RecursionError:
        raise ValueError("nesting too deep") from None
    if text[end:].strip():
        raise ValueError(f"invalid token '{text}'")
    return value


class JsonStreamer:
    """Cut a stream of bytes into JSON values, the way QEMU's json-streamer does.

    A value ends when its brackets balance (``{...}``, ``[...]``), at the
    closing quote of a top-level string, or at the whitespace or bracket
    after a top-level number or keyword. So several values in one read,
    and one value split over many reads, both work, newline or not. Each
    complete value is parsed with json's raw_decode; a bad one yields a
    `JsonParseError` and the stream carries on after it.

    An ASCII control character other than tab, CR and LF (or a byte that
    is not UTF-8, such as 0xFF) is a lexical error: it drops whatever
    partial value came before it. Clients use this to resynchronise
    (QMP spec, "Forcing the JSON parser into known-good state").
    """

    def __init__(self, max_message_chars: int | None = None) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max = MAX_MESSAGE_CHARS if max_message_chars is None else max_message_chars
        self._buf = ""  # text received and not yet handed out
        self._pos = 0  # _buf[:_pos] has been scanned
        self._start = -1  # where the current value starts in _buf, -1 between values
        self._depth = 0  # open brackets
        self._too_deep = False  # the current value went past MAX_NESTING
        self._bare = False  # the current value is a top-level number or keyword
        self._quote = ""  # the open quote character while inside a string
        self._escape = False  # the previous character was a backslash inside a string

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return the values they complete (JsonParseError for bad ones)."""
        self._buf += self._utf8.decode(data)
        out: list[Any] = []
        while self._scan(out):
            pass
        # Forget what has been handed out.
        keep = self._start if self._start >= 0 else self._pos
        self._buf = self._buf[keep:]
        self._pos -= keep
        if self._start >= 0:
            self._start = 0
            if len(self._buf) > self._max:
                raise QmpInputTooLarge(f"a request longer than {self._max} characters did not end")
        return out

    def _scan(self, out: list[Any]) -> bool:
        """Scan on from _pos; append one value to out and return True, or False at the end."""
        buf, i, n = self._buf, self._pos, len(self._buf)
        while i < n:
            if self._quote and not self._escape:
                m = _PLAIN_IN_STRING.match(buf, i)
                i = m.end() if m else i
            elif self._depth > 0 and not self._quote:
                m = _PLAIN_IN_VALUE.match(buf, i)
                i = m.end() if m else i
            if i >= n:
                break
            ch = buf[i]
            if self._quote:  # inside a string
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == self._quote:
                    self._quote = ""
                    if self._depth == 0:
                        return self._emit(out, i + 1)  # a top-level string
                elif ch < " ":
                    return self._stray(out, i)
            elif self._bare and (ch.isspace() or ch in "{}[]\"'"):
                return self._emit(out, i)  # a top-level number or keyword ended
            elif ch in " \t\r\n":
                pass
            elif ch < " " or ch == "\ufffd":
                return self._stray(out, i)
            else:
                if self._start < 0:
                    self._start = i
                    self._bare = ch not in "{}[]\"'"
                if ch in "{[":
                    self._depth += 1
                    self._too_deep = self._too_deep or self._depth > MAX_NESTING
                elif ch in "}]":
                    self._depth -= 1
                    if self._depth <= 0:
                        return self._emit(out, i + 1)
                elif ch in "\"'":
                    self._quote = ch
            i += 1
        self._pos = i
        return False

    def _reset(self, pos: int) -> None:
        self._pos = pos
        self._start = -1
        self._depth = 0
        self._too_deep = self._bare = self._escape = False
        self._quote = ""

    def _emit(self, out: list[Any], end: int) -> bool:
        text, too_deep = self._buf[self._start : end], self._too_deep
        self._reset(end)
        if too_deep:
            out.append(JsonParseError("JSON nesting depth limit exceeded"))
            return True
        try:
            out.append(parse_json_text(text))
        except ValueError as exc:
            out.append(JsonParseError(f"JSON parse error, {exc}"))
        return True

    def _stray(self, out: list[Any], i: int) -> bool:
        ch = self._buf[i]
        self._reset(i + 1)
        out.append(JsonParseError(f"JSON parse error, stray '{ch}'"))
        return True


# ---------------------------------------------------------------------------
# Dispatch: requests -> replies, no sockets
# ---------------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], Any]
# Runs a state-changing command's handler on the VMM's control thread and returns its
# value (or raises its exception) in the calling thread: executor(lambda: handler(args)).
Executor = Callable[[Callable[[], Any]], Any]

# qmp_capabilities' one argument. QEMU's QMPCapability enum has one member.
_KNOWN_CAPABILITIES = ("oob",)
_OFFERED_CAPABILITIES: tuple[str, ...] = ()  # no out-of-band execution in pyvmm
_CAPS_ARGS = {"enable": ArgSpec("list", optional=True)}
NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    args: Mapping[str, ArgSpec]
    allow_extra: bool
    query: bool = False  # only reads state: runs on the client's thread, never the executor


def make_event(name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An event message. Like QEMU, an event without data has no "data" member."""
    now_us = time.time_ns() // 1000
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = dict(data)
    msg["timestamp"] = {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000}
    return msg


def error_reply(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": str(error_class), "desc": desc}}


def encode(msg: Mapping[str, Any]) -> bytes:
    """One message on the wire: ASCII JSON ending in CRLF, as QEMU sends it."""
    return json.dumps(msg, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"


class QmpDispatcher:
    """The command table shared by all sessions, and the server's identity."""

    def __init__(
        self,
        version: tuple[int, int, int] = (9, 2, 0),
        package: str = DEFAULT_PACKAGE,
        executor: Executor | None = None,
    ) -> None:
        major, minor, micro = version
        self.executor = executor
        self.version_info = {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": package,
        }
        self._lock = threading.Lock()
        self._commands: dict[str, Command] = {}
        self.register("query-version", lambda _args: self.version_info, query=True)
        self.register(
            "query-commands", lambda _args: [{"name": n} for n in self.command_names()], query=True
        )

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        args: Mapping[str, ArgSpec] | None = None,
        allow_extra: bool = False,
        query: bool = False,
    ) -> None:
        """Add a command. The handler gets the checked arguments; see QmpServer.register."""
        if not name or not isinstance(name, str):
            raise ValueError(f"bad QMP command name {name!r}")
        with self._lock:
            if name in self._commands or name == "qmp_capabilities":
                raise ValueError(f"QMP command {name!r} is already registered")
            self._commands[name] = Command(name, handler, dict(args or {}), allow_extra, query)

    def lookup(self, name: str) -> Command | None:
        with self._lock:
            return self._commands.get(name)

    def command_names(self) -> list[str]:
        with self._lock:
            return sorted(["qmp_capabilities", *self._commands])

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self.version_info, "capabilities": list(_OFFERED_CAPABILITIES)}}

    def session(self) -> QmpSession:
        return QmpSession(self)


class QmpSession:
    """One client's protocol state: its input stream and whether it has negotiated.

    `feed` takes raw bytes and yields reply dicts, one per request, as each
    request is executed; nothing here touches a socket.
    """

    def __init__(self, dispatcher: QmpDispatcher) -> None:
        self.dispatcher = dispatcher
        self.negotiated = False
        self.running_on: threading.Thread | None = None  # where this client's handler runs now
        self._streamer = JsonStreamer()

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Yield the replies to the requests that `data` completes.

        Raises QmpInputTooLarge when a request grows past the size limit.
        """
        for item in self._streamer.feed(data):
            if isinstance(item, JsonParseError):
                yield error_reply(ErrorClass.GENERIC_ERROR, item.desc)
            else:
                yield self.execute(item)

    def execute(self, request: Any) -> dict[str, Any]:
        """Run one parsed request and return its reply (with the request's "id")."""
        if not isinstance(request, dict):
            return error_reply(ErrorClass.GENERIC_ERROR, "QMP input must be a JSON object")
        try:
            name, args = _check_request(request)
            reply = {"return": self._run(name, args)}
        except QmpError as exc:
            reply = {"error": exc.to_json()}
            if not self.negotiated and exc.error_class == ErrorClass.COMMAND_NOT_FOUND:
                reply["error"]["desc"] = NEGOTIATION_DESC  # as QEMU's monitor_qmp_dispatch()
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    def _run(self, name: str, args: dict[str, Any]) -> Any:
        if name == "qmp_capabilities":
            return self._qmp_capabilities(check_arguments(_CAPS_ARGS, args))
        cmd = self.dispatcher.lookup(name) if self.negotiated else None
        if cmd is None:
            raise QmpError(ErrorClass.COMMAND_NOT_FOUND, f"The command {name} has not been found")
        args = check_arguments(cmd.args, args, allow_extra=cmd.allow_extra)
        executor = self.dispatcher.executor
        try:
            if cmd.query or executor is None:
                ret = self._call(cmd.handler, args)
            else:
                ret = executor(lambda: self._call(cmd.handler, args))
        except QmpError:
            raise
        except Exception as exc:
            logger.exception("QMP command %s failed with an unexpected exception", name)
            raise QmpError(ErrorClass.GENERIC_ERROR, str(exc) or type(exc).__name__) from exc
        if ret is None:
            return {}
        try:
            json.dumps(ret, allow_nan=False)
        except (TypeError, ValueError) as exc:
            logger.error("QMP command %s returned a value that is not JSON: %r", name, ret)
            raise QmpError(
                ErrorClass.GENERIC_ERROR, f"command {name} returned a value that is not JSON: {exc}"
            ) from exc
        return ret

    def _call(self, handler: Handler, args: dict[str, Any]) -> Any:
        # Noted so that QmpServer.close(), called by a handler, does not wait for this client.
        self.running_on = threading.current_thread()
        try:
            return handler(args)
        finally:
            self.running_on = None

    def _qmp_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.negotiated:
            raise QmpError(
                ErrorClass.COMMAND_NOT_FOUND,
                "Capabilities negotiation is already complete, command ignored",
            )
        unavailable = []
        for i, cap in enumerate(args.get("enable", [])):
            if not isinstance(cap, str):
                raise QmpError(
                    ErrorClass.GENERIC_ERROR,
                    f"Invalid parameter type for 'enable[{i}]', expected: string",
                )
            if cap not in _KNOWN_CAPABILITIES:
                raise QmpError(
                    ErrorClass.GENERIC_ERROR,
                    f"Parameter 'enable[{i}]' does not accept value '{cap}'",
                )
            if cap not in _OFFERED_CAPABILITIES:
                unavailable.append(cap)
        if unavailable:
            raise QmpError(
                ErrorClass.GENERIC_ERROR, f"Capability {', '.join(unavailable)} not available"
            )
        self.negotiated = True
        return {}


def _check_request(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The envelope checks of QEMU's qmp_dispatch_check_obj(), in its order."""
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QmpError(
                    ErrorClass.GENERIC_ERROR, "QMP input member 'execute' must be a string"
                )
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QmpError(
                    ErrorClass.GENERIC_ERROR, "QMP input member 'arguments' must be an object"
                )
        elif key != "id":
            raise QmpError(ErrorClass.GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise QmpError(ErrorClass.GENERIC_ERROR, "QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


# ---------------------------------------------------------------------------
# Sockets
# ---------------------------------------------------------------------------


class _Client:
    """One connection: a reader thread that runs the session, and a writer thread.

    Everything for the client (greeting, replies, events) goes through one
    outgoing queue, so replies and events keep their order, and whoever puts
    a message there (a command, an event from a vCPU or the migration) never
    waits for the client to read it. The writer sends one message at a time;
    a message that cannot be sent within SEND_TIMEOUT_S (the socket's
    timeout, which bounds a whole sendall) drops the client. The socket is
    closed by whichever of the two threads ends last.
    """

    def __init__(self, server: QmpServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.session = server.dispatcher.session()
        self.closed = False
        self.events_on = False  # set once the reply to qmp_capabilities is queued
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._input_done = False  # the reader has ended: send what is queued, then close
        self._end_reason = "end of input"  # why the reader ended, for the log
        self._threads_left = 2
        self.thread = threading.Thread(target=self._serve, name=f"qmp-client {peer}", daemon=True)
        self.writer = threading.Thread(
            target=self._write_loop, name=f"qmp-writer {peer}", daemon=True
        )

    def start(self) -> None:
        self.writer.start()
        self.thread.start()

    def send(self, payload: bytes) -> bool:
        """Queue one whole message; never blocks. False if the client is gone."""
        with self._cond:
            if self.closed:
                return False
            if self._queued_bytes + len(payload) > MAX_QUEUED_BYTES:
                overflow = True
            else:
                overflow = False
                self._queue.append(payload)
                self._queued_bytes += len(payload)
                self._cond.notify()
        if overflow:
            self.drop(f"it is not reading: over {MAX_QUEUED_BYTES} bytes are waiting for it")
            return False
        return True

    def drop(self, reason: str) -> None:
        """Disconnect now, discarding what is queued; both threads notice and end."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        logger.info("QMP client %s disconnected: %s", self.peer, reason)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # also wakes a writer inside sendall()

    def stop_reading(self) -> None:
        """Make the reader see end of input; replies already being made still go out."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def _serve(self) -> None:
        try:
            self.send(encode(self.session.dispatcher.greeting()))
            while not self.closed:
                try:
                    data = self.sock.recv(RECV_CHUNK_BYTES)
                except TimeoutError:
                    continue
                except OSError as exc:
                    self.drop(f"receiving failed: {exc}")
                    break
                if not data:
                    if self.server.closing:
                        self._end_reason = "server closing"
                    break
                try:
                    for reply in self.session.feed(data):
                        if not self.send(_encode_reply(reply)):
                            break
                        # Events only after the negotiation's reply, as QEMU sends them.
                        self.events_on = self.session.negotiated
                except QmpInputTooLarge as exc:
                    self.send(encode(error_reply(ErrorClass.GENERIC_ERROR, f"{exc}; closing")))
                    self._end_reason = str(exc)
                    break
        except Exception:  # a bug here must not take the server down
            logger.exception("QMP client %s: unexpected error", self.peer)
            self.drop("internal error")
        finally:
            with self._cond:
                self._input_done = True
                self._cond.notify_all()
            self._thread_ended()

    def _write_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._queue or self._input_done or self.closed):
                        self._cond.wait()
                    if self.closed or not self._queue:
                        break  # dropped, or the reader ended and everything is sent
                    payload = self._queue.popleft()
                    self._queued_bytes -= len(payload)
                try:
                    self.sock.sendall(payload)  # the socket's timeout bounds the whole sendall
                except TimeoutError:
                    limit_s = self.sock.gettimeout()
                    self.drop(f"it is not reading: a message could not be sent within {limit_s} s")
                    break
                except OSError as exc:
                    self.drop(f"sending failed: {exc}")
                    break
            with self._cond:
                ended_here = not self.closed
                self.closed = True
            if ended_here:
                logger.info("QMP client %s disconnected: %s", self.peer, self._end_reason)
        except Exception:
            logger.exception("QMP client %s: unexpected error in its writer", self.peer)
            self.drop("internal error")
        finally:
            self._thread_ended()

    def _thread_ended(self) -> None:
        """The last of the two threads closes the socket: no fd is closed under a user."""
        with self._cond:
            self._threads_left -= 1
            last = self._threads_left == 0
        if last:
            self.sock.close()
            self.server._forget(self)


def _encode_reply(reply: dict[str, Any]) -> bytes:
    try:
        return encode(reply)
    except (TypeError, ValueError) as exc:  # e.g. an "id" or error text that is not JSON-safe
        fixed = error_reply(ErrorClass.GENERIC_ERROR, f"reply is not JSON: {exc}")
        return encode(fixed)


class QmpServer:
    """A QMP server on ``unix:PATH`` or ``tcp:HOST:PORT``.

    Unix sockets are created with mode 0600. TCP is refused unless the
    host is loopback (127.0.0.0/8, ::1, localhost) or allow_remote is set:
    QMP has no authentication, and whoever reaches it controls the VM.

    Usage::

        server = QmpServer("unix:/run/vm.qmp")
        server.register("stop", lambda args: machine.pause())
        with server:               # start() ... close()
            ...
            server.emit_event("STOP")
    """

    def __init__(
        self,
        address: str,
        *,
        allow_remote: bool = False,
        version: tuple[int, int, int] = (9, 2, 0),
        package: str = DEFAULT_PACKAGE,
        executor: Executor | None = None,
    ) -> None:
        self.address = parse_address(address)
        if not allow_remote and not self.address.is_loopback:
            raise ValueError(
                f"refusing QMP on {self.address}: it is not a loopback address, and QMP has no "
                "authentication; use 127.0.0.1, ::1 or localhost, or allow remote access "
                "explicitly (--qmp-allow-remote)"
            )
        self.dispatcher = QmpDispatcher(version, package, executor)
        self._lock = threading.Lock()
        self._clients: set[_Client] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._bound: Address | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._closing = False
        self._accepted = 0  # connections so far, to name clients in the log

    # -- commands and events ------------------------------------------------

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        args: dict[str, ArgSpec] | None = None,
        allow_extra: bool = False,
        query: bool = False,
    ) -> None:
        """Add command `name`.

        `handler(args)` gets the checked arguments and returns the reply's
        "return" value (None means ``{}``); it raises QmpError for failures.
        `args` declares the accepted arguments (None: no arguments);
        allow_extra lets undeclared arguments through unchecked.

        Where it runs: a command registered with query=True (it only reads
        state) runs on the calling client's thread, concurrently with other
        clients. Any other command runs as ``executor(lambda: handler(args))``
        when the server has an executor (the VMM's control thread, which
        serialises every state change), else on the client's thread too.
        """
        self.dispatcher.register(name, handler, args=args, allow_extra=allow_extra, query=query)

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Queue an event for every client that has negotiated capabilities.

        Callable from any thread; never waits for a client. Each client's
        writer sends it after what is already queued for that client, and
        drops a client that does not take a message within SEND_TIMEOUT_S.
        data must be JSON-serialisable (else TypeError/ValueError here).
        """
        payload = encode(make_event(name, data))
        with self._lock:
            clients = [c for c in self._clients if c.events_on and not c.closed]
        for client in clients:
            client.send(payload)

    # -- lifecycle -----------------------------------------------------------

    @property
    def address_str(self) -> str:
        """The address being served, with the real port for tcp:HOST:0."""
        return str(self._bound or self.address)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    @property
    def started(self) -> bool:
        return self._accept_thread is not None

    def start(self) -> None:
        """Listen (unless listen() did), and serve from daemon threads."""
        if self._accept_thread is not None:
            raise RuntimeError(f"QMP server on {self.address_str} is already started")
        if self._listener is None:
            self.listen()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"qmp-accept {self.address_str}", daemon=True
        )
        self._accept_thread.start()

    def listen(self) -> None:
        """Bind and listen. A client may connect from now on; its greeting waits for start(),
        as QEMU's waits for its main loop."""
        if self._listener is not None:
            raise RuntimeError(f"QMP server on {self.address_str} is already listening")
        if self.address.kind == "unix":
            self._listener = self._listen_unix(self.address.path)
            self._bound = self.address
        else:
            self._listener = self._listen_tcp(self.address)
            port = self._listener.getsockname()[1]
            self._bound = Address("tcp", host=self.address.host, port=port)
        logger.info("QMP server listening on %s", self.address_str)

    def close(self) -> None:
        """Stop accepting, disconnect every client, remove the unix socket file."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            clients = list(self._clients)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2.0)
        # Stop reading but keep writing, so that a reply being produced right
        # now (say, to "quit", whose handler may be what called close()) still
        # goes out, as in QEMU; then each reader sees end of input and exits.
        # A client whose command is running on this very thread (its handler
        # called close()) finishes after we return: its reply is queued then.
        for client in clients:
            client.stop_reading()
        me = threading.current_thread()
        deadline = time.monotonic() + 2.0
        for client in clients:
            if me in (client.thread, client.session.running_on):
                continue
            for thread in (client.thread, client.writer):
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if client.thread.is_alive() or client.writer.is_alive():
                client.drop("server closing")  # stuck in a handler or a send: cut it off
        self._remove_socket_file()
        logger.info("QMP server on %s closed", self.address_str)

    def __enter__(self) -> QmpServer:
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------

    def _listen_unix(self, path: str) -> socket.socket:
        sock, self._socket_id = listen_unix(path, 16, "QMP socket")
        return sock

    def _listen_tcp(self, address: Address) -> socket.socket:
        try:
            infos = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve QMP host {address.host!r}: {exc}") from exc
        family, _, _, _, sockaddr = infos[0]
        try:
            return socket.create_server(sockaddr, family=family, backlog=16)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    errno.EADDRINUSE,
                    f"QMP address {address} is in use: another process is listening on it",
                ) from exc
            raise

    def _remove_socket_file(self) -> None:
        if self.address.kind != "unix" or self._socket_id is None:
            return
        path = self.address.path
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._socket_id:  # still ours, not a successor's
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove QMP socket %s: %s", path, exc)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError as exc:
                if self._closing:
                    return
                logger.warning("QMP accept on %s failed: %s", self.address_str, exc)
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            sock.settimeout(SEND_TIMEOUT_S)
            self._accepted += 1
            if isinstance(peer, tuple):
                name = f"#{self._accepted} {peer[0]}:{peer[1]}"
            else:
                name = f"#{self._accepted}"
            client = _Client(self, sock, name)
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self._clients.add(client)
            logger.info("QMP client %s connected to %s", name, self.address_str)
            client.start()

    def _forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)
