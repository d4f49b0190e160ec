"""Migration transports: `tcp:HOST:PORT` and `unix:PATH`: one connection, plus one per
multifd channel to the same address (migration/multifd/)."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

from pyvmm.unixsocket import listen_unix

CONNECT_TIMEOUT_S = 10.0
SOCKET_BUFFER_BYTES = 8 << 20  # fewer wake-ups per GiB than the defaults (~200 KiB)
IDLE_TIMEOUT_S = 60.0  # a peer silent for this long has failed
# Connections waiting to be accepted: the main stream and its multifd channels connect
# one after another to the same address.
LISTEN_BACKLOG = 16


@dataclass(frozen=True)
class MigrationUri:
    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}" if self.kind == "tcp" else f"unix:{self.path}"


def parse_uri(text: str) -> MigrationUri:
    if text.startswith("unix:") and len(text) > 5:
        return MigrationUri("unix", path=text[5:])
    if text.startswith("tcp:"):
        host, sep, port = text[4:].rpartition(":")
        host = host.strip("[]")
        if sep and host and port.isdigit() and 0 <= int(port) <= 65535:
            return MigrationUri("tcp", host=host, port=int(port))
    raise ValueError(f"invalid migration URI '{text}': use tcp:HOST:PORT or unix:PATH")


def connect(uri: MigrationUri, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    try:
        if uri.kind == "tcp":
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(uri.path)
            except BaseException:
                sock.close()
                raise
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {uri}: {exc.strerror or exc}") from None
    sock.settimeout(IDLE_TIMEOUT_S)
    tune(sock)
    return sock


def tune(sock: socket.socket) -> None:
    """Large socket buffers (the kernel caps them at net.core.[rw]mem_max)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)


def listen(uri: MigrationUri) -> socket.socket:
    """A listening socket for one incoming migration. A unix socket appears only once it
    listens, with mode 0600 whatever the umask (whoever connects writes guest RAM and vCPU
    state); a stale one is replaced (unixsocket.py)."""
    if uri.kind == "unix":
        try:
            return listen_unix(uri.path, LISTEN_BACKLOG, "migration socket")[0]
        except OSError as exc:
            raise OSError(f"cannot listen on {uri}: {exc.strerror or exc}") from None
    family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((uri.host, uri.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {uri}: {exc.strerror or exc}") from None
    return sock


def bound_uri(sock: socket.socket, uri: MigrationUri) -> MigrationUri:
    """The URI actually listened on (the real port when PORT was 0)."""
    if uri.kind == "tcp":
        return MigrationUri("tcp", host=uri.host, port=sock.getsockname()[1])
    return uri
