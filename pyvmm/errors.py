"""Which exceptions are user-facing errors with a one-line message."""

from __future__ import annotations


def describe_error(exc: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (let it trace)."""
    from pyvmm.kvm.errors import KvmError, KvmUnavailable
    from pyvmm.machine.errors import MachineError

    if isinstance(exc, MachineError | KvmUnavailable | KvmError):
        return str(exc)
    from pyvmm.bench.netns import NetnsError
    from pyvmm.bench.vms import BenchError

    if isinstance(exc, BenchError | NetnsError):
        return str(exc)
    if isinstance(exc, ValueError):  # bad addresses and arguments from the library
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    try:
        from pyvmm.monitor.client import QmpClientError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, QmpClientError):
        return str(exc)
    return None
