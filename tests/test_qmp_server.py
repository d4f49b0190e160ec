"""The QMP server against the official qemu.qmp client and raw sockets.

Every test uses real sockets (unix in tmp_path, TCP on 127.0.0.1 port 0)
and real command handlers registered here. Socket timeouts and
asyncio.wait_for bound every wait, so a broken server fails a test
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import queue
import socket
import stat
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from pyvmm.monitor import server as server_mod
from pyvmm.monitor.client import (
    QmpCommandError,
    QmpConnectError,
    QmpTimeoutError,
    SyncQmp,
    qmp_call,
)
from pyvmm.monitor.schema import ArgSpec, QmpError
from pyvmm.monitor.server import QmpDispatcher, QmpServer, parse_address

WAIT_S = 1.0  # the longest any single wait in these tests may take

NEGOTIATE_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"


# ---------------------------------------------------------------------------
# Commands registered by the tests (real handlers)
# ---------------------------------------------------------------------------


def _fail(args: dict[str, Any]) -> Any:
    raise QmpError(args["class"], args["desc"])


def _boom(args: dict[str, Any]) -> Any:
    raise RuntimeError("the handler blew up")


TYPED_ARGS = {
    "s": ArgSpec("str"),
    "i": ArgSpec("int"),
    "b": ArgSpec("bool", optional=True),
    "n": ArgSpec("number", optional=True),
    "d": ArgSpec("dict", optional=True),
    "l": ArgSpec("list", optional=True),
    "a": ArgSpec("any", optional=True),
}


def make_server(address: str) -> QmpServer:
    srv = QmpServer(address, package="pyvmm-test")
    srv.register("echo", lambda args: args, allow_extra=True)
    srv.register("nothing", lambda args: None)
    srv.register("typed", lambda args: args, args=TYPED_ARGS)
    srv.register("fail", _fail, args={"class": ArgSpec("str"), "desc": ArgSpec("str")})
    srv.register("boom", _boom)
    return srv


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "qmp.sock"


@pytest.fixture
def server(sock_path: Path) -> Iterator[QmpServer]:
    srv = make_server(f"unix:{sock_path}")
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def tcp_server() -> Iterator[QmpServer]:
    srv = make_server("tcp:127.0.0.1:0")
    srv.start()
    yield srv
    srv.close()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Raw:
    """A raw socket client: send bytes, read CRLF-terminated JSON messages."""

    def __init__(self, srv: QmpServer) -> None:
        addr = parse_address(srv.address_str)
        if addr.kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(WAIT_S)
            self.sock.connect(addr.path)
        else:
            self.sock = socket.create_connection((addr.host, addr.port), timeout=WAIT_S)
        self.buf = b""
        self.greeting = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        assert line.endswith(b"\r"), "QEMU ends every message with CRLF"
        return json.loads(line)

    def cmd(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(json.dumps(request).encode() + b"\n")
        return self.read()

    def negotiate(self) -> None:
        assert self.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server: QmpServer) -> Iterator[Raw]:
    client = Raw(server)
    yield client
    client.close()


def run(coro: Any) -> Any:
    """Run an async test body with an overall time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout=WAIT_S))


def target(srv: QmpServer) -> Any:
    addr = parse_address(srv.address_str)
    return addr.path if addr.kind == "unix" else (addr.host, addr.port)


async def connected(srv: QmpServer) -> QMPClient:
    client = QMPClient("test")
    await client.connect(target(srv))
    return client


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    return reply["error"]["class"], reply["error"]["desc"]


def wait_until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------------------
# Addresses and security
# ---------------------------------------------------------------------------


def test_parse_address_forms() -> None:
    assert parse_address("unix:/run/vm.qmp").path == "/run/vm.qmp"
    tcp = parse_address("tcp:127.0.0.1:4444")
    assert (tcp.kind, tcp.host, tcp.port) == ("tcp", "127.0.0.1", 4444)
    v6 = parse_address("tcp:[::1]:0")
    assert (v6.host, v6.port, str(v6)) == ("::1", 0, "tcp:[::1]:0")
    for bad in [
        "",
        "/run/vm.qmp",
        "unix:",
        "tcp:1.2.3.4",
        "tcp::4444",
        "tcp:h:99999",
        "tcp:h:x",
        "tcp:::1:4",
        "udp:h:1",
        "unix:/" + "x" * 200,
    ]:
        with pytest.raises(ValueError) as info:
            parse_address(bad)
        assert repr(bad) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "address", ["tcp:0.0.0.0:0", "tcp:192.0.2.1:4444", "tcp:[::]:0", "tcp:example.com:4444"]
)
def test_non_loopback_tcp_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        QmpServer(address)
    QmpServer(address, allow_remote=True)  # explicit opt-in is accepted (not started)


