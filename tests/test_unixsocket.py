"""Unix sockets appear only when they listen (pyvmm/unixsocket.py), even when the path is
too long for a temporary name beside it."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from pyvmm import unixsocket
from pyvmm.unixsocket import UNIX_PATH_MAX_BYTES, listen_unix


def _long_dir(tmp_path: Path) -> Path:
    """A directory whose socket path `d/s.qmp` fills sun_path exactly."""
    pad = UNIX_PATH_MAX_BYTES - len(os.fsencode(str(tmp_path))) - 2 - len("s.qmp")
    d = tmp_path / ("d" * pad)
    d.mkdir()
    return d


@pytest.mark.parametrize("room", [False, True], ids=["no-room-beside", "room-beside"])
def test_the_socket_is_bound_elsewhere_and_renamed_when_it_fits(tmp_path: Path, room: bool) -> None:
    path = str((tmp_path if room else _long_dir(tmp_path)) / "s.qmp")
    assert len(os.fsencode(path)) <= UNIX_PATH_MAX_BYTES
    bound: list[str] = []
    real_bind = socket.socket.bind

    class Spy(socket.socket):
        def bind(self, address: object) -> None:
            bound.append(str(address))
            real_bind(self, address)  # type: ignore[arg-type]

    original = unixsocket.socket.socket
    unixsocket.socket.socket = Spy  # type: ignore[misc]
    try:
        sock, _ = listen_unix(path, 4, "test socket")
    finally:
        unixsocket.socket.socket = original  # type: ignore[misc]
    try:
        assert bound and bound[0] != path  # never bound in place: no refused window
        assert os.path.dirname(bound[0]) == (
            os.path.dirname(path) if room else tempfile.gettempdir()
        )
        assert not os.path.exists(bound[0]) and os.stat(path).st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # listening already
    finally:
        sock.close()
