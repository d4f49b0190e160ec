"""A runnable VM: KVM VM + guest RAM + vCPU threads + port devices.

Life cycle:  Machine(config) -> boot(image) -> start() -> wait() -> close().
`wait` returns a MachineExit saying why the VM ended and with which exit code.
pause()/resume() stop and restart every vCPU with bounded latency; the
migration code uses them (and the state capture in machine/state.py).

Ownership: the Machine owns /dev/kvm (its own, or the Kvm it was given), the VM
fd, every vCPU fd and guest RAM; close() releases them all, and a constructor
that fails releases what it took before it raises.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmm.kvm import Kvm, KvmError, abi
from pyvmm.machine import cpuid, pvh
from pyvmm.machine.devices import (
    COM1_BASE,
    EXIT_PORT,
    SLEEP_PORT,
    ControlPort,
    PortBus,
    SerialConsole,
)
from pyvmm.machine.dirty_ring_setup import enable_dirty_ring, max_ring_entries
from pyvmm.machine.elf import PvhImage
from pyvmm.machine.errors import MachineError
from pyvmm.machine.memory import GuestMemory
from pyvmm.machine.uart import COM2_BASE, PORTS, ServiceUart
from pyvmm.machine.vcpu import Vcpu, VcpuHost, VcpuRunState, install_kick_handler
from pyvmm.timeline import Timeline

log = logging.getLogger(__name__)

TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
MAX_VCPUS = 64
PAUSE_TIMEOUT_S = 5.0


@dataclass
class MachineConfig:
    mem_bytes: int = 256 << 20
    vcpus: int = 1
    cmdline: str = ""
    # Start mode: every vCPU at the entry with no in-kernel irqchip (pyvmm's guests), or
    # the standard start (in-kernel irqchip and PIT, boot vCPU only). None = from the image.
    start_all_vcpus: bool | None = None
    # Dirty ring entries per vCPU (None: bitmap mode; 0: the largest ring KVM offers, or
    # bitmap mode if it offers none). Enabled before vCPUs exist.
    dirty_ring_entries: int | None = None

    def validate(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise MachineError(f"--vcpus {self.vcpus} is out of range (1..{MAX_VCPUS})")
        if self.mem_bytes < (2 << 20) or self.mem_bytes % 4096:
            raise MachineError(
                f"--mem {self.mem_bytes} bytes: must be at least 2M and a multiple of 4K"
            )


@dataclass
class MachineExit:
    code: int
    reason: str
    error: bool = False


@dataclass
class MachineStats:
    exits_per_vcpu: list[int] = field(default_factory=list)


class Machine:
    def __init__(
        self, config: MachineConfig, serial: SerialConsole | None = None, kvm: Kvm | None = None
    ) -> None:
        """A Kvm passed in becomes the machine's: close() closes it, and so does a failure
        of this constructor."""
        self.config = config
        self.kvm = kvm if kvm is not None else Kvm()
        try:
            config.validate()
            self._init_parts(serial)
            if config.dirty_ring_entries == 0:
                config.dirty_ring_entries = max_ring_entries(self.kvm) or None
            self.vm = self.kvm.create_vm()
        except BaseException:
            self.kvm.close()
            raise
        try:
            self.vm.set_tss_addr(TSS_ADDR)
            self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            self.memory = GuestMemory(config.mem_bytes)
            for region in self.memory.regions:
                try:
                    self.vm.set_user_memory_region(
                        region.slot, 0, region.gpa, region.size_bytes, region.host_addr
                    )
                except KvmError as exc:
                    if exc.errno != errno.ENOMEM:
                        raise
                    # KVM allocates its per-page metadata (rmap, about 2.5 MiB per GiB of
                    # slot here) in kernel memory when a slot is registered.
                    raise MachineError(
                        f"KVM cannot register {region.size_bytes >> 20} MiB of guest RAM "
                        f"(slot {region.slot}): {exc}; KVM needs about 2.5 MiB of kernel "
                        "memory per GiB of guest RAM for its page metadata"
                    ) from None
        except BaseException:
            self.close()
            raise

    def _init_parts(self, serial: SerialConsole | None) -> None:
        """Everything that holds no fd: the bus, devices, exit state, the vCPUs' host."""
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        self.serial = serial or SerialConsole()
        self.bus = PortBus()
        self.bus.register(COM1_BASE, 8, self.serial)
        control = ControlPort(self._guest_exit)
        self.bus.register(EXIT_PORT, 1, control)
        self.bus.register(SLEEP_PORT, 1, control)
        self.serial2: ServiceUart | None = None  # COM2, when attached (attach_serial2)
        self.irqchip = False
        self.started = False
        # How the VM ended: the first entry wins. list.append is atomic, so request_exit
        # needs no lock (it runs in signal handlers, possibly inside itself).
        self._exits: list[MachineExit] = []
        # Held until the VM ends: a latch whose release never blocks (see request_exit).
        self._done = threading.Lock()
        self._done.acquire()
        self._mmio_logged: set[int] = set()
        self._vcpu_host = VcpuHost(
            io_out=self.bus.io_out,
            io_in=self.bus.io_in,
            fail=self.fail,
            request_exit=self.request_exit,
            vcpu_finished=self._vcpu_finished,
            log_unhandled_mmio=self.log_unhandled_mmio,
        )
        self.ring_bytes = 0
        self.tsc_khz = 0
        # Called once, by request_exit's winner, after the VM has ended: a waiter's wake-up
        # (the VMM's control loop). Must take no lock: it may run in a signal handler.
        self.on_exit: Callable[[], None] | None = None
        self.timeline: Timeline | None = None  # vCPUs created while it is set record on it

    # --- building ----------------------------------------------------------------------------

    def boot(self, image: PvhImage) -> None:
        """Load the image and create vCPUs in the PVH entry state."""
        start_all = self.config.start_all_vcpus
        if start_all is None:
            start_all = image.start_all_vcpus
        self.create_vcpus(start_all)
        assert self.memory is not None
        boot = pvh.load(self.memory, image, self.config.cmdline)
        for vcpu in self.vcpus:
            regs, sregs = pvh.entry_state(vcpu.fd.get_regs(), vcpu.fd.get_sregs(), boot)
            vcpu.fd.set_sregs(sregs)
            vcpu.fd.set_regs(regs)
            if not start_all and vcpu.index > 0:
                # Standard start: application processors wait for INIT/SIPI.
                vcpu.fd.set_mp_state(abi.KVM_MP_STATE_UNINITIALIZED)

    def create_vcpus(self, start_all: bool) -> None:
        """Create the vCPUs (and, for the standard start, the in-kernel irqchip and PIT first)."""
        install_kick_handler()
        self.config.start_all_vcpus = start_all
        if not start_all:
            self.vm.create_irqchip()
            self.vm.create_pit2(abi.KVM_PIT_SPEAKER_DUMMY)
            self.irqchip = True
        if self.config.dirty_ring_entries:
            self._enable_dirty_ring(self.config.dirty_ring_entries)
        supported = self.kvm.supported_cpuid()
        for index in range(self.config.vcpus):
            fd = self.vm.create_vcpu(index)
            vcpu = Vcpu(index, fd, self._vcpu_host)
            if self.timeline is not None:
                vcpu.start_timeline(self.timeline)
            self.vcpus.append(vcpu)
            if index == 0:
                self.tsc_khz = fd.get_tsc_khz()
            entries = cpuid.vcpu_cpuid(supported, index, self.config.vcpus, self.tsc_khz)
            fd.set_cpuid2(entries)
            supported = self.kvm.supported_cpuid()  # a fresh copy: vcpu_cpuid edits entries
            if self.ring_bytes:
                fd.map_dirty_ring(self.ring_bytes)

    def attach_serial2(self, uart: ServiceUart) -> None:
        """COM2 at 0x2f8 (uart.py): data for the guest wakes its sleeping vCPUs."""
        self.serial2 = uart
        self.bus.register(COM2_BASE, PORTS, uart)
        uart.wake = self._wake_vcpus
        uart.set_running(False)  # until start(): a stopped guest's output stays queued

    def _wake_vcpus(self) -> None:
        for vcpu in self.vcpus:
            vcpu.wake()

    def _enable_dirty_ring(self, entries: int) -> None:
        self.ring_bytes = enable_dirty_ring(self.kvm, self.vm, entries)

    def set_dirty_logging(self, enabled: bool) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for every slot (re-registering it)."""
        assert self.memory is not None
        flags = abi.KVM_MEM_LOG_DIRTY_PAGES if enabled else 0
        for region in self.memory.regions:
            self.vm.set_user_memory_region(
                region.slot, flags, region.gpa, region.size_bytes, region.host_addr
            )

    # --- running -----------------------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        """Start the vCPU threads; with paused=True they park at once (QEMU's -S)."""
        if not self.vcpus:
            raise MachineError("no vCPUs: boot an image or restore a state first")
        self.started = True
        for vcpu in self.vcpus:
            if paused:
                vcpu.request_pause()
            vcpu.start()
        if self.serial2 is not None:
            self.serial2.set_running(not paused)

    def wait(self, timeout_s: float | None = None) -> MachineExit | None:
        """Block until the VM ends (or timeout); returns why, or None on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if remaining <= 0:
                return None
            # Short waits keep signal handlers responsive. A handler that ends the VM
            # releases the latch even while this thread is inside acquire().
            if self._done.acquire(timeout=remaining):
                self._done.release()  # leave the latch open for every other waiter
                return self._exits[0]

    @property
    def exit_status(self) -> MachineExit | None:
        exits = self._exits
        return exits[0] if exits else None

    def request_exit(self, code: int, reason: str, error: bool = False) -> None:
        """End the VM (first caller wins); vCPU threads are stopped by close().

        Safe from any thread and from a signal handler, also one that interrupted this
        very method on the same thread: it takes no lock its caller could hold."""
        candidate = MachineExit(code, reason, error)
        self._exits.append(candidate)
        for vcpu in self.vcpus:
            vcpu.request_stop()
        if self._exits[0] is candidate:  # exactly one caller gets here
            log.info("VM ends: %s (exit code %d)", reason, code)
            self._done.release()
            on_exit = self.on_exit
            if on_exit is not None:
                on_exit()

    def fail(self, message: str) -> None:
        self.request_exit(1, message, error=True)

    def _guest_exit(self, vcpu_index: int, code: int) -> None:
        self.request_exit(code, f"guest wrote exit code {code} to port 0x{EXIT_PORT:x}")

    def _vcpu_finished(self, index: int) -> None:
        if all(v.state is VcpuRunState.FINISHED for v in self.vcpus):
            self.request_exit(0, "all vCPUs halted")

    def log_unhandled_mmio(self, addr: int, is_write: bool) -> None:
        page = addr >> 12
        if page not in self._mmio_logged:
            self._mmio_logged.add(page)
            log.info(
                "unhandled MMIO %s at 0x%x (logged once per page)",
                "write" if is_write else "read",
                addr,
            )

    def pause(self) -> None:
        """Stop every vCPU outside KVM_RUN; returns when all are parked."""
        if self.serial2 is not None:
            self.serial2.set_running(False)
        for vcpu in self.vcpus:
            vcpu.request_pause()
        for vcpu in self.vcpus:
            if not vcpu.wait_paused(PAUSE_TIMEOUT_S) and vcpu.state is not VcpuRunState.FINISHED:
                raise MachineError(f"vCPU {vcpu.index} did not pause within {PAUSE_TIMEOUT_S} s")

    def resume(self) -> None:
        for vcpu in self.vcpus:
            vcpu.resume()
        if self.serial2 is not None:
            self.serial2.set_running(True)

    def stats(self) -> MachineStats:
        return MachineStats([v.exits for v in self.vcpus])

    # --- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop vCPU threads and release every fd and mapping. Safe to call twice, and
        while other threads kick, pause or end the VM (on the vCPUs they hold, kicks
        become no-ops once a vCPU's fd is closed)."""
        vcpus = self.vcpus
        for vcpu in vcpus:
            vcpu.request_stop()
        for vcpu in vcpus:
            if vcpu.thread is not None:
                vcpu.thread.join(2.0)
                if vcpu.thread.is_alive():
                    log.warning("vCPU %d thread did not stop; its fd stays open", vcpu.index)
        self.serial.flush()
        self.vcpus = []  # before the fds close: nobody finds a closed vCPU in the list
        for vcpu in vcpus:
            vcpu.close()
        self.vm.close()  # the VM goes first: it maps guest RAM
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
