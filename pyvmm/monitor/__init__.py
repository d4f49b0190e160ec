"""L4: the QMP monitor. server.py serves QMP; client.py is a synchronous client.

Import light: only the server side is re-exported here (no qemu.qmp import);
use ``from pyvmm.monitor.client import qmp_call, SyncQmp`` for the client.
"""

from pyvmm.monitor.schema import ArgSpec, ErrorClass, QmpError
from pyvmm.monitor.server import Address, QmpServer, parse_address

__all__ = ["Address", "ArgSpec", "ErrorClass", "QmpError", "QmpServer", "parse_address"]
