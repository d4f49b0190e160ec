"""Two network namespaces joined by a veth pair, optionally shaped with tc; removed on exit."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.231.{n}.{host}"


@dataclass(frozen=True)
class Link:
    ns_a: str
    ns_b: str
    addr_a: str
    addr_b: str

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns_a if side == "a" else self.ns_b]


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "iproute2 (ip, tc) is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"pyvmm-probe-{os.getpid()}"],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"pyvmm-probe-{os.getpid()}"], check=False)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def veth_pair(rate_mbit: int | None = None, n: int = 0) -> Iterator[Link]:
    tag = f"{os.getpid()}-{n}"
    link = Link(f"pyvmm-a-{tag}", f"pyvmm-b-{tag}", SUBNET.format(n=n, host=1),
                SUBNET.format(n=n, host=2))  # fmt: skip
    try:
        _ip("netns", "add", link.ns_a)
        _ip("netns", "add", link.ns_b)
        _ip("link", "add", "veth-a", "netns", link.ns_a, "type", "veth", "peer", "name",
            "veth-b", "netns", link.ns_b)  # fmt: skip
        for ns, dev, addr in (
            (link.ns_a, "veth-a", link.addr_a),
            (link.ns_b, "veth-b", link.addr_b),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if rate_mbit:
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                                f"{rate_mbit}mbit", "burst", "64kb", "latency", "100ms"],
                               check=True, capture_output=True, text=True)  # fmt: skip
        yield link
    finally:
        for ns in (link.ns_a, link.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