@pytest.mark.parametrize(
    "address",
    [
        "tcp:127.0.0.1:0",
        "tcp:127.1.2.3:0",
        "tcp:[::1]:0",
        "tcp:localhost:0",
        "tcp:[::ffff:127.0.0.1]:0",
    ],
)
def test_loopback_tcp_accepted(address: str) -> None:
    QmpServer(address)


def test_unix_socket_mode_0600_and_removed_on_close(sock_path: Path) -> None:
    srv = make_server(f"unix:{sock_path}")
    srv.start()
    try:
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        srv.close()
    assert not sock_path.exists()


def test_stale_socket_replaced_live_socket_refused(sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))  # a socket file nobody listens on: stale
    stale.close()
    with make_server(f"unix:{sock_path}") as srv:
        with pytest.raises(OSError, match="in use") as info:
            make_server(f"unix:{sock_path}").start()
        assert info.value.errno == errno.EADDRINUSE
        assert Raw(srv).greeting["QMP"]["capabilities"] == []  # the first one still works


def test_regular_file_in_the_way_is_not_deleted(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        make_server(f"unix:{sock_path}").start()
    assert sock_path.read_text() == "precious"


# ---------------------------------------------------------------------------
# Greeting and negotiation (qemu.qmp and raw)
# ---------------------------------------------------------------------------


def test_greeting_shape_with_qemu_qmp(server: QmpServer) -> None:
    async def body() -> None:
        client = await connected(server)
        try:
            greeting = client.greeting
            assert greeting is not None
            assert greeting.QMP.version == {
                "qemu": {"major": 9, "minor": 2, "micro": 0},
                "package": "pyvmm-test",
            }
            assert greeting.QMP.capabilities == []
            assert await client.execute("query-version") == greeting.QMP.version
        finally:
            await client.disconnect()

    run(body())


def test_greeting_raw(raw: Raw) -> None:
    assert raw.greeting == {
        "QMP": {
            "version": {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "pyvmm-test"},
            "capabilities": [],
        }
    }


def test_commands_before_negotiation_are_refused(raw: Raw) -> None:
    for name in ["query-version", "echo", "no-such-command"]:
        reply = raw.cmd({"execute": name, "id": 1})
        assert reply == {"error": {"class": "CommandNotFound", "desc": NEGOTIATE_FIRST}, "id": 1}
    # Errors other than CommandNotFound are reported as they are.
    assert error_of(raw.cmd({"id": 2})) == ("GenericError", "QMP input lacks member 'execute'")
    raw.negotiate()
    assert raw.cmd({"execute": "query-version"})["return"]["package"] == "pyvmm-test"


def test_negotiation_twice_and_capabilities(raw: Raw) -> None:
    oob = raw.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert error_of(oob) == ("GenericError", "Capability oob not available")
    unknown = raw.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["fast"]}})
    assert error_of(unknown) == (
        "GenericError",
        "Parameter 'enable[0]' does not accept value 'fast'",
    )
    bad_type = raw.cmd({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}})
    assert error_of(bad_type) == (
        "GenericError",
        "Invalid parameter type for 'enable', expected: array",
    )
    assert raw.cmd({"execute": "qmp_capabilities", "arguments": {"enable": []}}) == {"return": {}}
    again = raw.cmd({"execute": "qmp_capabilities", "id": "again"})
    assert again == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        },
        "id": "again",
    }


def test_query_commands_lists_registered_and_builtin(raw: Raw) -> None:
    raw.negotiate()
    names = [c["name"] for c in raw.cmd({"execute": "query-commands"})["return"]]
    for name in ["qmp_capabilities", "query-version", "query-commands", "echo", "typed"]:
        assert name in names


