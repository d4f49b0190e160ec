"""Migration transports on real sockets: the incoming unix socket's permissions."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyvmm.migration.transport import connect, listen, parse_uri


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_incoming_unix_socket_is_0600_under_umask_000(tmp_path: Path) -> None:
    """Issue 12 item 15: the socket followed the umask (0777), so any local user could
    write guest RAM and vCPU state into the destination."""
    path = tmp_path / "incoming.sock"
    uri = parse_uri(f"unix:{path}")
    with umask(0):
        sock = listen(uri)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        # The owner (this test) can still connect, and the listener accepts it.
        client = connect(uri, timeout_s=1.0)
        sock.settimeout(1.0)
        peer, _ = sock.accept()
        client.sendall(b"x")
        assert peer.recv(1) == b"x"
        peer.close()
        client.close()
    finally:
        sock.close()


def test_stale_incoming_socket_is_replaced_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "incoming.sock"
    uri = parse_uri(f"unix:{path}")
    with umask(0):
        listen(uri).close()  # leaves a socket file nobody listens on
        assert path.exists()
        sock = listen(uri)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        sock.close()
