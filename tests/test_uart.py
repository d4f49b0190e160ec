"""COM2 (machine/uart.py, uartsock.py): the registers, the queues and their stream
positions, the state and its rollback, and a real guest (guest/colosvc.c) serving
requests over a real socket, also across a migration with a request left in the device."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from vmproc import vm_process, wait_migration

from pyvmm.machine import uart as uart_module
from pyvmm.machine.errors import MachineError
from pyvmm.machine.state import _check_serial2
from pyvmm.machine.uart import COM2_BASE, ServiceUart
from pyvmm.machine.uartsock import parse_uart_address


class Cpu:
    index = 0

    def sleep_us(self, us: int) -> None:
        pass


CPU = Cpu()


def rd(uart: ServiceUart, reg: int) -> int:
    return uart.io_in(CPU, COM2_BASE + reg, 1)[0]


def wr(uart: ServiceUart, reg: int, value: int) -> None:
    uart.io_out(CPU, COM2_BASE + reg, bytes([value]))


def test_registers_like_a_16550() -> None:
    uart = ServiceUart()
    assert rd(uart, 5) == 0x60  # LSR: nothing received, transmitter empty
    assert rd(uart, 2) == 0x01  # IIR: no interrupt pending
    assert rd(uart, 0) == 0  # RBR while empty: 0 on pyvmm (the bulk read relies on it)
    uart.receive(b"ab")
    assert rd(uart, 5) & 0x01 and rd(uart, 0) == ord("a") and rd(uart, 0) == ord("b")
    assert not rd(uart, 5) & 0x01
    wr(uart, 3, 0x80)  # DLAB: divisor latch at 0 and 1
    wr(uart, 0, 0x0C)
    wr(uart, 1, 0x00)
    assert (rd(uart, 0), rd(uart, 1)) == (0x0C, 0)
    wr(uart, 3, 0x03)
    wr(uart, 7, 0x5A)
    assert rd(uart, 7) == 0x5A and rd(uart, 3) == 0x03
    assert uart.get_state()["regs"] == {"ier": 0, "lcr": 3, "mcr": 0, "scr": 0x5A,
                                         "dll": 0x0C, "dlm": 0}  # fmt: skip


def test_output_leaves_only_while_the_machine_runs() -> None:
    uart = ServiceUart()
    uart.set_running(False)
    uart.io_out(CPU, COM2_BASE, b"1 ok\n")
    assert uart.take_tx(0.01) == b""  # stopped: it stays in the state
    assert uart.get_state()["tx"] == b"1 ok\n".hex()
    uart.set_running(True)
    assert uart.take_tx(0.01) == b"1 ok\n"
    assert uart.stream_positions() == {"tx": 5, "sent": 5, "rx": 0}


def test_a_migration_destination_continues_with_its_own_stream() -> None:
    source, destination = ServiceUart(), ServiceUart()
    source.receive(b"1 inc\n")
    destination.set_state(source.get_state())
    destination.receive(b"2 inc\n")  # a new connection's first bytes: all kept
    assert [rd(destination, 0) for _ in range(12)] == list(b"1 inc\n2 inc\n")
    assert destination.rx_end == 12


def test_an_aligned_secondary_takes_back_what_it_read_ahead() -> None:
    primary, secondary = ServiceUart(), ServiceUart()
    secondary.aligned = True
    primary.receive(b"1 inc\n")  # the primary has read 6 bytes of the stream
    secondary.receive(b"1 inc\n2 inc\n")  # the secondary 12, and its guest took them
    for _ in range(12):
        rd(secondary, 0)
    secondary.set_state(primary.get_state())  # a checkpoint from the primary
    assert [rd(secondary, 0) for _ in range(12)] == list(b"1 inc\n2 inc\n")
    assert secondary.rx_end == 12


def test_an_aligned_secondary_skips_what_the_state_already_holds() -> None:
    primary, secondary = ServiceUart(), ServiceUart()
    secondary.aligned = True
    primary.receive(b"1 inc\n2 inc\n")
    secondary.set_state(primary.get_state())  # it had read nothing yet
    secondary.receive(b"1 inc\n2 inc\n3 inc\n")  # the same stream arrives (a replay)
    assert [rd(secondary, 0) for _ in range(18)] == list(b"1 inc\n2 inc\n3 inc\n")
    assert rd(secondary, 0) == 0


def test_a_rollback_beyond_the_kept_log_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uart_module, "LOG_MAX_BYTES", 100)  # instead of 16 MiB
    primary, secondary = ServiceUart(), ServiceUart()
    secondary.aligned = True
    for _ in range(3):
        assert secondary.receive(b"x" * 60) == 60
        for _ in range(60):  # its guest reads it
            rd(secondary, 0)
    with pytest.raises(MachineError, match="kept bytes only from 80 on"):
        secondary.set_state(primary.get_state())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rx": "6"}, "not lower-case hex"),
        ({"rx": "AB"}, "not lower-case hex"),
        ({"tx": "00" * (65 << 10)}, "at most 65536 bytes"),
        ({"rx_end": 0, "rx": "0101"}, "more bytes than its stream offset"),
        ({"tx_end": -1}, "out of range"),
        ({"regs": {"ier": 256, "lcr": 0, "mcr": 0, "scr": 0, "dll": 0, "dlm": 0}},
         "out of range 0..255"),
        ({"extra": 1}, "unknown"),
    ],
)  # fmt: skip
def test_hostile_com2_states_are_refused(change: dict, message: str) -> None:
    state = ServiceUart().get_state() | change
    with pytest.raises(MachineError, match=message):
        _check_serial2(json.loads(json.dumps(state)), "devices.serial2")


def test_addresses() -> None:
    assert str(parse_uart_address("unix:/tmp/a,server")) == "unix:/tmp/a,server"
    assert parse_uart_address("tcp:127.0.0.1:5").port == 5
    for bad in ("unix:", "tcp:host", "tcp:h:99999", "serial:x"):
        with pytest.raises(ValueError, match="invalid --serial2 address"):
            parse_uart_address(bad)


# --- real guests ---------------------------------------------------------------------------


def ask(conn: socket.socket, line: bytes) -> bytes:
    conn.sendall(line + b"\n")
    return read_line(conn)


def read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(1)
        assert chunk, "the guest's COM2 closed"
        buf += chunk
    return buf.strip()


@pytest.mark.kvm
def test_colosvc_serves_on_com2(tmp_path: Path) -> None:
    sock = tmp_path / "com2.sock"
    args = ["colosvc", "--mem", "32M", "--append", "mb=1", "--serial2", f"unix:{sock},server"]
    with vm_process(tmp_path, "vm", args) as vm:
        vm.wait_line("colosvc ready", 20)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(sock))
            conn.settimeout(10)
            assert ask(conn, b"1 inc") == b"1 count=1"
            assert ask(conn, b"2 set k 42") == b"2 ok"
            assert ask(conn, b"3 get k") == b"3 k=42"
            assert ask(conn, b"4 time").startswith(b"4 tsc=")
            assert ask(conn, b"5 verify") == b"5 verify ok pages=256"
            assert ask(conn, b"6 bogus") == b"6 error unknown op"


@pytest.mark.kvm
def test_a_request_left_in_com2_migrates_with_the_state(tmp_path: Path) -> None:
    """The source is stopped with a request in its receive queue; the destination's
    guest answers it: bytes in the device are machine state."""
    src_sock, dst_sock = tmp_path / "src2.sock", tmp_path / "dst2.sock"
    peers = []
    for path in (src_sock, dst_sock):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen(1)
        peers.append(listener)
    src_args = ["colosvc", "--mem", "32M", "--append", "mb=1", "--serial2", f"unix:{src_sock}"]
    dst_args = ["--mem", "32M", "--incoming", f"unix:{tmp_path}/mig.sock", "--serial2",
                f"unix:{dst_sock}"]  # fmt: skip
    try:
        with (
            vm_process(tmp_path, "dst", dst_args) as dst,
            vm_process(tmp_path, "src", src_args) as src,
        ):
            src_conn, _ = peers[0].accept()
            dst_conn, _ = peers[1].accept()
            src.wait_line("colosvc ready", 20)
            src_conn.settimeout(10)
            dst_conn.settimeout(10)
            assert ask(src_conn, b"1 inc") == b"1 count=1"
            src.cmd("stop")
            src_conn.sendall(b"2 inc\n")
            time.sleep(0.3)  # it lands in the stopped guest's receive queue
            src.cmd("migrate", uri=f"unix:{tmp_path}/mig.sock")
            assert wait_migration(src, 30)["status"] == "completed"
            dst.cmd("cont")
            assert read_line(dst_conn) == b"2 count=2"
            assert ask(dst_conn, b"3 verify") == b"3 verify ok pages=256"
            _no_answer(src_conn)
            for conn in (src_conn, dst_conn):
                conn.close()
    finally:
        for listener in peers:
            listener.close()


def _no_answer(conn: socket.socket) -> None:
    conn.settimeout(0.3)
    with pytest.raises(TimeoutError):
        conn.recv(4096)  # the source never answered: it stopped for good