# ---------------------------------------------------------------------------
# Requests, replies, ids, errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id", [1, -7, 2.5, "abc", {"a": [1, {"b": None}]}, [1, 2], None, True]
)
def test_id_is_echoed(raw: Raw, request_id: Any) -> None:
    raw.negotiate()
    ok = raw.cmd({"execute": "echo", "arguments": {"x": 1}, "id": request_id})
    assert ok == {"return": {"x": 1}, "id": request_id}
    err = raw.cmd({"execute": "nope", "id": request_id})
    assert err["id"] == request_id and err["error"]["class"] == "CommandNotFound"


def test_no_id_no_id_member(raw: Raw) -> None:
    raw.negotiate()
    assert raw.cmd({"execute": "nothing"}) == {"return": {}}


def test_unknown_command_with_qemu_qmp(server: QmpServer) -> None:
    async def body() -> None:
        client = await connected(server)
        try:
            with pytest.raises(ExecuteError) as info:
                await client.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            assert str(info.value) == "The command no-such-command has not been found"
            assert await client.execute("echo", {"still": "works"}) == {"still": "works"}
        finally:
            await client.disconnect()

    run(body())


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({"i": 1}, "Parameter 's' is missing"),
        ({"s": "x"}, "Parameter 'i' is missing"),
        ({"s": "x", "i": 1, "zzz": 0}, "Parameter 'zzz' is unexpected"),
        ({"s": 1, "i": 1}, "Invalid parameter type for 's', expected: string"),
        ({"s": "x", "i": "1"}, "Invalid parameter type for 'i', expected: integer"),
        ({"s": "x", "i": True}, "Invalid parameter type for 'i', expected: integer"),
        ({"s": "x", "i": 1.5}, "Invalid parameter type for 'i', expected: integer"),
        ({"s": "x", "i": None}, "Invalid parameter type for 'i', expected: integer"),
        ({"s": "x", "i": 1, "b": 1}, "Invalid parameter type for 'b', expected: boolean"),
        ({"s": "x", "i": 1, "n": False}, "Invalid parameter type for 'n', expected: number"),
        ({"s": "x", "i": 1, "n": "2"}, "Invalid parameter type for 'n', expected: number"),
        ({"s": "x", "i": 1, "d": []}, "Invalid parameter type for 'd', expected: object"),
        ({"s": "x", "i": 1, "l": {}}, "Invalid parameter type for 'l', expected: array"),
    ],
)
def test_argument_validation_texts(raw: Raw, arguments: dict[str, Any], desc: str) -> None:
    raw.negotiate()
    reply = raw.cmd({"execute": "typed", "arguments": arguments, "id": 9})
    assert reply == {"error": {"class": "GenericError", "desc": desc}, "id": 9}


def test_valid_arguments_reach_the_handler(server: QmpServer) -> None:
    args = {"s": "x", "i": -(2**63), "b": False, "n": 1, "d": {"k": 1}, "l": [1], "a": None}

    async def body() -> None:
        client = await connected(server)
        try:
            assert await client.execute("typed", args) == args
            assert await client.execute("typed", {"s": "", "i": 2**64 - 1, "n": 0.5}) == {
                "s": "",
                "i": 2**64 - 1,
                "n": 0.5,
            }
        finally:
            await client.disconnect()

    run(body())


def test_command_without_declared_arguments_rejects_any(raw: Raw) -> None:
    raw.negotiate()
    reply = raw.cmd({"execute": "nothing", "arguments": {"x": 1}})
    assert error_of(reply) == ("GenericError", "Parameter 'x' is unexpected")


def test_handler_errors(server: QmpServer) -> None:
    async def body() -> None:
        client = await connected(server)
        try:
            for cls in ["GenericError", "DeviceNotFound", "DeviceNotActive", "KVMMissingCap"]:
                with pytest.raises(ExecuteError) as info:
                    await client.execute("fail", {"class": cls, "desc": f"no {cls}"})
                assert (info.value.error_class, str(info.value)) == (cls, f"no {cls}")
            with pytest.raises(ExecuteError) as info:
                await client.execute("boom")
            assert (info.value.error_class, str(info.value)) == (
                "GenericError",
                "the handler blew up",
            )
            assert await client.execute("nothing") == {}  # the server survived
        finally:
            await client.disconnect()

    run(body())


