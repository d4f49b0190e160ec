"""L4: the QMP monitor. server.py serves QMP; client.py is a synchronous client.

Import light: only the server side is re-exported here (no qemu.qmp import);
use ``from pyvmm.monitor.client import qmp_call, SyncQmp`` for the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Address", "ArgSpec", "ErrorClass", "QmpError", "QmpServer", "parse_address"]

if TYPE_CHECKING:
    from pyvmm.monitor.schema import ArgSpec, ErrorClass, QmpError
    from pyvmm.monitor.server import Address, QmpServer, parse_address


def __getattr__(name: str) -> Any:
    """The re-exports, imported on first use: a VM without QMP never loads the server."""
    if name in ("ArgSpec", "ErrorClass", "QmpError"):
        from pyvmm.monitor import schema

        return getattr(schema, name)
    if name in ("Address", "QmpServer", "parse_address"):
        from pyvmm.monitor import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
