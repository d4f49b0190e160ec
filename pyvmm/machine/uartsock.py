"""The host side of COM2 (uart.py): a socket, and two threads that move bytes.

`pyvmm run --serial2 ADDR`:
- `unix:PATH` or `tcp:HOST:PORT` connects to a peer that listens there (COLO's
  comparator does; it must be up first);
- `unix:PATH,server` or `tcp:HOST:PORT,server` listens and serves one peer at a time,
  like QEMU's `-serial unix:PATH,server`.

The reader hands what arrives to the device (waiting while the guest lags, so nothing is
dropped); the writer sends what the guest wrote, only while the machine runs. When a
connection ends, the guest simply sees no more input (a listening side waits for the
next peer). Positions in the stream count on across connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from pyvmm.machine.errors import MachineError
from pyvmm.machine.uart import ServiceUart
from pyvmm.unixsocket import listen_unix

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
POLL_S = 0.2


@dataclass(frozen=True)
class UartAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    server: bool = False

    def __str__(self) -> str:
        where = f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"
        return where + (",server" if self.server else "")


def parse_uart_address(text: str) -> UartAddress:
    """unix:PATH[,server] or tcp:HOST:PORT[,server]; ValueError names what is wrong."""
    form = "use unix:PATH or tcp:HOST:PORT, optionally followed by ,server"
    body, server = text, False
    if body.endswith(",server"):
        body, server = body[: -len(",server")], True
    kind, sep, rest = body.partition(":")
    if kind == "unix" and sep and rest:
        return UartAddress("unix", path=rest, server=server)
    if kind == "tcp" and sep:
        host, sep2, port = rest.rpartition(":")
        if sep2 and host and port.isdigit() and int(port) < 65536:
            return UartAddress("tcp", host=host.strip("[]"), port=int(port), server=server)
    raise ValueError(f"invalid --serial2 address {text!r}: {form}")


class UartSocket:
    """Owns the socket(s) and the two threads; close() ends both."""

    def __init__(self, uart: ServiceUart, address: UartAddress) -> None:
        self.uart = uart
        self.address = address
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self._connected = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0

    def start(self) -> None:
        """Connect (or listen) now, so that a bad address is a start-up error."""
        if self.address.server:
            self._listener = self._listen()
        else:
            self._attach(self._connect())
        for name, target in (("com2-reader", self._read_loop), ("com2-writer", self._write_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _connect(self) -> socket.socket:
        addr = self.address
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                if addr.kind == "unix":
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(addr.path)
                else:
                    sock = socket.create_connection((addr.host, addr.port), CONNECT_TIMEOUT_S)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline:  # the peer may still be starting up
                    raise MachineError(f"--serial2 {addr}: cannot connect: {exc}") from None
                time.sleep(0.05)
            except OSError as exc:
                sock.close()
                raise MachineError(f"--serial2 {addr}: cannot connect: {exc}") from None

    def _listen(self) -> socket.socket:
        addr = self.address
        try:
            if addr.kind == "unix":
                return listen_unix(addr.path, 1, "COM2 socket")[0]
            sock = socket.create_server((addr.host, addr.port), backlog=1)
            return sock
        except OSError as exc:
            raise MachineError(f"--serial2 {addr}: cannot listen: {exc}") from None

    def _attach(self, sock: socket.socket) -> None:
        sock.settimeout(POLL_S)
        self._sock = sock
        self.connections += 1
        self._connected.set()

    def _detach(self, sock: socket.socket, why: str) -> None:
        if self._sock is sock:
            self._sock = None
            self._connected.clear()
            with contextlib.suppress(OSError):
                sock.close()
            if not self._closed.is_set():
                log.warning("COM2 host connection ended (%s)", why)

    def _read_loop(self) -> None:
        while not self._closed.is_set():
            sock = self._sock
            if sock is None:
                if self._listener is None:
                    return  # a connecting side does not reconnect
                self._accept()
                continue
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self._detach(sock, str(exc))
                continue
            if not data:
                self._detach(sock, "the peer closed it")
                continue
            while data and not self._closed.is_set():
                taken = self.uart.receive(data, POLL_S)
                data = data[taken:]

    def _accept(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(POLL_S)
        try:
            sock, _ = self._listener.accept()
        except (TimeoutError, OSError):
            return
        self._attach(sock)

    def _write_loop(self) -> None:
        while not self._closed.is_set():
            if not self._connected.wait(POLL_S):
                continue
            chunk = self.uart.take_tx(POLL_S)
            sock = self._sock
            if not chunk or sock is None:
                continue  # nothing to send (or the peer left: the bytes are gone with it)
            view = memoryview(chunk)
            try:
                while view and not self._closed.is_set():
                    try:  # the socket keeps the reader's timeout: retry, never block for good
                        view = view[sock.send(view) :]
                    except TimeoutError:
                        continue
            except OSError as exc:
                self._detach(sock, str(exc))

    def close(self) -> None:
        self._closed.set()
        self.uart.close()
        sock, self._sock = self._sock, None
        for s in (sock, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for thread in self._threads:
            thread.join(2)
        if self._listener is not None and self.address.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.address.path)