def test_envelope_errors(raw: Raw) -> None:
    raw.negotiate()
    cases = [
        (b"[1, 2]", None, "QMP input must be a JSON object"),
        (b'"text"', None, "QMP input must be a JSON object"),
        (b'{"id": 3}', 3, "QMP input lacks member 'execute'"),
        (b'{"execute": 5, "id": 4}', 4, "QMP input member 'execute' must be a string"),
        (
            b'{"execute": "echo", "arguments": [1], "id": 5}',
            5,
            "QMP input member 'arguments' must be an object",
        ),
        (b'{"execute": "echo", "extra": 1, "id": 6}', 6, "QMP input member 'extra' is unexpected"),
        (b'{"exec-oob": "echo", "id": 7}', 7, "QMP input member 'exec-oob' is unexpected"),
    ]
    for data, request_id, desc in cases:
        raw.send(data + b"\n")
        reply = raw.read()
        assert error_of(reply) == ("GenericError", desc), data
        assert reply.get("id") == request_id


def test_malformed_json_then_valid_command(raw: Raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": }\n')
    assert raw.read() == {
        "error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}
    }
    raw.send(b'{"execute": "echo", "arguments": {"a": NaN}}{"execute": "echo", "id": 1}\n')
    assert error_of(raw.read())[1].startswith("JSON parse error, ")
    assert raw.read() == {"return": {}, "id": 1}
    raw.send(b"garbage\n")
    assert error_of(raw.read())[1].startswith("JSON parse error, ")
    assert raw.cmd({"execute": "echo", "arguments": {"ok": True}}) == {"return": {"ok": True}}


def test_control_character_resynchronises(raw: Raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "echo", "argu')  # abandoned half-way
    raw.send(b'\x1b{"execute": "echo", "id": 2}')
    assert raw.read() == {
        "error": {"class": "GenericError", "desc": "JSON parse error, stray '\x1b'"}
    }
    assert raw.read() == {"return": {}, "id": 2}


def test_request_split_across_two_sends(raw: Raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "echo", "argum')
    time.sleep(0.02)  # let the server read (and hold) the first half
    raw.send(b'ents": {"k": "v\xc3')  # and split inside a UTF-8 sequence
    time.sleep(0.02)
    raw.send(b'\xa9"}, "id": "split"}')  # no newline needed
    assert raw.read() == {"return": {"k": "v\u00e9"}, "id": "split"}


def test_two_requests_in_one_send(raw: Raw) -> None:
    raw.negotiate()
    raw.send(
        b'{"execute": "echo", "id": 1}{"execute": "nothing", "id": 2}\n{"execute": "nope", "id": 3}'
    )
    assert raw.read() == {"return": {}, "id": 1}
    assert raw.read() == {"return": {}, "id": 2}
    assert raw.read()["id"] == 3


def test_single_quoted_strings_as_in_qemu(raw: Raw) -> None:
    raw.send(b"{ 'execute': 'qmp_capabilities' }\n")
    assert raw.read() == {"return": {}}
    raw.send(b"{'execute': 'echo', 'arguments': {'s': 'it\\'s \"quoted\"'}}\n")
    assert raw.read() == {"return": {"s": 'it\'s "quoted"'}}


def test_oversized_request_drops_the_client(
    server: QmpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "MAX_MESSAGE_CHARS", 1000)
    raw = Raw(server)
    raw.send(b'{"execute": "echo", "arguments": {"x": "' + b"a" * 2000)
    reply = raw.read()
    assert reply["error"]["class"] == "GenericError"
    with pytest.raises((EOFError, ConnectionResetError)):
        raw.read()
    raw.close()
    assert Raw(server).cmd({"execute": "qmp_capabilities"}) == {"return": {}}


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


def test_events_only_after_negotiation(raw: Raw, server: QmpServer) -> None:
    server.emit_event("EARLY", {"n": 1})
    # Had the event been sent, it would arrive before this reply.
    assert error_of(raw.cmd({"execute": "echo"}))[0] == "CommandNotFound"
    raw.negotiate()
    before = time.time()
    server.emit_event("STOP")
    server.emit_event("MIGRATION", {"status": "active"})
    stop, migration = raw.read(), raw.read()
    assert stop["event"] == "STOP" and "data" not in stop  # no data: no member, as QEMU
    assert migration["event"] == "MIGRATION" and migration["data"] == {"status": "active"}
    ts = migration["timestamp"]
    assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000
    assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - before) < 5


def test_events_with_qemu_qmp_from_another_thread(server: QmpServer) -> None:
    async def body() -> None:
        client = await connected(server)
        try:
            emitter = threading.Thread(target=server.emit_event, args=("RESUME", {"from": "vcpu"}))
            emitter.start()
            event = await asyncio.wait_for(client.events.get(), timeout=WAIT_S)
            emitter.join(WAIT_S)
            assert event["event"] == "RESUME" and event["data"] == {"from": "vcpu"}
            assert event["timestamp"]["seconds"] > 0
        finally:
            await client.disconnect()

    run(body())


def test_client_that_stops_reading_is_dropped(
    server: QmpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "SEND_TIMEOUT_S", 0.1)
    stuck = Raw(server)  # accepted with the 0.1 s send limit
    stuck.negotiate()
    good = Raw(server)
    good.negotiate()
    wait_until(lambda: server.client_count == 2, "two clients")
    blob = "x" * 65536
    start = time.monotonic()
    for i in range(64):  # 4 MiB: far more than the socket buffers hold
        server.emit_event("BIG", {"i": i, "blob": blob})
        assert good.read()["data"]["i"] == i
    assert time.monotonic() - start < WAIT_S
    wait_until(lambda: server.client_count == 1, "the stuck client to be dropped")
    stuck.close()
    good.close()


def _pending_bytes(client: Raw) -> int:
    """Bytes the server has sent that this client has not read (FIONREAD)."""
    buf = fcntl.ioctl(client.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, sys.byteorder)


def test_clients_that_never_read_do_not_delay_commands(
    server: QmpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12 item 14: 8 negotiated clients that never read made one `stop` take 8 s."""
    caplog.set_level(logging.INFO, logger=server_mod.__name__)
    server.register("stop", lambda args: server.emit_event("STOP"))
    stuck = [Raw(server) for _ in range(8)]
    for client in stuck:
        client.negotiate()
    good = Raw(server)
    good.negotiate()
    wait_until(lambda: server.client_count == 9, "nine clients")
    try:
        # Fill the stuck clients' socket buffers: 2 MiB each, far more than a socket holds.
        blob = "x" * 65536
        for i in range(32):
            start = time.monotonic()
            server.emit_event("BIG", {"i": i, "blob": blob})
            assert time.monotonic() - start < 0.5, "emit_event waited for a client"
        wait_until(lambda: min(map(_pending_bytes, stuck)) > 65536, "full socket buffers")
        assert [good.read()["data"]["i"] for _ in range(32)] == list(range(32))
        # Commands while the stuck clients' writers wait in sendall() and then drop them.
        worst_s = 0.0
        for n in range(15):
            start = time.monotonic()
            good.send(json.dumps({"execute": "stop", "id": n}).encode())
            event, reply = good.read(), good.read()
            worst_s = max(worst_s, time.monotonic() - start)
            assert event["event"] == "STOP" and reply == {"return": {}, "id": n}
            time.sleep(0.1)
        assert worst_s < 2.0, f"a command waited {worst_s:.1f} s for clients that do not read"
        deadline = time.monotonic() + 3 * server_mod.SEND_TIMEOUT_S
        while server.client_count > 1:
            assert time.monotonic() < deadline, "the stuck clients were not dropped"
            time.sleep(0.01)
        dropped = [r for r in caplog.records if "disconnected: it is not reading" in r.message]
        assert len(dropped) == 8, [r.message for r in caplog.records]
        assert good.cmd({"execute": "echo", "arguments": {"still": 1}}) == {"return": {"still": 1}}
    finally:
        for client in [*stuck, good]:
            client.close()


def test_output_queue_limit_drops_a_client(
    server: QmpServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=server_mod.__name__)
    monkeypatch.setattr(server_mod, "MAX_QUEUED_BYTES", 1 << 20)
    stuck = Raw(server)
    stuck.negotiate()
    wait_until(lambda: server.client_count == 1, "the client")
    for i in range(64):  # 4 MiB while the writer is stuck in its first sendall()
        server.emit_event("BIG", {"i": i, "blob": "x" * 65536})
    wait_until(lambda: server.client_count == 0, "the client to be dropped")
    assert any("bytes are waiting for it" in r.message for r in caplog.records)
    stuck.close()


# ---------------------------------------------------------------------------
# Concurrency and lifecycle
# ---------------------------------------------------------------------------


def test_two_clients_at_once(server: QmpServer) -> None:
    release = threading.Event()
    server.register("wait", lambda args: {"released": release.wait(WAIT_S)})

    async def body() -> None:
        first, second = await connected(server), await connected(server)
        try:
            waiting = asyncio.ensure_future(first.execute("wait"))
            # The second client is served while the first one's command blocks.
            assert await second.execute("echo", {"who": "second"}) == {"who": "second"}
            assert not waiting.done()
            release.set()
            assert await waiting == {"released": True}
            assert await first.execute("echo", {"who": "first"}) == {"who": "first"}
        finally:
            await first.disconnect()
            await second.disconnect()

    run(body())


def test_tcp_port_zero_and_qemu_qmp(tcp_server: QmpServer) -> None:
    addr = parse_address(tcp_server.address_str)
    assert addr.host == "127.0.0.1" and addr.port > 0

    async def body() -> None:
        client = await connected(tcp_server)
        try:
            assert await client.execute("echo", {"over": "tcp"}) == {"over": "tcp"}
        finally:
            await client.disconnect()

    run(body())
    raw = Raw(tcp_server)
    raw.negotiate()
    raw.close()


def test_close_disconnects_clients(sock_path: Path) -> None:
    srv = make_server(f"unix:{sock_path}")
    srv.start()
    raw = Raw(srv)
    raw.negotiate()
    start = time.monotonic()
    srv.close()
    assert time.monotonic() - start < WAIT_S
    with pytest.raises((EOFError, ConnectionResetError)):
        raw.read()
    raw.close()
    assert not sock_path.exists()
    srv.close()  # twice is fine


def test_reply_of_a_command_that_closes_the_server_is_sent(sock_path: Path) -> None:
    srv = make_server(f"unix:{sock_path}")
    srv.register("quit", lambda args: srv.close())  # as a VMM's quit may do
    srv.start()
    raw = Raw(srv)
    raw.negotiate()
    assert raw.cmd({"execute": "quit", "id": "bye"}) == {"return": {}, "id": "bye"}
    with pytest.raises((EOFError, ConnectionResetError)):
        raw.read()
    raw.close()
    assert not sock_path.exists()


def test_register_rejects_duplicates(server: QmpServer) -> None:
    with pytest.raises(ValueError, match="already registered"):
        server.register("echo", lambda args: None)
    with pytest.raises(ValueError, match="already registered"):
        server.register("qmp_capabilities", lambda args: None)
    with pytest.raises(ValueError, match="error class"):
        QmpError("NoSuchClass", "x")


# ---------------------------------------------------------------------------
# The executor hook: state changes on one control thread, queries concurrent
# ---------------------------------------------------------------------------


class ControlThread:
    """A real executor: one thread draining a queue, as a VMM's control loop does."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self.thread.start()

    def __call__(self, fn: Any) -> Any:
        done, box = threading.Event(), {}
        self._queue.put((fn, done, box))
        assert done.wait(5 * WAIT_S), "the control thread did not run the command"
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, done, box = item
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed back to the caller, as the hook requires
                box["error"] = exc
            done.set()

    def close(self) -> None:
        self._queue.put(None)
        self.thread.join(WAIT_S)


@pytest.fixture
def control() -> Iterator[ControlThread]:
    executor = ControlThread()
    yield executor
    executor.close()


def test_state_changes_run_on_the_executor_one_at_a_time(
    sock_path: Path, control: ControlThread
) -> None:
    ran: list[tuple[str, str]] = []  # (command, thread name)
    active, overlaps = [0], [0]
    lock = threading.Lock()

    def change(args: dict[str, Any]) -> dict[str, Any]:
        with lock:
            active[0] += 1
            overlaps[0] += active[0] > 1
        time.sleep(0.005)  # wide enough for a second command to land inside
        with lock:
            active[0] -= 1
            ran.append(("change", threading.current_thread().name))
        return {"n": args["n"]}

    def peek(args: dict[str, Any]) -> dict[str, Any]:
        ran.append(("peek", threading.current_thread().name))
        return {}

    srv = QmpServer(f"unix:{sock_path}", executor=control)
    srv.register("change", change, args={"n": ArgSpec("int")})
    srv.register("peek", peek, query=True)
    srv.register("fail", _fail, args={"class": ArgSpec("str"), "desc": ArgSpec("str")})
    srv.register("boom", _boom)
    with srv:
        clients = [Raw(srv) for _ in range(4)]
        for client in clients:
            client.negotiate()

        def hammer(client: Raw, results: list[dict[str, Any]]) -> None:
            for n in range(10):
                results.append(client.cmd({"execute": "change", "arguments": {"n": n}}))
                results.append(client.cmd({"execute": "peek"}))

        results: list[list[dict[str, Any]]] = [[] for _ in clients]
        threads = [
            threading.Thread(target=hammer, args=(c, r))
            for c, r in zip(clients, results, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10 * WAIT_S)
        for replies in results:
            assert replies == [r for n in range(10) for r in ({"return": {"n": n}}, {"return": {}})]
        assert overlaps == [0], "two state-changing commands ran at the same time"
        assert {name for what, name in ran if what == "change"} == {"control"}
        peek_threads = {name for what, name in ran if what == "peek"}
        assert len(peek_threads) == 4 and all(n.startswith("qmp-client") for n in peek_threads)
        # Errors raised on the control thread reach the client as they would directly.
        raw = clients[0]
        failed = raw.cmd({"execute": "fail", "arguments": {"class": "DeviceNotFound", "desc": "x"}})
        assert error_of(failed) == ("DeviceNotFound", "x")
        assert error_of(raw.cmd({"execute": "boom"})) == ("GenericError", "the handler blew up")
        for client in clients:
            client.close()


def test_queries_and_negotiation_do_not_wait_for_a_busy_executor(
    sock_path: Path, control: ControlThread
) -> None:
    release = threading.Event()
    srv = QmpServer(f"unix:{sock_path}", executor=control)
    srv.register("hold", lambda args: {"released": release.wait(5 * WAIT_S)})
    srv.register("peek", lambda args: {"peeked": True}, query=True)
    with srv:
        busy = Raw(srv)
        busy.negotiate()
        busy.send(b'{"execute": "hold", "id": "held"}')
        # The control thread is now inside "hold"; a new client is still served.
        other = Raw(srv)
        other.negotiate()  # qmp_capabilities
        assert other.cmd({"execute": "query-version"})["return"]["qemu"]["major"] == 9
        assert {"name": "hold"} in other.cmd({"execute": "query-commands"})["return"]
        assert other.cmd({"execute": "peek"}) == {"return": {"peeked": True}}
        with pytest.raises(TimeoutError):
            busy.read()  # "hold" has not answered: it really was holding the executor
        release.set()
        assert busy.read() == {"return": {"released": True}, "id": "held"}
        busy.close()
        other.close()


def test_quit_on_the_executor_that_closes_the_server_still_replies(
    sock_path: Path, control: ControlThread
) -> None:
    srv = QmpServer(f"unix:{sock_path}", executor=control)
    srv.register("quit", lambda args: srv.close())
    srv.start()
    raw = Raw(srv)
    raw.negotiate()
    start = time.monotonic()
    assert raw.cmd({"execute": "quit", "id": "bye"}) == {"return": {}, "id": "bye"}
    assert time.monotonic() - start < WAIT_S  # close() did not wait for this very client
    with pytest.raises((EOFError, ConnectionResetError)):
        raw.read()
    raw.close()
    assert not sock_path.exists()


# ---------------------------------------------------------------------------
# The dispatch core without sockets
# ---------------------------------------------------------------------------


def test_session_without_sockets() -> None:
    dispatcher = QmpDispatcher(version=(1, 2, 3), package="core")
    dispatcher.register(
        "add", lambda a: a["x"] + a["y"], args={"x": ArgSpec("int"), "y": ArgSpec("int")}
    )
    session = dispatcher.session()
    assert dispatcher.greeting()["QMP"]["version"]["qemu"] == {"major": 1, "minor": 2, "micro": 3}
    replies = list(session.feed(b'{"execute": "qmp_capabilities"}{"execute": "add", '))
    assert replies == [{"return": {}}]
    replies = list(session.feed(b'"arguments": {"x": 2, "y": 3}, "id": [1]}\n'))
    assert replies == [{"return": 5, "id": [1]}]
    assert session.execute({"execute": "add", "arguments": {"x": 1}}) == {
        "error": {"class": "GenericError", "desc": "Parameter 'y' is missing"}
    }


def test_dispatcher_hands_non_queries_to_its_executor() -> None:
    calls: list[str] = []

    def executor(fn: Any) -> Any:
        calls.append("executor")
        return fn()

    dispatcher = QmpDispatcher(executor=executor)
    dispatcher.register("set", lambda a: "set")
    dispatcher.register("query-x", lambda a: "read", query=True)
    session = dispatcher.session()
    assert session.execute({"execute": "qmp_capabilities"}) == {"return": {}}
    assert session.execute({"execute": "query-version"})["return"]["qemu"]["major"] == 9
    assert session.execute({"execute": "query-x"}) == {"return": "read"}
    assert calls == []  # negotiation and queries never go through the executor
    assert session.execute({"execute": "set"}) == {"return": "set"}
    assert calls == ["executor"]


def test_session_nesting_limit() -> None:
    session = QmpDispatcher().session()
    replies = list(session.feed(b"[" * 2000 + b"]" * 2000 + b'{"execute": "x"}'))
    assert replies[0]["error"]["desc"] == "JSON nesting depth limit exceeded"
    assert replies[1]["error"]["class"] == "CommandNotFound"
    assert len(replies) == 2


# ---------------------------------------------------------------------------
# pyvmm.monitor.client
# ---------------------------------------------------------------------------


def test_qmp_call(server: QmpServer) -> None:
    addr = server.address_str
    assert qmp_call(addr, "echo", {"a": 1}, timeout_s=WAIT_S) == {"a": 1}
    assert qmp_call(addr, "query-version", timeout_s=WAIT_S)["package"] == "pyvmm-test"
    with pytest.raises(QmpCommandError) as info:
        qmp_call(addr, "fail", {"class": "DeviceNotFound", "desc": "no disk"}, timeout_s=WAIT_S)
    assert (info.value.error_class, info.value.desc) == ("DeviceNotFound", "no disk")


def test_qmp_call_connect_error(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'absent.sock'}"
    with pytest.raises(QmpConnectError) as info:
        qmp_call(address, "query-version", timeout_s=WAIT_S)
    message = str(info.value)
    assert address in message and "\n" not in message


def test_sync_qmp_commands_and_events(server: QmpServer) -> None:
    with SyncQmp(server.address_str, timeout_s=WAIT_S) as qmp:
        assert qmp.greeting["QMP"]["capabilities"] == []
        assert qmp.cmd("echo", **{"cpu-index": 0}) == {"cpu-index": 0}
        server.emit_event("A", {"n": 1})
        server.emit_event("B")
        server.emit_event("A", {"n": 2})
        assert qmp.wait_event("B", timeout_s=WAIT_S)["event"] == "B"
        wait_until(lambda: len(qmp._events) == 2, "the two A events")
        assert [e["data"]["n"] for e in qmp.events()] == [1, 2]
        assert qmp.events() == []
        with pytest.raises(QmpTimeoutError):
            qmp.wait_event("NEVER", timeout_s=0.05)


def test_every_query_command_is_registered_as_a_query(sock_path: Path) -> None:
    """Queries run concurrently on the client's thread; everything else goes to the
    executor. Registration only stores the handlers, so a namespace holding the server
    stands in for the VMM here."""
    from pyvmm.monitor.process import register_commands

    srv = QmpServer(f"unix:{sock_path}")
    vmm: Any = SimpleNamespace(qmp=srv)
    register_commands(vmm)
    names = srv.dispatcher.command_names()
    names.remove("qmp_capabilities")
    # x-query-colo-stats: the COLO issue's name for pyvmm's own COLO statistics
    queries = {n for n in names if n.startswith(("query-", "x-pyvmm-query-", "x-query-"))}
    assert {"query-status", "query-migrate", "x-pyvmm-query-memory-hash"} <= queries
    assert {"query-colo-status", "x-query-colo-stats"} <= queries
    for name in names:
        command = srv.dispatcher.lookup(name)
        assert command is not None and command.query == (name in queries), name
