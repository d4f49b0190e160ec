"""The port-I/O bus and pyvmm's two devices: a serial transmitter and a control port.

Ports (documented in docs/machine.md):
- 0x3f8-0x3ff  COM1. Only transmit is modelled: every byte written to 0x3f8 goes
  to the writing vCPU's own line buffer, so lines from different vCPUs never
  interleave; a complete line is stamped with host time and written out. The
  status registers read as "transmitter empty, no interrupt" so a polling
  driver never waits.
- 0x501  exit: a write ends the VM; the process exit code is the value & 0xff.
  (QEMU's isa-debug-exit at the same port exits with (value << 1) | 1.)
- 0x504  sleep: a 32-bit read returns "PYMM" (presence); a write of N makes the
  writing vCPU sleep N microseconds on the host, releasing its CPU. Guests use
  it to pace themselves; on QEMU the port is absent and they spin instead.
Any other port: writes are ignored and reads return all ones, each port logged once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol

log = logging.getLogger(__name__)

COM1_BASE = 0x3F8
EXIT_PORT = 0x501
SLEEP_PORT = 0x504
SLEEP_PORT_SIGNATURE = b"PYMM"
MAX_SLEEP_US = 1_000_000
MAX_LINE_BYTES = 4096


class PortUser(Protocol):
    """What a device needs from the vCPU that touched it."""

    index: int

    def sleep_us(self, microseconds: int, kind: str | None = None) -> None: ...


class PortDevice(Protocol):
    def io_out(self, vcpu: PortUser, port: int, data: bytes) -> None: ...

    def io_in(self, vcpu: PortUser, port: int, size: int) -> bytes: ...


_UNKNOWN = object()  # "not looked up yet" in PortBus's cache (None means "no device")


class PortBus:
    """Maps port ranges to devices; unknown ports are logged once each."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, PortDevice]] = []
        self._cache: dict[int, PortDevice | None] = {}  # port -> device, filled on first use
        self._logged: set[int] = set()

    def register(self, first: int, count: int, device: PortDevice) -> None:
        self._ranges.append((first, first + count, device))
        self._cache.clear()

    def _find(self, port: int) -> PortDevice | None:
        try:
            return self._cache[port]
        except KeyError:
            found = next((dev for first, end, dev in self._ranges if first <= port < end), None)
            self._cache[port] = found
            return found

    def _log_unhandled(self, port: int, what: str) -> None:
        if port not in self._logged:  # only the first time: the set lookup is the whole cost
            self._logged.add(port)
            log.info("unhandled port 0x%x %s (logged once per port)", port, what)

    def io_out(self, vcpu: PortUser, port: int, data: bytes) -> None:
        device = self._cache.get(port, _UNKNOWN)
        if device is _UNKNOWN:
            device = self._find(port)
        if device is None:
            self._log_unhandled(port, "write ignored")
        else:
            device.io_out(vcpu, port, data)

    def io_in(self, vcpu: PortUser, port: int, size: int) -> bytes:
        device = self._cache.get(port, _UNKNOWN)
        if device is _UNKNOWN:
            device = self._find(port)
        if device is None:
            self._log_unhandled(port, "read as all ones")
            return b"\xff" * size
        return device.io_in(vcpu, port, size)


@dataclass(frozen=True)
class SerialLine:
    wall_time_s: float  # time.time() when the line was completed
    vcpu: int
    text: str


class SerialConsole:
    """COM1 transmit side with one line buffer per vCPU.

    Output lines look like `[1763900000.123456] text`: host wall-clock time in
    seconds, so lines from a migration's source and destination share one clock.
    """

    def __init__(self, out: IO[str] | None = None, keep_lines: int = 10000) -> None:
        self.out = out if out is not None else sys.stdout
        self.buffers: dict[int, bytearray] = {}
        self.lines: deque[SerialLine] = deque(maxlen=keep_lines)
        self.listeners: list[Callable[[SerialLine], None]] = []
        self._lock = threading.Lock()
        self._regs = {1: 0, 3: 0, 4: 0, 7: 0}  # IER, LCR, MCR, SCR: stored, not acted on

    def io_out(self, vcpu: PortUser, port: int, data: bytes) -> None:
        reg = port - COM1_BASE
        if reg == 0 and not self._regs[3] & 0x80:  # THR (DLAB clear)
            self.feed(vcpu.index, data)
        elif reg in self._regs and data:
            self._regs[reg] = data[0]

    def io_in(self, vcpu: PortUser, port: int, size: int) -> bytes:
        reg = port - COM1_BASE
        value = {2: 0x01, 5: 0x60, 6: 0xB0}.get(reg, self._regs.get(reg, 0))
        return bytes([value]) + b"\0" * (size - 1)

    def feed(self, vcpu: int, data: bytes) -> None:
        buf = self.buffers.setdefault(vcpu, bytearray())
        *complete, tail = data.split(b"\n")
        for chunk in complete:
            buf += chunk
            self._emit(vcpu, buf)
            buf.clear()
        buf += tail
        if len(buf) >= MAX_LINE_BYTES:  # a guest that never ends its line
            self._emit(vcpu, buf)
            buf.clear()

    def _emit(self, vcpu: int, raw: bytearray) -> None:
        line = SerialLine(time.time(), vcpu, raw.replace(b"\r", b"").decode("utf-8", "replace"))
        with self._lock:
            self.lines.append(line)
            try:
                self.out.write(f"[{line.wall_time_s:.6f}] {line.text}\n")
                self.out.flush()
            except (OSError, ValueError) as exc:  # a closed pipe must not kill a vCPU
                log.warning("serial output failed: %s", exc)
        for listener in list(self.listeners):
            listener(line)

    def flush(self) -> None:
        """Emit unfinished lines (at VM end)."""
        for vcpu, buf in self.buffers.items():
            if buf:
                self._emit(vcpu, buf)
                buf.clear()

    def get_state(self) -> dict:
        return {
            "buffers": {str(k): bytes(v).hex() for k, v in self.buffers.items() if v},
            "regs": dict(self._regs),
        }

    def set_state(self, state: dict) -> None:
        self.buffers = {int(k): bytearray.fromhex(v) for k, v in state["buffers"].items()}
        self._regs = {int(k): int(v) for k, v in state["regs"].items()}


class ControlPort:
    """Ports 0x501 (exit) and 0x504 (sleep / presence)."""

    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self.on_exit = on_exit  # (vcpu index, exit code)

    def io_out(self, vcpu: PortUser, port: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if port == EXIT_PORT:
            self.on_exit(vcpu.index, value & 0xFF)
        elif port == SLEEP_PORT:
            vcpu.sleep_us(min(value, MAX_SLEEP_US), "guest sleep")

    def io_in(self, vcpu: PortUser, port: int, size: int) -> bytes:
        if port == SLEEP_PORT:
            return (SLEEP_PORT_SIGNATURE * 2)[:size]
        return b"\xff" * size
