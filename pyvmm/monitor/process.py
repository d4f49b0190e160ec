"""`pyvmm run` as a library call: a Vmm with every QMP command, run to its end.

The only module that knows both the Vmm and the command tables, so that neither
imports the other (the commands see the Vmm; the Vmm sees none of them)."""

from __future__ import annotations

from typing import IO

from pyvmm.machine.machine import MachineExit
from pyvmm.monitor.control import ControlLoop
from pyvmm.monitor.vmm import RunOptions, Vmm


def register_commands(vmm: Vmm) -> None:
    """Called only with a QMP server: a VM without one never imports the commands."""
    from pyvmm.monitor.commands_colo import register_colo_commands
    from pyvmm.monitor.commands_dirty import register_dirty_commands
    from pyvmm.monitor.commands_dirtylimit import register_dirtylimit_commands
    from pyvmm.monitor.commands_machine import register_machine_commands
    from pyvmm.monitor.commands_migration import register_migration_commands
    from pyvmm.monitor.commands_timeline import register_timeline_commands

    register_machine_commands(vmm)
    register_dirty_commands(vmm)
    register_migration_commands(vmm)
    register_dirtylimit_commands(vmm)
    register_timeline_commands(vmm)
    register_colo_commands(vmm)


def make_vmm(
    options: RunOptions, out: IO[str] | None = None, loop: ControlLoop | None = None
) -> Vmm:
    return Vmm(options, out, register_commands, loop)


def run_vmm(options: RunOptions, out: IO[str] | None = None) -> MachineExit:
    return make_vmm(options, out).run()
