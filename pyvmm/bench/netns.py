"""Two network namespaces joined by a veth pair, optionally shaped with tc; removed on exit.

`pyvmm bench --link-mbit N` runs the source in one namespace and the destination in the
other, so that the migration crosses a real link with a real rate limit (a tc token
bucket on each end) instead of loopback. Namespaces are named after this process's pid,
so that a test (or a person) can check that none is left behind.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.231.{n}.{host}"
PREFIX = "pyvmm-"
_serial = itertools.count()


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be made; the message names the command."""


@dataclass(frozen=True)
class Link:
    ns_a: str
    ns_b: str
    addr_a: str
    addr_b: str

    def prefix(self, side: str) -> list[str]:
        """Run a command inside side "a" or "b" (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns_a if side == "a" else self.ns_b]


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "iproute2 (ip, tc) is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"{PREFIX}probe-{os.getpid()}"],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"{PREFIX}probe-{os.getpid()}"], check=False)
    return None


def ours() -> list[str]:
    """Namespaces this process made and has not removed yet."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    tag = f"-{os.getpid()}-"
    return [w for w in out.stdout.split() if w.startswith(PREFIX) and tag in w]


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        cause = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise NetnsError(f"{' '.join(cmd[:4])} ...: {cause}")


@contextmanager
def veth_pair(rate_mbit: int | None = None) -> Iterator[Link]:
    n = next(_serial) % 250
    tag = f"{os.getpid()}-{n}"
    link = Link(f"{PREFIX}a-{tag}", f"{PREFIX}b-{tag}", SUBNET.format(n=n, host=1),
                SUBNET.format(n=n, host=2))  # fmt: skip
    try:
        _run("ip", "netns", "add", link.ns_a)
        _run("ip", "netns", "add", link.ns_b)
        _run("ip", "link", "add", "veth-a", "netns", link.ns_a, "type", "veth", "peer", "name",
             "veth-b", "netns", link.ns_b)  # fmt: skip
        for ns, dev, addr in (
            (link.ns_a, "veth-a", link.addr_a),
            (link.ns_b, "veth-b", link.addr_b),
        ):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if rate_mbit:
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                     f"{rate_mbit}mbit", "burst", "64kb", "latency", "100ms")  # fmt: skip
        yield link
    finally:
        # Deleting a namespace deletes the veth end inside it, and with it the pair.
        for ns in (link.ns_a, link.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
