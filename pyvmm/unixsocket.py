"""Listening unix sockets for the monitor and for incoming migrations.

A leaf module (it imports nothing from pyvmm), so that every layer may use it. Two
properties matter to callers:
- the socket file appears only once it accepts connections, with mode 0600: it is bound
  and listened on under a temporary name in the same directory, then renamed into place.
  A client that waits for the file and connects at once is never refused, and no other
  local user can ever connect (whoever connects to a migration socket writes guest RAM;
  whoever reaches QMP controls the VM);
- a stale socket (nobody listens) is replaced; a live one, or a file that is not a
  socket, is never removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile

log = logging.getLogger(__name__)

UNIX_PATH_MAX_BYTES = 107  # sizeof(sockaddr_un.sun_path) - 1


def socket_is_live(path: str) -> bool:
    """Does something accept connections on this unix socket? (Else it is stale.)"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # cannot tell (e.g. permission denied): do not delete it
    finally:
        probe.close()


def listen_unix(path: str, backlog: int, what: str) -> tuple[socket.socket, tuple[int, int]]:
    """Listen on `path`; returns the socket and the file's (st_dev, st_ino), so the owner
    can later remove it only if it is still its own. `what` names the socket in errors."""
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(
                errno.EEXIST,
                f"cannot create {what} {path}: a file that is not a socket is in the way; "
                "remove it or choose another path",
            )
        if socket_is_live(path):
            raise OSError(
                errno.EADDRINUSE, f"{what} unix:{path} is in use: another process listens on it"
            )
        log.info("removing stale %s %s", what, path)
        os.unlink(path)
    tmp = _temporary_name(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)  # nobody can connect before listen(): no window
        sock.listen(backlog)
        if tmp != path:
            os.rename(tmp, path)
        st = os.stat(path)
    except OSError:
        sock.close()
        if tmp != path:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return sock, (st.st_dev, st.st_ino)


def _temporary_name(path: str) -> str:
    """Where to bind before the rename that makes the socket appear, listening. Beside
    `path` if the name fits in sun_path, else in the temporary directory (rename works
    within one file system). Binding in place is the last resort: between bind() and
    listen() a client that sees the file gets ECONNREFUSED (seen with pytest-xdist's
    longer directories)."""
    name = f".pyvmm-{os.getpid():x}-{id(path) & 0xFFFFFF:x}"
    for directory in (os.path.dirname(path) or ".", tempfile.gettempdir()):
        tmp = os.path.join(directory, name)
        if len(os.fsencode(tmp)) <= UNIX_PATH_MAX_BYTES and _same_fs(directory, path):
            return tmp
    return path


def _same_fs(directory: str, path: str) -> bool:
    try:
        return os.stat(directory).st_dev == os.stat(os.path.dirname(path) or ".").st_dev
    except OSError:
        return False
