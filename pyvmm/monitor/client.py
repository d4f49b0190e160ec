"""A synchronous QMP client for the CLI and tools, over the official qemu.qmp library.

qemu.qmp's `QMPClient` is asyncio-only. `SyncQmp` runs its event loop in a
background thread so that callers stay plain synchronous code::

    with SyncQmp("unix:/tmp/vm.qmp") as qmp:
        qmp.cmd("migrate-set-parameters", **{"downtime-limit": 300})
        print(qmp.cmd("query-status"))
        event = qmp.wait_event("MIGRATION", timeout_s=10)

    qmp_call("tcp:127.0.0.1:4444", "query-version")   # one-shot

It talks to pyvmm and to QEMU alike; addresses are ``unix:PATH`` or
``tcp:HOST:PORT``, as for the server.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.protocol import StateError

from pyvmm.monitor.server import parse_address

__all__ = [
    "QmpClientError",
    "QmpCommandError",
    "QmpConnectError",
    "QmpTimeoutError",
    "SyncQmp",
    "qmp_call",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

EVENT_BUFFER_MAX = 10_000  # events kept for events()/wait_event(); the oldest go first


class QmpClientError(Exception):
    """Base class of this module's errors."""


class QmpConnectError(QmpClientError):
    """Could not connect to (or lost) the QMP server; the message names the address and cause."""


class QmpCommandError(QmpClientError):
    """The server answered a command with an error reply."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpTimeoutError(QmpClientError, TimeoutError):
    """No answer (or no such event) within the time limit."""


def _describe(exc: BaseException) -> str:
    """A one-line cause, digging under qemu.qmp's wrapper exceptions."""
    while isinstance(exc, ConnectError) and exc.exc is not None:
        exc = exc.exc
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio: strerror is "Connect call failed"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class SyncQmp:
    """A connected QMP session usable from synchronous code (a context manager).

    Events are collected from the moment of connection; `events()` takes
    the ones collected so far and `wait_event()` waits for a named one.
    """

    def __init__(self, address: str, *, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._target = parse_address(address)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: QMPClient | None = None
        self._pump: asyncio.Task[None] | None = None
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_BUFFER_MAX)
        self._events_cv = threading.Condition()

    # -- lifecycle -------------------------------------------------------------

    def connect(self) -> SyncQmp:
        """Connect, read the greeting and negotiate capabilities."""
        if self._loop is not None:
            raise RuntimeError(f"already connected to {self.address}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-client {self.address}", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._connect(), self.timeout_s, "connecting")
        except QmpTimeoutError as exc:
            self.close()
            raise QmpConnectError(
                f"cannot connect to QMP at {self.address}: no greeting within {self.timeout_s} s"
            ) from exc
        except BaseException:
            self.close()
            raise
        return self

    async def _connect(self) -> None:
        self._client = QMPClient(f"pyvmm-{self.address}")
        target: str | tuple[str, int]
        if self._target.kind == "unix":
            target = self._target.path
        else:
            target = (self._target.host, self._target.port)
        try:
            await self._client.connect(target)
        except (ConnectError, OSError, EOFError) as exc:
            raise QmpConnectError(
                f"cannot connect to QMP at {self.address}: {_describe(exc)}"
            ) from None
        self._pump = asyncio.get_running_loop().create_task(self._pump_events())

    async def _pump_events(self) -> None:
        assert self._client is not None
        async for event in self._client.events:
            with self._events_cv:
                self._events.append(dict(event))
                self._events_cv.notify_all()

    def close(self) -> None:
        """Disconnect and stop the background loop. Safe to call twice."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._client is not None:
            fut = asyncio.run_coroutine_threadsafe(self._disconnect(), loop)
            try:
                fut.result(timeout=5.0)
            except Exception as exc:  # the server may already be gone
                logger.debug("QMP disconnect from %s: %s", self.address, exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if not loop.is_running():
            loop.close()
        self._client = None

    async def _disconnect(self) -> None:
        assert self._client is not None
        if self._pump is not None:
            self._pump.cancel()
        try:
            await self._client.disconnect()
        except Exception as exc:
            logger.debug("QMP disconnect from %s: %s", self.address, exc)

    def __enter__(self) -> SyncQmp:
        if self._loop is None:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- commands ----------------------------------------------------------------

    @property
    def greeting(self) -> dict[str, Any]:
        """The server's greeting, e.g. greeting["QMP"]["version"]."""
        if self._client is None or self._client.greeting is None:
            raise QmpConnectError(f"not connected to QMP at {self.address}")
        qmp = self._client.greeting.QMP
        return {"QMP": {"version": dict(qmp.version), "capabilities": list(qmp.capabilities)}}

    def cmd(self, name: str, /, **args: Any) -> Any:
        """Run a command and return its "return" value.

        Argument names with dashes go in as a dict: ``cmd("x", **{"cpu-index": 0})``.
        """
        return self.execute(name, args or None)

    def execute(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run a command with an arguments dict and return its "return" value."""
        if self._client is None:
            raise QmpConnectError(f"not connected to QMP at {self.address}")
        return self._run(self._execute(name, args), self.timeout_s, f"command {name}")

    async def _execute(self, name: str, args: dict[str, Any] | None) -> Any:
        assert self._client is not None
        try:
            return await self._client.execute(name, args)
        except ExecuteError as exc:
            raise QmpCommandError(exc.error_class, str(exc)) from None
        except (ExecInterruptedError, StateError, EOFError, OSError) as exc:
            # StateError: the connection was already going down (the server closed it)
            raise QmpConnectError(
                f"lost the QMP connection to {self.address} during {name}: {_describe(exc)}"
            ) from None

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float, what: str) -> T:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise QmpTimeoutError(
                f"QMP at {self.address}: {what} got no answer within {timeout_s} s"
            ) from None

    # -- events --------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Take every event received so far (oldest first), without waiting."""
        with self._events_cv:
            taken = list(self._events)
            self._events.clear()
        return taken

    def wait_event(self, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for the next event called `name` (one already received counts) and take it.

        Other events stay queued for events()/wait_event().
        """
        deadline = time.monotonic() + timeout_s
        with self._events_cv:
            while True:
                for event in self._events:
                    if event.get("event") == name:
                        self._events.remove(event)
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QmpTimeoutError(
                        f"QMP at {self.address}: no {name} event within {timeout_s} s"
                    )
                self._events_cv.wait(remaining)


def qmp_call(
    address: str, command: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0
) -> Any:
    """Connect, run one command, disconnect; return the command's "return" value.

    Raises QmpConnectError, QmpCommandError or QmpTimeoutError. timeout_s
    bounds connecting and the command, each.
    """
    with SyncQmp(address, timeout_s=timeout_s) as qmp:
        return qmp.execute(command, args)
