"""COM2: a 16550-style UART whose host side is a byte stream, for services a guest offers.

COM1 (devices.py) is the console: transmit only, one line buffer per vCPU. COM2 is a
two-way device for a guest that serves requests (guest/colosvc.c): bytes from the host
queue in a receive FIFO that the guest reads through RBR, polling LSR's data-ready bit;
bytes the guest writes to THR queue for the host. The host side is a socket
(uartsock.py). Registers follow the 16550 (docs/machine.md): RBR/THR 0, IER 1,
IIR/FCR 2, LCR 3, MCR 4, LSR 5, MSR 6, SCR 7; DLL/DLM at 0/1 while LCR's DLAB is set.
There are no interrupts (pyvmm's start-all VMs have no interrupt controller): IIR always
reads "none pending", and a guest polls.

What makes it more than a port-I/O toy is that its state is part of the machine state
(state.py, "serial2"), so a checkpoint or a migration carries the bytes queued in both
directions, and a checkpoint can be rolled back. Two stream positions make that exact:

- rx_end: the offset, in the host's byte stream, of the end of the receive FIFO;
- tx_end: how many bytes the guest has written, in the same sense.

When two VMs are fed the same stream (COLO's primary and secondary get the same
requests; `aligned` is set on the secondary), both number it the same way, so a FIFO
restored from the other VM lines up with this one's socket: bytes this side read
beyond rx_end are taken again from `_log` (kept since the last restore), and bytes it
has not read yet up to rx_end are skipped when they come. A migration's destination
(not aligned) has a stream of its own: its restored FIFO simply continues with it.

The host side sends only while the machine runs (`set_running`): bytes a stopped guest
wrote stay queued, in the state. A migration's source, stopped for good after its commit,
therefore never sends what its destination will send; a checkpoint's primary sends them
after it resumes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.machine.devices import PortUser
from pyvmm.machine.errors import MachineError

log = logging.getLogger(__name__)

COM2_BASE = 0x2F8
PORTS = 8
FIFO_MAX_BYTES = 64 << 10  # each direction; the host stops reading when the guest lags
LOG_MAX_BYTES = 16 << 20  # received bytes kept for a rollback (see set_state)

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_DR = 0x01  # data ready
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty
IIR_NONE = 0x01  # no interrupt pending
MSR_LINES = 0xB0  # DCD, DSR, CTS: "a peer is there"
STATE_REGS = ("ier", "lcr", "mcr", "scr", "dll", "dlm")


class ServiceUart:
    """The guest-facing UART and its two queues. Thread-safe: vCPU threads, the host
    side's reader and writer threads and the state capture meet under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._rx = bytearray()
        self.rx_end = 0
        self._tx = bytearray()
        self.tx_end = 0
        self._regs = {name: 0 for name in STATE_REGS}
        self._running = True
        self._closed = False
        # Host side bookkeeping, never part of the state:
        self.host_rx = 0  # bytes read from the host stream by this process
        self.host_tx = 0  # bytes taken by the host side (sent or being sent)
        self._skip_until = 0  # stream offset: drop received bytes below it
        self._log = bytearray()  # received bytes from _log_base on
        self._log_base = 0
        self.aligned = False  # fed the same stream as the VM states come from (COLO)
        self.wake: Callable[[], None] = lambda: None  # the machine wakes sleeping vCPUs

    # --- the guest's side (vCPU threads) -------------------------------------------------------

    def io_out(self, vcpu: PortUser, port: int, data: bytes) -> None:
        reg = port - COM2_BASE
        with self._lock:
            dlab = self._regs["lcr"] & LCR_DLAB
            if reg == RBR_THR and not dlab:
                room = FIFO_MAX_BYTES - len(self._tx)
                if len(data) > room:  # a 16550 drops what its FIFO cannot hold
                    log.warning("COM2: transmit FIFO full, %d bytes dropped", len(data) - room)
                    data = data[:room]
                self._tx += data
                self.tx_end += len(data)
                self._lock.notify_all()
            elif reg == RBR_THR:
                self._regs["dll"] = data[0]
            elif reg == IER:
                self._regs["dlm" if dlab else "ier"] = data[0] & (0xFF if dlab else 0x0F)
            elif reg == LCR:
                self._regs["lcr"] = data[0]
            elif reg == MCR:
                self._regs["mcr"] = data[0] & 0x1F
            elif reg == SCR:
                self._regs["scr"] = data[0]
            # FCR (2), LSR (5), MSR (6): writes ignored

    def io_in(self, vcpu: PortUser, port: int, size: int) -> bytes:
        reg = port - COM2_BASE
        with self._lock:
            dlab = self._regs["lcr"] & LCR_DLAB
            if reg == RBR_THR and not dlab:
                value = 0
                if self._rx:
                    value = self._rx.pop(0)
                    self._lock.notify_all()  # room for the reader again
            elif reg == RBR_THR:
                value = self._regs["dll"]
            elif reg == IER:
                value = self._regs["dlm" if dlab else "ier"]
            elif reg == IIR_FCR:
                value = IIR_NONE
            elif reg == LSR:
                value = (LSR_DR if self._rx else 0) | (
                    LSR_THRE | LSR_TEMT if len(self._tx) < FIFO_MAX_BYTES else 0
                )
            elif reg == MSR:
                value = MSR_LINES
            else:
                value = self._regs["lcr" if reg == LCR else "mcr" if reg == MCR else "scr"]
        return bytes([value]) + b"\0" * (size - 1)

    # --- the host's side -----------------------------------------------------------------------

    def receive(self, data: bytes, timeout_s: float = 1.0) -> int:
        """Host bytes for the guest, in stream order; waits while the FIFO is full. Returns
        how many bytes it took (fewer after timeout_s, or 0 once closed)."""
        with self._lock:
            if not self._lock.wait_for(
                lambda: self._closed or len(self._rx) < FIFO_MAX_BYTES, timeout_s
            ):
                return 0
            if self._closed:
                return 0
            data = data[: FIFO_MAX_BYTES - len(self._rx)]
            start = self.host_rx
            self.host_rx += len(data)
            if self.aligned:  # only an aligned side ever takes bytes back from the log
                self._log += data
            else:
                self._log_base = self.host_rx
            if len(self._log) > LOG_MAX_BYTES:
                drop = len(self._log) - LOG_MAX_BYTES
                del self._log[:drop]
                self._log_base += drop
            keep = data
            if self._skip_until > start:  # the restored FIFO holds these already
                keep = data[min(len(data), self._skip_until - start) :]
            if keep:
                self._rx += keep
                self.rx_end += len(keep)
        if keep:
            self.wake()
        return len(data)

    def take_tx(self, timeout_s: float) -> bytes:
        """The next bytes to send (empty after timeout_s, or once closed); only while the
        machine runs, so a stopped guest's output stays in its state."""
        with self._lock:
            self._lock.wait_for(lambda: self._closed or (self._tx and self._running), timeout_s)
            if self._closed or not self._running or not self._tx:
                return b""
            chunk = bytes(self._tx)
            self._tx.clear()
            self.host_tx += len(chunk)
            self._lock.notify_all()
            return chunk

    def set_running(self, running: bool) -> None:
        """The machine's vCPUs run (True) or are stopped (False)."""
        with self._lock:
            self._running = running
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def stream_positions(self) -> dict[str, int]:
        """Where this process stands in its host streams (pyvmm's own, for COLO):
        tx: every byte the guest wrote while this process owned the device, sent or queued;
        sent: the part handed to the host side; rx: bytes read from the host stream."""
        with self._lock:
            return {"tx": self.host_tx + len(self._tx), "sent": self.host_tx, "rx": self.host_rx}

    # --- state ---------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rx": self._rx.hex(),
                "rx_end": self.rx_end,
                "tx": self._tx.hex(),
                "tx_end": self.tx_end,
                "regs": dict(self._regs),
            }

    def set_state(self, state: dict[str, Any]) -> None:
        """Load a captured state (checked by state.py). When aligned, line the receive
        FIFO up with this side's own host stream: the state's FIFO ends at rx_end; bytes
        this process read beyond that are appended from the log, and bytes it has yet to
        read up to rx_end will be dropped when they arrive (both VMs read one stream)."""
        with self._lock:
            rx = bytearray.fromhex(state["rx"])
            end = int(state["rx_end"])
            here = self.host_rx
            if self.aligned and here > end:
                if end < self._log_base:
                    raise MachineError(
                        f"COM2: the restored state ends at byte {end} of the host stream, "
                        f"but this side kept bytes only from {self._log_base} on"
                    )
                rx += self._log[end - self._log_base : here - self._log_base]
                end = here
            elif self.aligned:
                self._skip_until = end
            floor = min(int(state["rx_end"]), here) if self.aligned else here
            if floor > self._log_base:  # later restores never go back before this one
                del self._log[: floor - self._log_base]
                self._log_base = floor
            self._rx = rx
            self.rx_end = end
            self._tx = bytearray.fromhex(state["tx"])
            self.tx_end = int(state["tx_end"])
            self._regs = {name: int(state["regs"][name]) for name in STATE_REGS}
            self._lock.notify_all()
