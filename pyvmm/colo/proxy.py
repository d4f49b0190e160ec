"""The comparator process: compare.py's rules on real sockets (`pyvmm colo-compare`, or a
thread of `pyvmm colo`).

It listens on four sockets and connects to none of the VMs' data paths itself:
- clients (tcp:HOST:PORT): request lines in, answer lines out;
- the primary's COM2 and the secondary's COM2 (unix:PATH each; `pyvmm run --serial2
  unix:PATH` connects there): requests out, answers in;
- the control link (unix:PATH; the primary's `--colo-compare` connects there):
  checkpoints, releases and checkpoint requests (migration/colo/notify.py).

Everything runs on one thread around a selector, so the rules see one event at a time.
The one place it waits is a release: before answering it reads both VMs' output up to
the positions the release names (a few bytes that are already on their way).

Failover. A primary whose connections close is gone: everything is held until the
secondary has taken over (its query-colo-status says mode none, last-mode secondary),
then the comparator asks it (x-query-colo-stats) which checkpoint it holds and goes on
with it alone. A secondary whose COM2 closes is gone too; the primary's failover then
comes as an "exit" on the control link. With auto_failover the comparator also sends
x-colo-lost-heartbeat itself, acting as the heartbeat QEMU leaves to the management.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvmm.colo.compare import (
    Action,
    Comparator,
    RequestCheckpoint,
    SendClient,
    SendVm,
)
from pyvmm.migration.colo.notify import LineReader, LinkError, decode, encode
from pyvmm.unixsocket import listen_unix

log = logging.getLogger(__name__)

RELEASE_READ_TIMEOUT_S = 5.0
TAKEOVER_POLL_S = 0.05
TAKEOVER_TIMEOUT_S = 60.0


@dataclass
class ProxyConfig:
    listen: str  # tcp:HOST:PORT for clients (port 0: any)
    primary: str  # unix:PATH: the primary's COM2 connects here
    secondary: str  # unix:PATH
    control: str  # unix:PATH: the primary's --colo-compare
    primary_qmp: str | None = None
    secondary_qmp: str | None = None
    timeout_ms: float = 3000.0  # colo-compare's compare_timeout
    check_ms: float = 3000.0  # colo-compare's expired_scan_cycle
    auto_failover: bool = False


def _unix_path(address: str, what: str) -> str:
    if not address.startswith("unix:") or len(address) == 5:
        raise ValueError(f"invalid {what} address {address!r}: use unix:PATH")
    return address[5:]


def _tcp(address: str) -> tuple[str, int]:
    kind, _, rest = address.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid client address {address!r}: use tcp:HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class _Conn:
    sock: socket.socket
    role: str  # client | primary | secondary | control
    client: int = 0
    out: bytearray = field(default_factory=bytearray)
    lines: LineReader = field(default_factory=LineReader)


class CompareProxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.core = Comparator(config.timeout_ms)
        self._sel = selectors.DefaultSelector()
        self._listeners: dict[str, socket.socket] = {}
        self._conns: dict[int, _Conn] = {}  # fd -> conn
        self._vm: dict[str, _Conn | None] = {"primary": None, "secondary": None}
        self._vm_out: dict[str, bytearray] = {"primary": bytearray(), "secondary": bytearray()}
        self._control: _Conn | None = None
        self._clients = 0
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # snapshot() vs the loop
        self._watchers: list[threading.Thread] = []
        self.client_address: tuple[str, int] = ("", 0)
        self.log: list[str] = []  # failover steps, for the demo's display

    # --- setup ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Listen everywhere (so VMs and clients can connect before serve() runs)."""
        cfg = self.config
        host, port = _tcp(cfg.listen)
        client = socket.create_server((host, port), backlog=16)
        self.client_address = client.getsockname()[:2]
        self._listen("client", client)
        for role, address in (("primary", cfg.primary), ("secondary", cfg.secondary),
                              ("control", cfg.control)):  # fmt: skip
            sock, _ = listen_unix(_unix_path(address, role), 4, f"comparator {role} socket")
            self._listen(role, sock)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    def _listen(self, role: str, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._listeners[role] = sock
        self._sel.register(sock, selectors.EVENT_READ, ("listen", role))

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, name="colo-compare", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        for thread in self._watchers:
            thread.join(2)
        self.close()

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn, quiet=True)
        for role, sock in self._listeners.items():
            sock.close()
            if role != "client":
                with contextlib.suppress(OSError, ValueError):
                    address = getattr(self.config, role)
                    os.unlink(_unix_path(address, role))
        self._listeners.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._sel.close()

    # --- the loop ------------------------------------------------------------------------------

    def serve(self) -> None:
        next_check = time.monotonic() + self.config.check_ms / 1000
        while not self._stop.is_set():
            timeout = max(0.0, next_check - time.monotonic())
            for key, mask in self._sel.select(min(timeout, 0.5)):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                kind, arg = key.data
                if kind == "listen":
                    self._accept(arg)
                    continue
                conn = arg
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                if mask & selectors.EVENT_READ and conn.sock.fileno() >= 0:
                    self._readable(conn)
            self._drain_events()
            if time.monotonic() >= next_check:
                self._run(self.core.tick(self._now()))
                next_check = time.monotonic() + self.config.check_ms / 1000

    @staticmethod
    def _now() -> float:
        return time.monotonic() * 1000

    def _accept(self, role: str) -> None:
        try:
            sock, _ = self._listeners[role].accept()
        except (BlockingIOError, OSError):
            return
        sock.setblocking(False)
        if role == "client":
            self._clients += 1
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, role, self._clients if role == "client" else 0)
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, ("conn", conn))
        if role in self._vm:
            if self._vm[role] is not None:
                log.warning("comparator: a second %s connection replaces the first", role)
                self._drop(self._vm[role], quiet=True)  # type: ignore[arg-type]
            self._vm[role] = conn
            conn.out = self._vm_out[role]  # what was queued before it connected
            self._want_write(conn)
            log.info("comparator: the %s's COM2 connected", role)
        elif role == "control":
            self._control = conn
            log.info("comparator: the primary's control link connected")

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(conn, str(exc))
            return
        if not data:
            self._lost(conn, "closed")
            return
        self._received(conn, data)

    def _received(self, conn: _Conn, data: bytes) -> None:
        core, now = self.core, self._now()
        if conn.role == "primary":
            self._run(core.primary_bytes(data, now))
        elif conn.role == "secondary":
            self._run(core.secondary_bytes(data, now))
        elif conn.role == "client":
            try:
                lines = conn.lines.feed(data)
            except LinkError:
                self._drop(conn)
                return
            for line in lines:
                self._run(core.client_line(conn.client, line))
        else:
            try:
                for line in conn.lines.feed(data):
                    self._control_message(decode(line))
            except (LinkError, ValueError, KeyError, TypeError) as exc:
                log.warning("comparator: bad control message: %s", exc)
                self._lost(conn, str(exc))

    def _control_message(self, message: dict[str, Any]) -> None:
        core = self.core
        if "checkpoint" in message:
            core.checkpoint(
                int(message["checkpoint"]), str(message["mode"]), int(message["pvm-tx"]),
                int(message["pvm-sent"]), int(message["pvm-rx"]),
            )  # fmt: skip
            self._send_control({"ack": int(message["checkpoint"])})
        elif "release" in message:
            number, svm_tx = int(message["release"]), int(message["svm-tx"])
            pending = core.pending
            if pending is not None:
                self._read_up_to("primary", pending.pvm_sent, lambda: core.primary_position)
                self._read_up_to("secondary", svm_tx, lambda: core.secondary_position)
            self._run(core.release(number, svm_tx))
            self._send_control({"released": number})
        elif "exit" in message:
            log.info("comparator: the primary left COLO (%s): it serves alone", message["exit"])
            self.log.append("primary serves alone")
            self._run(core.primary_exit())

    def _read_up_to(self, role: str, position: int, where: Callable[[], int]) -> None:
        """Read a VM's output until the comparator has it up to `position`."""
        conn = self._vm[role]
        deadline = time.monotonic() + RELEASE_READ_TIMEOUT_S
        while conn is not None and where() < position and time.monotonic() < deadline:
            conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = conn.sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                data = b""
            finally:
                with contextlib.suppress(OSError):
                    conn.sock.setblocking(False)
            if not data:
                self._lost(conn, "closed")
                return
            self._received(conn, data)
        if where() < position:
            log.warning(
                "comparator: %s output at %d, the release names %d", role, where(), position
            )

    # --- actions -------------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendClient):
                conn = next(
                    (c for c in self._conns.values()
                     if c.role == "client" and c.client == action.client), None,
                )  # fmt: skip
                if conn is not None:
                    self._send(conn, action.data)
            elif isinstance(action, SendVm):
                vm = self._vm[action.vm]
                if vm is not None:
                    self._send(vm, action.data)
                else:
                    self._vm_out[action.vm] += action.data
            elif isinstance(action, RequestCheckpoint):
                log.info("comparator: checkpoint request (%s) in epoch %d", action.reason,
                         action.epoch)  # fmt: skip
                self._send_control({"request": action.reason, "epoch": action.epoch})

    def _send_control(self, message: dict[str, Any]) -> None:
        if self._control is not None:
            self._send(self._control, encode(message))

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.out += data
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(conn, str(exc))
                return
            del conn.out[:n]
        self._want_write(conn)

    def _want_write(self, conn: _Conn) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(conn.sock, events, ("conn", conn))

    def _drop(self, conn: _Conn, quiet: bool = False) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()
        if conn.role in self._vm and self._vm[conn.role] is conn:
            self._vm[conn.role] = None
        if conn is self._control:
            self._control = None

    # --- failover ------------------------------------------------------------------------------

    def _lost(self, conn: _Conn, why: str) -> None:
        role = conn.role
        self._drop(conn)
        if role == "client":
            return
        core = self.core
        if role in ("primary", "control") and core.primary_alive and core.mode != "primary-only":
            log.warning("comparator: the primary is gone (%s %s)", role, why)
            self.log.append("primary lost")
            core.primary_lost()
            self._watch(self._await_secondary_takeover)
        elif role == "secondary" and core.secondary_alive and core.mode != "secondary-only":
            log.warning("comparator: the secondary is gone (%s)", why)
            self.log.append("secondary lost")
            core.secondary_lost()
            if self.config.auto_failover and self.config.primary_qmp:
                self._watch(lambda: self._heartbeat(self.config.primary_qmp))

    def _watch(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name="colo-failover", daemon=True)
        thread.start()
        self._watchers.append(thread)

    def _heartbeat(self, address: str | None) -> None:
        from pyvmm.monitor.client import QmpClientError, SyncQmp

        if address is None:
            return
        try:
            with SyncQmp(address, timeout_s=10) as qmp:
                qmp.cmd("x-colo-lost-heartbeat")
            self.log.append(f"x-colo-lost-heartbeat sent to {address}")
        except QmpClientError as exc:
            log.warning("comparator: x-colo-lost-heartbeat on %s: %s", address, exc)

    def _await_secondary_takeover(self) -> None:
        """Off the loop: wait until the secondary has taken over, then tell the loop
        which checkpoint it holds."""
        from pyvmm.monitor.client import QmpClientError, SyncQmp

        address = self.config.secondary_qmp
        if address is None:
            log.warning("comparator: no secondary QMP address: cannot follow a failover")
            return
        if self.config.auto_failover:
            self._heartbeat(address)
        deadline = time.monotonic() + TAKEOVER_TIMEOUT_S
        try:
            with SyncQmp(address, timeout_s=10) as qmp:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    status = qmp.cmd("query-colo-status")
                    if status["mode"] == "none" and status["last-mode"] == "secondary":
                        stats = qmp.cmd("x-query-colo-stats")
                        self._post("promoted", (stats["last-applied"], stats["last-applied-tx"]))
                        return
                    time.sleep(TAKEOVER_POLL_S)
        except QmpClientError as exc:
            log.warning("comparator: following the secondary's takeover: %s", exc)

    def _post(self, kind: str, value: Any) -> None:
        self._events.put((kind, value))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"e")

    def _drain_events(self) -> None:
        while True:
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "promoted":
                applied, tx = value
                log.info("comparator: the secondary serves, from checkpoint %d", applied)
                self.log.append(f"secondary serves from checkpoint {applied}")
                self._run(self.core.secondary_promoted(applied, tx))

    # --- what the demo shows -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        core = self.core
        st = core.stats
        return {
            "mode": core.mode, "epoch": core.epoch, "requests": st.requests,
            "delivered": st.delivered, "held": core.held(), "matched": st.matched,
            "miscompares": st.miscompares, "timeouts": st.timeouts,
            "checkpoints": st.checkpoints, "replayed-bytes": st.replayed_bytes,
            "failovers": list(st.failovers),
        }  # fmt: skip


def run_compare(config: ProxyConfig, ready: Callable[[CompareProxy], None] | None = None) -> int:
    """`pyvmm colo-compare`: serve until SIGINT/SIGTERM."""
    import signal

    proxy = CompareProxy(config)
    proxy.open()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    host, port = proxy.client_address
    print(f"pyvmm: colo-compare: clients on tcp:{host}:{port}", flush=True)
    proxy.start()
    if ready is not None:
        ready(proxy)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        proxy.stop()
    print(json.dumps(proxy.snapshot()), flush=True)
    return 0
